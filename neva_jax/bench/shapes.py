"""Benchmark shapes: the CPU `bench` shape, a `tiny` smoke shape and LLaVA-1.5-7B.

Axis letters: B batch, T sequence length, M images per row, P image tokens per
image, V vocab.

A shape is a model config plus the batch it runs on. Every benchmark row is laid
out like a rendered single-image conversation:

    [BOS, 4 prompt tokens] [P image slots] [text ...] (the last `trained` tokens trained)

so `T = P + text_tokens`, and the loss covers the last `trained` tokens of each
row (an answer that takes half of the text in the `bench` shape). The same batch
feeds both sides: ours as the docs/CONTRACTS.md dict, `transformers` as
(input_ids, pixel_values NCHW, labels with -100 outside the answer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from neva_jax import platform
from neva_jax.model import clip, llama, neva
from neva_jax.model.neva import NevaConfig

PROMPT_PREFIX = 5  # BOS + 4 prompt tokens before the image slots


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """A model config and the batch it is measured on."""

    name: str
    model: NevaConfig
    batch_size: int
    text_tokens: int  # text tokens per row (the row also holds P image slots)
    trained_tokens: int  # answer tokens at the end of each row that the loss covers

    @property
    def seq_len(self) -> int:
        """T: image slots plus text tokens."""
        return self.model.num_image_tokens + self.text_tokens

    @property
    def tokens_per_step(self) -> int:
        """B * T: every position the model processes in one step."""
        return self.batch_size * self.seq_len


def _runtime(runtime: dict[str, Any]) -> dict[str, Any]:
    """The CPU shapes' run-time fields: fp32, XLA attention, then this backend's choices
    (`platform.resolve_runtime`: on CPU the row-major weight gradients), as a run gets."""
    return platform.resolve_runtime(**{"dtype": "float32", "attention_impl": "xla", **runtime})


def bench(**runtime: Any) -> BenchShape:
    """The CPU comparison shape of issue 8 (fp32; batch 4 x (256 image + 128 text) tokens).

    LLM 8 layers, width 512, 8 heads, FFN 1408, vocab 32000; CLIP 224 px / patch 14
    (256 image tokens), 6 layers, width 384, 6 heads, MLP 1536; `mlp2x_gelu`.
    """
    llm = llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        ffn_hidden_size=1408,
        num_layers=8,
        num_attention_heads=8,
        encoder_seq_length=4096,
        layernorm_epsilon=1e-6,
    )
    vision = clip.ClipConfig(
        image_size=224,
        patch_dim=14,
        hidden_size=384,
        ffn_hidden_size=1536,
        num_layers=6,
        num_attention_heads=6,
    )
    cfg = NevaConfig(llm=llm, vision=vision, projector="mlp2x_gelu", image_token_id=31999)
    cfg = neva.with_runtime(cfg, **_runtime(runtime))
    return BenchShape("bench", cfg, batch_size=4, text_tokens=128, trained_tokens=64)


def tiny(**runtime: Any) -> BenchShape:
    """A seconds-fast shape for the smoke test: the `tiny` presets, 2 rows of 16 + 24 tokens."""
    cfg = neva.with_runtime(neva.tiny(), **_runtime(runtime))
    return BenchShape("tiny", cfg, batch_size=2, text_tokens=24, trained_tokens=8)


def llava_v15_7b(batch_size: int = 4, seq_len: int = 2048, **runtime: Any) -> BenchShape:
    """LLaVA-1.5-7B (Vicuna-7B + CLIP-L/14-336 + mlp2x_gelu) at `seq_len` (GPU bench)."""
    cfg = neva.with_runtime(neva.llava_v15_7b(), **platform.resolve_runtime(**runtime))
    text = seq_len - cfg.num_image_tokens
    return BenchShape("llava_v15_7b", cfg, batch_size, text_tokens=text, trained_tokens=text // 2)


def hf_llava_config(cfg: NevaConfig) -> Any:
    """The `transformers` LlavaConfig with the same architecture as `cfg` (LLaMA + CLIP)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = cfg.vision, cfg.llm
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_dim,
        num_channels=v.num_channels,
        layer_norm_eps=v.layernorm_epsilon,
        hidden_act=v.activation,
    )
    text = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.ffn_hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.encoder_seq_length,
        rms_norm_eps=t.layernorm_epsilon,
        rope_theta=t.rope_theta,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu" if cfg.projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=v.vision_select_layer,
        vision_feature_select_strategy="default" if v.class_token_length else "full",
        image_seq_length=cfg.num_image_tokens,
        pad_token_id=0,
    )


def text_ids(rng: np.random.Generator, n: int, cfg: NevaConfig) -> np.ndarray:
    """n random ordinary token ids (never BOS/EOS/pad or the image token)."""
    ids = rng.integers(5, cfg.llm.vocab_size, size=n).astype(np.int32)
    return np.where(ids == cfg.image_token_id, 5, ids).astype(np.int32)


def prompt_ids(rng: np.random.Generator, cfg: NevaConfig, text_tokens: int) -> np.ndarray:
    """One row: BOS, 4 prompt tokens, P image slots, then the rest of the text."""
    P = cfg.num_image_tokens
    text = text_ids(rng, text_tokens, cfg)
    text[0] = 1  # BOS
    slots = np.full(P, cfg.image_token_id, np.int32)
    return np.concatenate([text[:PROMPT_PREFIX], slots, text[PROMPT_PREFIX:]])


def images(rng: np.random.Generator, cfg: NevaConfig, batch: int) -> np.ndarray:
    """[B, 1, H, W, 3] CLIP-normalised-looking random pixels (channels-last)."""
    s = cfg.vision.image_size
    return rng.normal(size=(batch, 1, s, s, cfg.vision.num_channels)).astype(np.float32)


def make_batch(shape: BenchShape, seed: int = 0) -> dict[str, np.ndarray]:
    """The training batch in the docs/CONTRACTS.md layout (one sample per row)."""
    rng = np.random.default_rng(seed)
    B, T, n = shape.batch_size, shape.seq_len, shape.trained_tokens
    ids = np.stack([prompt_ids(rng, shape.model, shape.text_tokens) for _ in range(B)])
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - 1 - n : T - 1] = 1.0  # predictions of the last n tokens
    return {
        "input_ids": ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "images": images(rng, shape.model, B),
    }


def hf_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same batch for `transformers`: labels -100 outside the trained tokens, NCHW pixels.

    Our `loss_mask[t]` trains the prediction of token t+1; `transformers` shifts
    labels itself, so `labels[t+1] = input_ids[t+1]` where `loss_mask[t]` is set.
    """
    ids = batch["input_ids"]
    labels = np.full_like(ids, -100)
    trained = batch["loss_mask"][:, :-1] > 0
    labels[:, 1:] = np.where(trained, ids[:, 1:], -100)
    pixels = batch["images"][:, 0].transpose(0, 3, 1, 2)  # one image per row
    return {"input_ids": ids, "pixel_values": np.ascontiguousarray(pixels), "labels": labels}
