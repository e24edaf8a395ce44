"""LLaMA-family decoder (LLaMA 2, Vicuna, NeMo GPT/nvgpt variants) in Flax NNX.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads,
H head dim, D model width, F FFN width, V vocab, L layers.

Parameter tree (logical axes in brackets; layers stacked along a leading L axis):
  embed/embedding             [V, D]        ('vocab', 'embed')
  pos_embed/embedding         [S, D]        ('position', 'embed')    learned_absolute only
  layers/attn_norm/scale      [L, D]        ('layers', 'norm')       (+ bias for layernorm)
  layers/attn/{q}/kernel      [L, D, N, H]  ('layers', 'embed', 'heads', 'head_dim')
  layers/attn/{k,v}/kernel    [L, D, K, H]  ('layers', 'embed', 'kv_heads', 'head_dim')
  layers/attn/o/kernel        [L, N, H, D]  ('layers', 'heads', 'head_dim', 'embed')
  layers/mlp_norm/scale       [L, D]
  layers/mlp/{gate,up}/kernel [L, D, F]     ('layers', 'embed', 'mlp')  (gate: swiglu only)
  layers/mlp/down/kernel      [L, F, D]     ('layers', 'mlp', 'embed')
  final_norm/scale            [D]
  lm_head/kernel              [D, V]        ('embed', 'vocab')       untied only
(`bias=True` adds `bias` next to each kernel, on the output axes.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neva_jax.model import lora, rope
from neva_jax.model.attention import Attention, FusedAttention, KVCache, make_attention_mask
from neva_jax.model.layers import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    NORMALIZATIONS,
    Dense,
    Embed,
    FusedMlp,
    Mlp,
    apply_stacked,
    checkpoint_policy,
    contract,
    make_norm,
)
from neva_jax.model.schema import FieldError, check_choice, check_runtime, key
from neva_jax.sharding import constrain

POSITION_EMBEDDINGS = ("rope", "learned_absolute")
# NeMo 1's spellings of the activations implemented here (its `activation` knob).
NEMO_ACTIVATIONS = {"fast-swiglu": "swiglu"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder architecture plus run-time choices, with NeMo's knob names.

    Fields made with `key()` are run-config keys `model.llm.<name>` (model/schema.py).
    """

    vocab_size: int = key(32000)
    hidden_size: int = key(4096)
    ffn_hidden_size: int = key(11008)
    num_layers: int = key(32)
    num_attention_heads: int = key(32)
    num_query_groups: int | None = key(None)  # GQA kv heads; 0 (stored as None) = one per head
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    encoder_seq_length: int = key(4096)  # max positions (size of a learned position table)
    position_embedding_type: str = key("rope")
    rope_theta: float = key(10000.0)
    rotary_percentage: float = key(1.0)  # NeMo: the share of each head dim that RoPE rotates
    # RoPE frequency scaling: "llama3" (LLaVA-NeXT-style Llama-3.1 LLMs) with the four
    # values of transformers' rope_parameters; "default" ignores them.
    rope_type: str = key("default")
    rope_factor: float = key(8.0)
    rope_low_freq_factor: float = key(1.0)
    rope_high_freq_factor: float = key(4.0)
    rope_original_max_position_embeddings: int = key(8192)
    normalization: str = key("rmsnorm")
    layernorm_epsilon: float = key(1e-5)
    activation: str = key("swiglu")  # also NeMo's "fast-swiglu" (stored as "swiglu")
    bias: bool = key(False)
    share_embeddings_and_output_weights: bool = key(False)  # tied LM head
    init_method_std: float = key(0.02)
    # Run-time choices.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "xla"  # xla | cudnn | auto (GPU only: attention.select_implementation)
    remat_policy: str = "none"  # none | full | selective
    # Training/no-cache calls: lax.scan over the stacked layers (True) or unrolled (False);
    # None: the platform's choice (`platform.resolve_runtime`), a model built with None scans.
    scan_layers: bool | None = None
    row_major_weight_grads: bool = False  # the XLA:CPU weight-gradient form (layers.Dense)

    def __post_init__(self):
        section = "model.llm"

        def fail(field: str, problem: str) -> None:
            raise FieldError(section, field, getattr(self, field), problem)

        # One spelling per meaning, so that configs and checkpoints compare equal.
        if self.activation in NEMO_ACTIVATIONS:
            object.__setattr__(self, "activation", NEMO_ACTIVATIONS[self.activation])
        if self.num_query_groups == 0:
            object.__setattr__(self, "num_query_groups", None)
        check_choice(section, self, "position_embedding_type", POSITION_EMBEDDINGS)
        check_choice(section, self, "normalization", NORMALIZATIONS)
        activations = GATED_ACTIVATIONS + tuple(NEMO_ACTIVATIONS) + tuple(ACTIVATIONS)
        check_choice(section, self, "activation", activations)
        check_choice(section, self, "rope_type", rope.ROPE_TYPES)
        check_runtime(section, self)
        if self.num_attention_heads % self.num_kv_heads:
            fail(
                "num_attention_heads", f"not a multiple of num_query_groups={self.num_query_groups}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size",
                f"not divisible by num_attention_heads={self.num_attention_heads}; set head_dim",
            )
        if not 0 < self.rotary_percentage <= 1 or int(self.head_size * self.rotary_percentage) % 2:
            fail(
                "rotary_percentage",
                f"must be in (0, 1] and rotate an even number of the {self.head_size} "
                "features per head",
            )
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        if self.rope_type == "llama3" and not (
            0 < low < high
            and self.rope_factor > 0
            and self.rope_original_max_position_embeddings > 0
        ):
            fail(
                "rope_type",
                "needs rope_factor > 0, 0 < rope_low_freq_factor < rope_high_freq_factor and "
                "rope_original_max_position_embeddings > 0",
            )

    @property
    def num_kv_heads(self) -> int:
        """K, the number of key/value heads."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """H, the per-head width."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling(self) -> rope.RopeScaling | None:
        """The RoPE frequency scaling for `attention.apply_rope` (None: plain RoPE)."""
        if self.rope_type == "default":
            return None
        return (
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_position_embeddings,
        )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def llama2_7b_chat(**overrides: Any) -> LlamaConfig:
    """LLaMA-2-7B(-Chat): 32 layers, width 4096, FFN 11008, 32 heads, vocab 32000."""
    return LlamaConfig(**overrides)


