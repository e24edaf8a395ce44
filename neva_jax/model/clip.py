"""The CLIP ViT vision tower (OpenAI CLIP / `transformers` CLIPVisionModel) in Flax NNX.

Axis letters: B batch, P patches (image tokens), E vision width, F FFN width,
N heads, H head dim, L layers, C channels.

Parameter tree (logical axes in brackets; layers stacked along a leading L axis):
  patch_embed/kernel          [p, p, C, E]  (None, None, None, 'embed')   conv, no bias
  class_embed                 [E]           ('embed',)
  pos_embed/embedding         [1+G*G, E]    ('position', 'embed')     G = image_size // p
  pre_norm/{scale,bias}       [E]           ('norm',)
  layers/attn_norm/{scale,bias}        [L, E]
  layers/attn/{q,k,v}/kernel  [L, E, N, H]  ('layers', 'embed', 'heads', 'head_dim') + bias [L, N, H]
  layers/attn/o/kernel        [L, N, H, E]  ('layers', 'heads', 'head_dim', 'embed') + bias [L, E]
  layers/mlp_norm/{scale,bias}         [L, E]
  layers/mlp/up/kernel        [L, E, F]     ('layers', 'embed', 'mlp')  + bias [L, F]
  layers/mlp/down/kernel      [L, F, E]     ('layers', 'mlp', 'embed')  + bias [L, E]

The features are `hidden_states[vision_select_layer]` in `transformers`' numbering
(0 = embeddings after the pre-LayerNorm, -1 = the last block's output); the
post-LayerNorm is never applied (LLaVA/NeVA do not use it, so it is not stored),
and only the blocks up to the selected one are computed. All L blocks are stored,
so a checkpoint round-trips to Hugging Face.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neva_jax.model.attention import Attention
from neva_jax.model.layers import (
    ACTIVATIONS,
    Dense,
    Embed,
    LayerNorm,
    Mlp,
    apply_stacked,
    param,
)
from neva_jax.model.schema import FieldError, check_choice, check_runtime, key
from neva_jax.sharding import constrain

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """CLIP ViT architecture plus run-time choices, with NeMo's `vision_encoder` names.

    Fields made with `key()` are run-config keys `model.vision_encoder.<name>`
    (model/schema.py).
    """

    image_size: int = key(224)
    patch_dim: int = key(14)
    num_channels: int = key(3)
    hidden_size: int = key(1024)
    ffn_hidden_size: int = key(4096)
    num_layers: int = key(24)
    num_attention_heads: int = key(16)
    layernorm_epsilon: float = key(1e-5)
    activation: str = key("quick_gelu")
    vision_select_layer: int = key(-2)  # hidden_states index; 0 = embeddings, -1 = last block
    class_token_length: int = key(1)  # 1 drops the CLS feature (HF 'default'), 0 keeps it
    # Run-time choices.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"  # xla | cudnn | auto (GPU only: attention.select_implementation)
    remat_policy: str = "none"
    scan_layers: bool | None = None  # as LlamaConfig.scan_layers
    row_major_weight_grads: bool = False  # the XLA:CPU weight-gradient form (layers.Dense)

    def __post_init__(self):
        def fail(field: str, problem: str) -> None:
            raise FieldError("model.vision_encoder", field, getattr(self, field), problem)

        if self.image_size % self.patch_dim:
            fail("image_size", f"not a multiple of patch_dim={self.patch_dim}")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"not divisible by num_attention_heads={self.num_attention_heads}")
        if not -(self.num_layers + 1) <= self.vision_select_layer <= self.num_layers:
            fail("vision_select_layer", f"outside [-{self.num_layers + 1}, {self.num_layers}]")
        if self.class_token_length not in (0, 1):
            fail("class_token_length", "1 drops the class token, 0 keeps it")
        check_choice("model.vision_encoder", self, "activation", tuple(ACTIVATIONS))
        check_runtime("model.vision_encoder", self)

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_dim

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (without the class token)."""
        return self.grid**2

    @property
    def num_image_tokens(self) -> int:
        """P: features per image after dropping `class_token_length` class tokens."""
        return self.num_patches + 1 - self.class_token_length

    @property
    def num_blocks_used(self) -> int:
        """How many blocks run to reach `vision_select_layer`."""
        sel = self.vision_select_layer
        return sel if sel >= 0 else self.num_layers + 1 + sel

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def clip_l14_224(**overrides: Any) -> ClipConfig:
    """OpenAI CLIP ViT-L/14 at 224 px: 24 layers, width 1024, 16 heads, 256 patches."""
    return ClipConfig(**overrides)


def clip_l14_336(**overrides: Any) -> ClipConfig:
    """OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5): 576 patches."""
    return ClipConfig(**{"image_size": 336, **overrides})


def tiny(**overrides: Any) -> ClipConfig:
    """A 2-layer, width-32 ViT on 32 px images with 8 px patches (16 patches)."""
    base = dict(
        image_size=32,
        patch_dim=8,
        hidden_size=32,
        ffn_hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
    )
    return ClipConfig(**{**base, **overrides})


