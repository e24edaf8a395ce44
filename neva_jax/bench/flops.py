"""Model FLOPs of a training step (docs/REFERENCE.md "FLOP convention") and utilisation.

Axis letters: B batch, T sequence length, L layers, D model width, F FFN width,
V vocab, N query heads, K kv heads, H head dim, E vision width, P image tokens.

Per LLM token: 6 * N_llm in stage 2 (forward 2N, backward 4N) and 4 * N_llm in
stage 1 (the LLM is frozen: forward 2N plus the activation gradients 2N that the
projector's gradient needs, no weight gradients), N_llm = the decoder's matmul
parameters including the LM head, excluding the input embedding. Causal attention
adds 6 * T * (N*H) * L per token: forward QK^T and PV are 4 * T * N*H per layer,
halved by causality, times 3 for forward + backward. Attention has no weights, so
its backward is the same in both stages (the projector's gradient flows through
every layer), and it is counted in both. The frozen vision tower counts its
forward pass only (patch embedding, the blocks up to the selected layer, their
bidirectional attention); the projector counts 6 x its parameters per image token.
Norms, activations, softmax and the optimizer are not model FLOPs.
"""

from __future__ import annotations

import dataclasses

from neva_jax.model.clip import ClipConfig
from neva_jax.model.llama import LlamaConfig
from neva_jax.model.neva import NevaConfig
from neva_jax.model.projector import projector_depth


def llm_matmul_params(cfg: LlamaConfig) -> int:
    """N_llm: q/k/v/o and MLP kernels of every layer plus the LM head (no embedding)."""
    D, H = cfg.hidden_size, cfg.head_size
    attn = D * H * (2 * cfg.num_attention_heads + 2 * cfg.num_kv_heads)  # q, o; k, v
    mlp = (3 if cfg.activation == "swiglu" else 2) * D * cfg.ffn_hidden_size
    return cfg.num_layers * (attn + mlp) + D * cfg.vocab_size


def vision_layer_params(cfg: ClipConfig) -> int:
    """Matmul parameters of one CLIP block: q/k/v/o and the two MLP kernels."""
    E = cfg.hidden_size
    return 4 * E * E + 2 * E * cfg.ffn_hidden_size


def projector_params(cfg: NevaConfig) -> int:
    """Projector kernel parameters (biases are not matmuls)."""
    depth = projector_depth(cfg.projector)
    if depth == 0:
        return 0
    E, D = cfg.vision.hidden_size, cfg.llm.hidden_size
    return E * D + (depth - 1) * D * D


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step, by part."""

    llm: float  # decoder + LM head matmuls
    attention: float  # causal attention scores and values in the decoder
    vision: float  # the frozen tower's forward pass
    projector: float

    @property
    def total(self) -> float:
        return self.llm + self.attention + self.vision + self.projector


def vision_forward_flops(cfg: ClipConfig) -> float:
    """Forward FLOPs of the tower for one image, up to `vision_select_layer`."""
    E, L = cfg.hidden_size, cfg.num_blocks_used
    tokens = cfg.num_patches + 1  # patches + class token
    patch = 2 * cfg.num_patches * (cfg.patch_dim**2 * cfg.num_channels) * E
    blocks = 2 * tokens * vision_layer_params(cfg) * L
    attention = 4 * tokens * tokens * E * L  # QK^T and PV, bidirectional
    return float(patch + blocks + attention)


def step_flops(
    cfg: NevaConfig, batch_size: int, seq_len: int, *, stage: int, images_per_row: float = 1
) -> StepFlops:
    """Model FLOPs of one step over `batch_size` rows of `seq_len` tokens (stage 1 or 2).

    `images_per_row` may be a mean (packed rows hold different numbers of images).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage={stage} is not 1 or 2")
    tokens = batch_size * seq_len
    llm = cfg.llm
    per_token = (6 if stage == 2 else 4) * llm_matmul_params(llm)
    width = llm.num_attention_heads * llm.head_size
    attention = 6 * seq_len * width * llm.num_layers
    images = batch_size * images_per_row
    return StepFlops(
        llm=float(per_token * tokens),
        attention=float(attention * tokens),
        vision=images * vision_forward_flops(cfg.vision),
        projector=float(6 * projector_params(cfg) * images * cfg.num_image_tokens),
    )


def matmul_flops(m: int, k: int, n: int) -> float:
    """FLOPs of an [m, k] x [k, n] matmul (multiply-adds count two)."""
    return 2.0 * m * k * n


def utilisation(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs per second over the peak (MFU when the peak is the device's)."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError("step time and peak must be positive")
    return flops_per_step / step_seconds / peak_flops
