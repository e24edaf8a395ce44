"""The table between Hugging Face CLIP vision weights and `ClipVisionTower` parameters.

Axis letters: E vision width, F FFN width, N heads, H head dim, L layers, C channels,
p patch side, G patches per image side.

Same `ParamMapping` as the LLaMA table (convert/hf_llama.py); paths are relative to
the tower (`vision/` in the NeVA tree). torch keeps the conv kernel as [E, C, p, p]
and `nn.Linear` weights as [out, in]; ours are [p, p, C, E] and [in, out] with the
head dims split out.

Prefixes in the wild: `vision_model.` (openai/clip-vit-large-patch14: a full
CLIPModel, and older CLIPVisionModel folders), `` (CLIPVisionModel saved by
transformers 5), and inside llava-hf folders `vision_tower.vision_model.`,
`vision_tower.`, `model.vision_tower.` (see `detect_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from neva_jax.convert.hf_llama import ParamMapping
from neva_jax.model.clip import ClipConfig

# Keys that CLIP checkpoints carry and NeVA never uses: the post-LayerNorm (the
# features are taken before it), the position-id buffer of old checkpoints, and
# the text tower and projections of a full CLIPModel.
UNUSED_SUFFIXES = ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")
CLIP_MODEL_UNUSED_PREFIXES = (
    "text_model.",
    "text_projection.",
    "visual_projection.",
    "logit_scale",
)


def _linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """nn.Linear weight [prod(out), prod(in)] <-> kernel in_shape + out_shape."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return (
        lambda w: w.reshape(n_out, n_in).T.reshape(in_shape + out_shape),
        lambda k: np.ascontiguousarray(k.reshape(n_in, n_out).T),
    )


def _reshape(ours: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda w: w.reshape(ours)), (lambda k: np.ascontiguousarray(k.reshape(-1)))


_IDENTITY = (lambda w: w), (lambda k: np.ascontiguousarray(k))
# Conv kernel [E, C, p, p] <-> [p, p, C, E].
_CONV = (
    (lambda w: w.transpose(2, 3, 1, 0)),
    (lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1))),
)


def detect_prefix(keys: Iterable[str], candidates: Iterable[str]) -> str | None:
    """The first prefix in `candidates` under which `keys` hold a CLIP patch embedding."""
    keys = set(keys)
    for prefix in candidates:
        if f"{prefix}embeddings.patch_embedding.weight" in keys:
            return prefix
    return None


def param_table(cfg: ClipConfig, *, prefix: str = "vision_model.") -> list[ParamMapping]:
    """All mappings for a CLIP vision tower `cfg`; HF keys start with `prefix`."""
    E, F, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    N = cfg.num_attention_heads
    H = E // N
    p, C = cfg.patch_dim, cfg.num_channels
    table: list[ParamMapping] = []

    def add(path: str, key: str, shape: tuple[int, ...], fns: tuple[Callable, Callable]) -> None:
        parts = tuple(path.split("/"))
        if parts[0] == "layers":
            keys = tuple(f"{prefix}encoder.layers.{i}.{key}" for i in range(L))
            shape = (L, *shape)
        else:
            keys = (f"{prefix}{key}",)
        table.append(ParamMapping(parts, keys, shape, *fns))

    add("patch_embed/kernel", "embeddings.patch_embedding.weight", (p, p, C, E), _CONV)
    add("class_embed", "embeddings.class_embedding", (E,), _IDENTITY)
    add(
        "pos_embed/embedding",
        "embeddings.position_embedding.weight",
        (cfg.num_patches + 1, E),
        _IDENTITY,
    )
    add("pre_norm/scale", "pre_layrnorm.weight", (E,), _IDENTITY)  # sic: HF's spelling
    add("pre_norm/bias", "pre_layrnorm.bias", (E,), _IDENTITY)
    for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
        add(f"layers/{ours}/scale", f"{theirs}.weight", (E,), _IDENTITY)
        add(f"layers/{ours}/bias", f"{theirs}.bias", (E,), _IDENTITY)
    for name in ("q", "k", "v"):
        key = f"self_attn.{name}_proj"
        add(f"layers/attn/{name}/kernel", f"{key}.weight", (E, N, H), _linear((E,), (N, H)))
        add(f"layers/attn/{name}/bias", f"{key}.bias", (N, H), _reshape((N, H)))
    add("layers/attn/o/kernel", "self_attn.out_proj.weight", (N, H, E), _linear((N, H), (E,)))
    add("layers/attn/o/bias", "self_attn.out_proj.bias", (E,), _IDENTITY)
    add("layers/mlp/up/kernel", "mlp.fc1.weight", (E, F), _linear((E,), (F,)))
    add("layers/mlp/up/bias", "mlp.fc1.bias", (F,), _IDENTITY)
    add("layers/mlp/down/kernel", "mlp.fc2.weight", (F, E), _linear((F,), (E,)))
    add("layers/mlp/down/bias", "mlp.fc2.bias", (E,), _IDENTITY)
    return table


def unused_keys(keys: Iterable[str], prefix: str) -> set[str]:
    """The keys under `prefix` that CLIP checkpoints carry but NeVA does not use."""
    return {k for k in keys if k.startswith(prefix) and k[len(prefix) :] in UNUSED_SUFFIXES}