# transformers' CLIPVisionConfig defaults, for config.json files that omit fields.
_HF_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def from_hf_config(
    hf: dict[str, Any],
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    **overrides: Any,
) -> ClipConfig:
    """Maps a `transformers` CLIP(Vision)Config dict (config.json) onto ClipConfig.

    A full CLIPConfig (with `vision_config`) is accepted too. The LLaVA fields
    `vision_feature_layer` and `vision_feature_select_strategy` ('default' drops the
    class token, 'full' keeps it) become `vision_select_layer`/`class_token_length`.
    """
    if isinstance(hf.get("vision_config"), dict):
        hf = hf["vision_config"]
    get = lambda key: hf.get(key) if hf.get(key) is not None else _HF_DEFAULTS[key]  # noqa: E731
    if hf.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ValueError(
            f"config.json model_type={hf.get('model_type')!r} is not a CLIP vision model"
        )
    act = get("hidden_act")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported (quick_gelu or gelu)")
    if not isinstance(vision_feature_layer, int):
        raise ValueError(
            f"config.json vision_feature_layer={vision_feature_layer!r}: only one layer is supported"
        )
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"config.json vision_feature_select_strategy={vision_feature_select_strategy!r} "
            "is not 'default' or 'full'"
        )
    fields = dict(
        image_size=get("image_size"),
        patch_dim=get("patch_size"),
        num_channels=get("num_channels"),
        hidden_size=get("hidden_size"),
        ffn_hidden_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        layernorm_epsilon=float(get("layer_norm_eps")),
        activation=_HF_ACTIVATIONS[act],
        vision_select_layer=vision_feature_layer,
        class_token_length=1 if vision_feature_select_strategy == "default" else 0,
    )
    return ClipConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------- modules


class ClipBlock(nnx.Module):
    """Pre-norm encoder block: h + attn(ln1(h)), then h + mlp(ln2(h)); bidirectional."""

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        dt = dict(
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            row_major_weight_grads=cfg.row_major_weight_grads,
        )
        init = nnx.initializers.normal(INIT_STD)
        E = cfg.hidden_size
        norm_dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.attn_norm = LayerNorm(E, eps=cfg.layernorm_epsilon, rngs=rngs, **norm_dt)
        self.attn = Attention(
            E,
            cfg.num_attention_heads,
            use_bias=True,
            rope_theta=None,
            causal=False,
            attention_impl=cfg.attention_impl,
            kernel_init=init,
            rngs=rngs,
            **dt,
        )
        self.mlp_norm = LayerNorm(E, eps=cfg.layernorm_epsilon, rngs=rngs, **norm_dt)
        self.mlp = Mlp(
            E,
            cfg.ffn_hidden_size,
            activation=cfg.activation,
            use_bias=True,
            kernel_init=init,
            rngs=rngs,
            **dt,
        )

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B, P, E] -> [B, P, E]."""
        _, a = self.attn(self.attn_norm(h))
        h = h + a
        h = h + self.mlp(self.mlp_norm(h))
        return constrain(h, ("act_batch", "act_length", "act_embed"))


class ClipVisionTower(nnx.Module):
    """Images [B, H, W, C] (CLIP-normalised, channels-last) -> features [B, P, E]."""

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        init = nnx.initializers.normal(INIT_STD)
        p, E = cfg.patch_dim, cfg.hidden_size
        # The stride-p conv as a matmul over each patch's (row, col, channel) pixels.
        self.patch_embed = Dense(
            (p, p, cfg.num_channels),
            E,
            axes=(None, None, None, "embed"),
            kernel_init=init,
            row_major_weight_grads=cfg.row_major_weight_grads,
            rngs=rngs,
            **dt,
        )
        self.class_embed = param(rngs, init, (E,), ("embed",), cfg.weight_dtype)
        self.pos_embed = Embed(
            cfg.num_patches + 1, E, axes=("position", "embed"), embedding_init=init, rngs=rngs, **dt
        )
        self.pre_norm = LayerNorm(E, eps=cfg.layernorm_epsilon, rngs=rngs, **dt)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> ClipBlock:
            return ClipBlock(cfg, rngs=rngs)

        self.layers = make_layers(rngs)

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> hidden_states[0] [B, 1+G*G, E]: patches, CLS, positions, pre-LN."""
        cfg = self.config
        B, Hpx, Wpx, C = images.shape
        if (Hpx, Wpx, C) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"images have shape {images.shape}, expected [B, {cfg.image_size}, "
                f"{cfg.image_size}, {cfg.num_channels}] (channels-last)"
            )
        g, p = cfg.grid, cfg.patch_dim
        patches = images.reshape(B, g, p, g, p, C).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, g * g, p, p, C)  # row-major patch order, like HF's conv
        x = self.patch_embed(patches)  # [B, G*G, E]
        cls = jnp.broadcast_to(self.class_embed[...].astype(x.dtype), (B, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.embedding[...].astype(x.dtype)
        return self.pre_norm(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> features of `vision_select_layer` [B, P, E]."""
        cfg = self.config
        h = constrain(self.embed(images), ("act_batch", "act_length", "act_embed"))
        h = self._apply_layers(h, cfg.num_blocks_used)
        return h[:, cfg.class_token_length :]

    def _apply_layers(self, h: jax.Array, n: int) -> jax.Array:
        """Runs the first `n` stacked blocks with lax.scan or an unrolled loop."""
        if n == 0:
            return h
        cfg = self.config
        graphdef, state = nnx.split(self.layers)
        state = jax.tree.map(lambda a: a[:n], state)  # only the blocks the features need

        def layer_fn(h: jax.Array, layer_state: nnx.State) -> jax.Array:
            return nnx.merge(graphdef, layer_state)(h)

        return apply_stacked(
            layer_fn, h, state, scan=cfg.scan_layers is not False, remat_policy=cfg.remat_policy
        )