def llama2_13b_chat(**overrides: Any) -> LlamaConfig:
    """LLaMA-2-13B(-Chat): 40 layers, width 5120, FFN 13824, 40 heads, vocab 32000."""
    base = dict(hidden_size=5120, ffn_hidden_size=13824, num_layers=40, num_attention_heads=40)
    return LlamaConfig(**{**base, **overrides})


def vicuna_7b(**overrides: Any) -> LlamaConfig:
    """Vicuna-7B v1.5 (LLaVA-1.5's LLM): the LLaMA-2-7B shapes."""
    return llama2_7b_chat(**overrides)


def vicuna_13b(**overrides: Any) -> LlamaConfig:
    """Vicuna-13B v1.5: the LLaMA-2-13B shapes."""
    return llama2_13b_chat(**overrides)


def tiny(**overrides: Any) -> LlamaConfig:
    """A 2-layer, width-64 decoder with GQA (4 heads, 2 kv heads) for tests and demos."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        ffn_hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        encoder_seq_length=512,
    )
    return LlamaConfig(**{**base, **overrides})


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    """Maps a `transformers` LlamaConfig dict (config.json) onto LlamaConfig.

    Accepts both `rope_theta` / `rope_scaling` (transformers 4) and `rope_parameters`
    (transformers 5). RoPE scaling other than Llama 3.1's (`llama3`), and different
    attention/MLP bias settings, are refused rather than silently ignored.
    """
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json model_type={hf.get('model_type')!r} is not a LLaMA model")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
        )
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(
            f"config.json attention_bias={attn_bias} and mlp_bias={mlp_bias} differ; "
            "neva-jax has one `bias` switch"
        )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, hf["hidden_size"] // heads) else head_dim,
        encoder_seq_length=hf.get("max_position_embeddings", 4096),
        **rope.fields_from_hf(hf),
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        bias=attn_bias,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    return LlamaConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------- modules


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h)).

    `peft` (scheme `lora`) gives the projections it targets an adapter (`model/lora.py`).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, peft: lora.PeftConfig | None = None):
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        init = nnx.initializers.normal(cfg.init_method_std)
        norm = dict(eps=cfg.layernorm_epsilon, use_bias=True, rngs=rngs, **dt)
        self.attn_norm = make_norm(cfg.normalization, cfg.hidden_size, **norm)
        self.attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads,
            cfg.head_size,
            use_bias=cfg.bias,
            rope_theta=cfg.rope_theta if cfg.position_embedding_type == "rope" else None,
            rotary_percentage=cfg.rotary_percentage,
            rope_scaling=cfg.rope_scaling,
            attention_impl=cfg.attention_impl,
            row_major_weight_grads=cfg.row_major_weight_grads,
            kernel_init=init,
            rngs=rngs,
            **dt,
        )
        self.mlp_norm = make_norm(cfg.normalization, cfg.hidden_size, **norm)
        self.mlp = Mlp(
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            activation=cfg.activation,
            use_bias=cfg.bias,
            kernel_init=init,
            row_major_weight_grads=cfg.row_major_weight_grads,
            rngs=rngs,
            **dt,
        )
        if peft is not None and peft.enabled:
            lora.attach(self, peft, rngs=rngs)

    def __call__(
        self,
        h: jax.Array,
        *,
        positions: jax.Array,
        mask: jax.Array | None,
        kv: tuple[jax.Array, jax.Array] | None = None,
        write_at: jax.Array | None = None,
        queries: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, jax.Array] | None, jax.Array]:
        """h [B, T, D] -> (this layer's updated cache buffers or None, h).

        `kv` / `write_at`: this layer's cache buffers and the kind of cached call;
        `queries` [B, C]: only these positions are computed, h is then [B, C, D] (see
        `Attention.__call__`).
        """
        kv, a = self.attn(
            self.attn_norm(h),
            positions=positions,
            mask=mask,
            kv=kv,
            write_at=write_at,
            queries=queries,
        )
        if queries is not None:
            h = jnp.take_along_axis(h, queries[:, :, None], axis=1)
        h = h + a
        h = h + self.mlp(self.mlp_norm(h))
        return kv, constrain(h, ("act_batch", "act_length", "act_embed"))


class Llama(nnx.Module):
    """The decoder. Layers are stored stacked ([L, ...]) whatever `scan_layers` says.

    `llm.embed(input_ids)` gives token embeddings [B, T, D] in the compute dtype (the
    `Embed` submodule); `hidden_states(...)` the final-normed states; `logits(h)` the
    float32 LM head; `__call__` both. `peft`: LoRA adapters on the layers' projections
    (`model/lora.py`); None or scheme `none` builds none.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, peft: lora.PeftConfig | None = None):
        self.config = cfg
        self.peft = peft if peft is not None and peft.enabled else None
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        init = nnx.initializers.normal(cfg.init_method_std)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs, **dt)
        self.pos_embed = (
            Embed(
                cfg.encoder_seq_length,
                cfg.hidden_size,
                axes=("position", "embed"),
                embedding_init=init,
                rngs=rngs,
                **dt,
            )
            if cfg.position_embedding_type == "learned_absolute"
            else None
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs, peft=self.peft)

        self.layers = make_layers(rngs)
        self.final_norm = make_norm(
            cfg.normalization, cfg.hidden_size, eps=cfg.layernorm_epsilon, rngs=rngs, **dt
        )
        self.lm_head = (
            None
            if cfg.share_embeddings_and_output_weights
            else Dense(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                kernel_init=init,
                row_major_weight_grads=cfg.row_major_weight_grads,
                rngs=rngs,
                **dt,
            )
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (see `KVCache`)."""
        cfg = self.config
        return KVCache.create(
            cfg.num_layers,
            batch,
            max_len,
            cfg.num_kv_heads,
            cfg.head_size,
            dtype or cfg.compute_dtype,
        )

    def unstack_layers(self, *, fused: bool = True) -> tuple[DecoderLayer, ...]:
        """The stacked layers as L separate modules, each owning its weight slice.

        The slices are copies (the weights' memory once more). A decode loop takes them
        once, before it starts, and passes them to `prefill`/`decode` as `layers=` at
        every step: each step then reads every layer's weights in place instead of
        slicing (copying, on XLA:CPU) them out of the stacked [L, ...] arrays per step.
        `fused=True` (inference) also concatenates each layer's q/k/v kernels and its
        gate/up kernels, so that a step runs one matmul for each group instead of
        three and two (`FusedAttention`, `FusedMlp`); the values are the same. LoRA
        adapters are folded into their kernels first (`lora.merge_adapters`);
        `fused=False` keeps them as they are.
        """
        graphdef, state = nnx.split(self.layers)
        layers = []
        for i in range(self.config.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            if fused:
                with nnx.use_eager_sharding(False):  # plain arrays, placed like their inputs
                    lora.merge_adapters(layer)
                    layer.attn = FusedAttention(layer.attn)
                    if layer.mlp.gate is not None:
                        layer.mlp = FusedMlp(layer.mlp)
            layers.append(layer)
        return tuple(layers)

    def _inputs(self, input_ids: jax.Array | None, embeds: jax.Array | None) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype from exactly one of the two."""
        if (input_ids is None) == (embeds is None):
            raise ValueError("give exactly one of input_ids or embeds")
        if embeds is None:
            return self.embed(input_ids)
        return embeds.astype(self.config.compute_dtype)

    def _add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        stop_before_last: bool = False,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] of a whole sequence (no cache: training).

        Give exactly one of `input_ids` [B, T] or `embeds` [B, T, D]. `positions`
        [B, T] default to arange(T). `segment_ids` [B, T] (0 = padding, 1..k = packed
        samples) switch to an explicit mask; without them the attention is plainly
        causal. `stop_before_last=True` returns the last layer's input instead (not
        normed), for `last_layer`.
        """
        x = self._inputs(input_ids, embeds)
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = None
        if segment_ids is not None:
            mask = make_attention_mask(segment_ids, positions, segment_ids, positions)
        x = self._add_positions(x, positions)
        if stop_before_last:
            return self._scan_layers(x, positions, mask, self.config.num_layers - 1)
        return self.final_norm(self._scan_layers(x, positions, mask))

    def last_layer(
        self,
        h: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        queries: jax.Array | None = None,
    ) -> jax.Array:
        """The last decoder layer and the final norm over `hidden_states(...,
        stop_before_last=True)`: [B, T, D] -> final-normed [B, T, D], or with `queries`
        [B, C] only those positions of each row, [B, C, D] (their keys and values still
        come from every token; the same values as taking them from `hidden_states`).

        The training step asks only for the positions whose logits it computes: the
        last layer's q, o and MLP then run on C rows instead of T.
        """
        B, T = h.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        q_seg, q_pos = segment_ids, positions
        if queries is not None:
            q_seg = jnp.take_along_axis(segment_ids, queries, axis=1)
            q_pos = jnp.take_along_axis(positions, queries, axis=1)
        mask = make_attention_mask(q_seg, q_pos, segment_ids, positions)
        graphdef, state = nnx.split(self.layers)
        last = jax.tree.map(lambda a: a[-1], state)

        def layer_fn(h: jax.Array, layer_state: nnx.State) -> jax.Array:
            layer = nnx.merge(graphdef, layer_state)
            return layer(h, positions=positions, mask=mask, queries=queries)[1]

        if self.config.remat_policy != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=checkpoint_policy(self.config.remat_policy))
        return self.final_norm(layer_fn(h, last))

    def prefill(
        self,
        cache: KVCache,
        input_ids: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        layers: Sequence[DecoderLayer] | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """Runs T prompt tokens and writes their keys/values to columns [0, T) of `cache`.

        Returns (cache, final-normed hidden states [B, T, D]). Whatever `cache` held is
        forgotten: the queries attend over the new tokens alone (causal key blocks
        skipped, as in `hidden_states`). Rows of different lengths are left padded
        (`segment_ids` 0) with their own `positions` (default arange(T), segment ids
        default 1). `layers`: see `decode`.
        """
        x = self._inputs(input_ids, embeds)
        B, T = x.shape[:2]
        if cache.max_len < T:
            raise ValueError(f"prefill of {T} tokens into a cache of {cache.max_len} slots")
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = make_attention_mask(segment_ids, positions, segment_ids, positions)
        cache = cache.start_prefill(segment_ids, positions)
        x, cache = self._cached_layers(
            self._add_positions(x, positions), positions, mask, cache, None, layers
        )
        return cache, self.final_norm(x)

    def decode(
        self,
        cache: KVCache,
        input_ids: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        layers: Sequence[DecoderLayer] | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """Appends T new tokens per row (T = 1 for a decode step) after each row's cache.

        Each row writes at its own length and continues its own positions; the
        queries attend over everything the row has cached. Returns (cache, final-normed
        hidden states [B, T, D]).

        `layers` (from `unstack_layers`, inference only): per-layer weights sliced
        once by the caller, so a decode loop reads them in place; without it the
        weights are sliced from the stacked arrays in this call.
        """
        x = self._inputs(input_ids, embeds)
        B, T = x.shape[:2]
        positions = cache.next_positions()[:, None] + jnp.arange(T, dtype=jnp.int32)
        segment_ids = jnp.ones((B, T), jnp.int32)
        write_at = cache.lengths
        cache = cache.append(segment_ids, positions)
        mask = make_attention_mask(segment_ids, positions, cache.segment_ids, cache.positions)
        x, cache = self._cached_layers(
            self._add_positions(x, positions), positions, mask, cache, write_at, layers
        )
        return cache, self.final_norm(x)

    def _scan_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        num_layers: int | None = None,
    ) -> jax.Array:
        """The first `num_layers` (default all) stacked layers without a cache: lax.scan
        or an unrolled loop, remat per layer."""
        cfg = self.config
        graphdef, state = nnx.split(self.layers)
        n = cfg.num_layers if num_layers is None else num_layers
        if n < cfg.num_layers:
            state = jax.tree.map(lambda a: a[:n], state)

        def layer_fn(h: jax.Array, layer_state: nnx.State) -> jax.Array:
            _, h = nnx.merge(graphdef, layer_state)(h, positions=positions, mask=mask)
            return h

        return apply_stacked(
            layer_fn, x, state, scan=cfg.scan_layers is not False, remat_policy=cfg.remat_policy
        )

    def _cached_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache,
        write_at: jax.Array | None,
        layers: Sequence[DecoderLayer] | None,
    ) -> tuple[jax.Array, KVCache]:
        """The layers unrolled over the cache: layer i updates its own k/v buffers (in
        place inside a decode loop). `write_at=None` is a prefill (see `Attention`).
        Without `layers` the weights are sliced here; LoRA adapters then run unmerged."""
        if layers is None:
            layers = self.unstack_layers(fused=self.peft is None)
        if len(layers) != len(cache.k):
            raise ValueError(f"{len(layers)} layers for a cache of {len(cache.k)} layers")
        ks, vs = [], []
        for layer, k, v in zip(layers, cache.k, cache.v, strict=True):
            (k, v), x = layer(x, positions=positions, mask=mask, kv=(k, v), write_at=write_at)
            ks.append(k)
            vs.append(v)
        return x, cache.replace(k=tuple(ks), v=tuple(vs))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] (final-normed) -> float32 logits [B, T, V]."""
        if self.lm_head is None:
            return constrain(self.embed.attend(hidden), ("act_batch", "act_length", "act_vocab"))
        dtype = self.config.compute_dtype
        kernel = self.lm_head.kernel[...].astype(dtype)  # [D, V]
        if self.config.row_major_weight_grads and dtype == jnp.float32:
            out = contract(hidden.astype(dtype), kernel, 1)  # see layers.Dense
        else:
            out = jnp.einsum(
                "BTD,DV->BTV", hidden.astype(dtype), kernel, preferred_element_type=jnp.float32
            )
        return constrain(out, ("act_batch", "act_length", "act_vocab"))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] float32 of a whole sequence (see `hidden_states`)."""
        return self.logits(
            self.hidden_states(
                input_ids, embeds=embeds, positions=positions, segment_ids=segment_ids
            )
        )
