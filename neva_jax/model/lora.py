"""LoRA adapters on the decoder's linear layers (`flax.nnx.LoRA`), and folding them in.

`PeftConfig` (run-config keys `model.peft.*`) says which of the decoder's `Dense`
layers get an adapter; `attach` gives each of them one, `Dense.lora`, an `Adapter`:
flax's `nnx.LoRA` (parameters `lora_a` [in, r] and `lora_b` [r, out] of type
`nnx.LoRAParam`, forward `x @ lora_a @ lora_b`) with the input flattened to the
kernel's input dims, the output scaled by alpha / r and shaped back, and optional
dropout on the adapter's input (`dropout`: 16-bit draws). B starts at zero, so a fresh adapter
changes nothing. In the stacked decoder the adapters are stacked like the kernels
([L, in, r], [L, r, out]) and scanned with them.

Target names (`target_modules`), mapped onto the decoder's projections:

| name | projections |
|---|---|
| NeMo `attention_qkv` (default), `attention_dense`, `mlp_fc1`, `mlp_fc2` | q, k, v / o / gate, up / down |
| NeMo `attention`, `mlp`, `all`; LLaVA `all_linear` (every linear but `lm_head`) | q, k, v, o / gate, up, down / all seven |
| PEFT `q_proj` `k_proj` `v_proj` `o_proj` `gate_proj` `up_proj` `down_proj` | that one |

`merge_adapters` folds adapters into their kernels (W + alpha/r * A @ B): the decode
form (`Llama.unstack_layers`) and the merged export use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neva_jax.model.layers import Dense, contract
from neva_jax.model.schema import FieldError, check_choice, key

SCHEMES = ("none", "lora")
# Decoder projection -> (submodule of the decoder layer, Dense attribute).
PROJECTIONS = {
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "o": ("attn", "o"),
    "gate": ("mlp", "gate"),
    "up": ("mlp", "up"),
    "down": ("mlp", "down"),
}
# PEFT / transformers module name of each projection (LlamaDecoderLayer).
HF_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_ALL = tuple(PROJECTIONS)
TARGETS: dict[str, tuple[str, ...]] = {
    # NeMo 1.x NeVA PEFT (`lora_tuning.target_modules`).
    "attention_qkv": ("q", "k", "v"),
    "attention_dense": ("o",),
    "mlp_fc1": ("gate", "up"),
    "mlp_fc2": ("down",),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all": _ALL,
    # LLaVA-1.5 finetune_lora.sh: every nn.Linear of the LLM except lm_head.
    "all_linear": _ALL,
    # PEFT / transformers names, one projection each.
    **{hf: (ours,) for ours, hf in HF_NAMES.items()},
}
# A's initialiser by NeMo's `column_init_method` name (B is always zero).
A_INITS = {
    # NeMo's default: torch.nn.init.xavier_normal_.
    "xavier": jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
    # PEFT's (LLaVA's) default: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
    "kaiming": jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}
ADAPTER = "lora"  # the attribute name of a Dense's adapter (a path element of its params)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning of the decoder: run-config keys `model.peft.<name>`.

    NeMo 1.x calls these `peft.peft_scheme`, `lora_tuning.adapter_dim`, `.alpha`,
    `.adapter_dropout`, `.target_modules`, `.column_init_method`; PEFT `r`,
    `lora_alpha`, `lora_dropout`, `target_modules`.
    """

    scheme: str = key("none")  # none | lora
    rank: int = key(32)  # r (NeMo adapter_dim)
    alpha: float | None = key(None)  # the output is scaled by alpha / r; None = r (scale 1)
    dropout: float = key(0.0)  # on each adapter's input, training only
    target_modules: tuple[str, ...] = key(("attention_qkv",))  # see TARGETS
    a_init: str = key("xavier")  # A's initialiser: xavier (NeMo) | kaiming (PEFT, LLaVA)

    def __post_init__(self):
        section = "model.peft"
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_choice(section, self, "scheme", SCHEMES)
        check_choice(section, self, "a_init", tuple(A_INITS))
        if self.rank < 1:
            raise FieldError(section, "rank", self.rank, "must be >= 1")
        if self.alpha is not None and self.alpha <= 0:
            raise FieldError(section, "alpha", self.alpha, "must be > 0 (or None = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError(section, "dropout", self.dropout, "must be in [0, 1)")
        unknown = [t for t in self.target_modules if t not in TARGETS]
        if unknown or (self.enabled and not self.target_modules):
            raise FieldError(
                section,
                "target_modules",
                self.target_modules,
                f"expected names from {', '.join(TARGETS)}",
            )

    @property
    def enabled(self) -> bool:
        """Whether the decoder has adapters."""
        return self.scheme == "lora"

    @property
    def scale(self) -> float:
        """alpha / r, the factor on the adapters' output."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def projections(self) -> tuple[str, ...]:
        """The decoder projections (keys of PROJECTIONS) with adapters, in table order."""
        if not self.enabled:
            return ()
        chosen = {p for t in self.target_modules for p in TARGETS[t]}
        return tuple(p for p in PROJECTIONS if p in chosen)


class DropoutKey(nnx.Variable):
    """The key of an adapter's dropout mask in one training step (never saved)."""


class Adapter(nnx.LoRA):
    """`nnx.LoRA` on a `Dense`'s flattened input and output dims, scaled by alpha / r.

    Where its Dense computes weight gradients row-major (`row_major_weight_grads`, the
    XLA:CPU choice of `neva_jax.platform`), the two products x @ A and (x A) @ B run
    through `layers.contract` like the Dense's own: XLA:CPU otherwise gives A's and
    B's gradients its slow transposed-operand form, which made a LoRA step slower than
    a full fine-tuning step (docs/LORA.md "Speed"). Elsewhere `nnx.LoRA`'s forward runs.
    """

    def __init__(self, dense: Dense, cfg: PeftConfig, *, rngs: nnx.Rngs):
        axes = dense.kernel.get_metadata().get("out_sharding") or (None,) * dense.kernel.ndim
        n_in = len(dense.in_shape)
        self.in_shape, self.out_shape = dense.in_shape, dense.out_shape
        self.scale = cfg.scale
        self.row_major_weight_grads = dense.row_major_weight_grads
        super().__init__(
            math.prod(dense.in_shape),
            cfg.rank,
            math.prod(dense.out_shape),
            dtype=dense.dtype,
            param_dtype=dense.kernel.dtype,
            a_initializer=A_INITS[cfg.a_init],
            rngs=rngs,
            # A flattened dim is split like its leading axis (heads-major for N*H).
            a_metadata={"out_sharding": (axes[0], None)},
            b_metadata={"out_sharding": (None, axes[n_in])},
        )
        self.dropout = cfg.dropout if cfg.dropout > 0 else None
        self.dropout_key: DropoutKey | None = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in_shape] -> alpha/r * dropout(x) @ A @ B, shaped [..., *out_shape]."""
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x = x.reshape(*lead, -1)
        if self.dropout is not None and self.dropout_key is not None:
            x = dropout(x, self.dropout_key[...], self.dropout)
        if self.row_major_weight_grads:
            x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
            y = contract(contract(x, a, 1), b, 1)
        else:
            y = super().__call__(x)
        y = y * jnp.asarray(self.scale, y.dtype)
        return y.reshape(*lead, *self.out_shape)

    def delta(self) -> jax.Array:
        """alpha/r * A @ B in the kernel's shape ([L, ...] for stacked adapters), float32."""
        a = self.lora_a[...]
        shape = (*a.shape[:-2], *self.in_shape, *self.out_shape)
        return lora_delta(a, self.lora_b[...], self.scale, shape)


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of x [..., D]: each element is zeroed with probability
    round(rate * 2^16) / 2^16 (0.05 -> 0.0500031) and the rest scaled by 1 / (1 - rate).

    Each 32-bit random word gives two 16-bit draws (its low and high halves), so a mask
    costs half the random words of `jax.random.bernoulli` (one per element). On CPU
    the random words are the cost of LoRA dropout: seven masks per layer and step
    (docs/LORA.md "Speed"). They are `jax.random.bits` over the array's global shape
    (`random_words`), so the mask is the same however x is sharded.
    """
    *lead, d = x.shape
    words = random_words(key, (*lead, (d + 1) // 2))
    draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :d]
    keep = draws >= jnp.uint32(round(rate * 2**16))
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def random_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 [*shape], equal to `jax.random.bits(key, shape, jnp.uint32)`.

    For a threefry key (JAX's default) with `jax_threefry_partitionable` (its default
    since 0.5), those bits are Threefry-2x32 (20 rounds) of each element's row-major
    index, the two output words xor-ed; this writes the rounds out. JAX lowers them
    on CPU as a 5-step loop that writes both words to memory after every 4 rounds;
    unrolled, XLA fuses the whole hash, and the mask made from it, into one loop (7x
    faster for a [4, 384, 704] draw). Being elementwise over the global index, it
    splits across devices like the array. Other keys, and arrays of 2^32 elements or
    more (a second index word), go to `jax.random.bits`.
    """
    n = math.prod(shape)
    impl = str(jax.random.key_impl(key))
    if "threefry" not in impl or n >= 2**32 or not jax.config.jax_threefry_partitionable:
        return jax.random.bits(key, shape, jnp.uint32)
    k0, k1 = jax.random.key_data(key)
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    index = jnp.zeros(shape, jnp.uint32)  # row-major: sum of iota * stride
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
        stride *= shape[dim]
    x0 = jnp.broadcast_to(ks[0], shape)  # the index's high word (0) + ks[0]
    x1 = index + ks[1]
    for group in range(5):
        for r in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0 ^ x1


def lora_delta(a: jax.Array, b: jax.Array, scale: float, shape: tuple[int, ...]) -> jax.Array:
    """scale * A @ B (float32, full precision) reshaped to the kernel's `shape`.

    a [..., in, r], b [..., r, out] (leading dims: stacked layers).
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return (jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * scale).reshape(shape)


def attach(layer: nnx.Module, cfg: PeftConfig, *, rngs: nnx.Rngs) -> None:
    """Gives the targeted projections of one decoder layer an adapter (in place).

    Called while the layer is built (inside the stacking `nnx.vmap`), after its own
    weights, so that the base weights are drawn as without adapters.
    """
    for name in cfg.projections:
        part, attr = PROJECTIONS[name]
        dense = getattr(getattr(layer, part), attr, None)
        if dense is not None:  # e.g. no `gate` in a non-gated MLP
            dense.lora = Adapter(dense, cfg, rngs=rngs)


def adapters(module: nnx.Module) -> Iterator[tuple[tuple[Any, ...], Adapter]]:
    """(path, adapter) of every adapter under `module`."""
    for path, m in nnx.iter_modules(module):
        if isinstance(m, Adapter):
            yield path, m


def merged_kernel(dense: Dense) -> jax.Array:
    """The kernel with the adapter folded in (W + alpha/r * A @ B), in the kernel's dtype."""
    kernel = dense.kernel[...]
    if dense.lora is None:
        return kernel
    return (kernel.astype(jnp.float32) + dense.lora.delta()).astype(kernel.dtype)


def merge_adapters(module: nnx.Module) -> None:
    """Folds every adapter under `module` into its kernel and drops it (in place)."""
    for _, m in list(nnx.iter_modules(module)):
        if isinstance(m, Dense) and m.lora is not None:
            m.kernel.set_value(merged_kernel(m))
            m.lora = None


def set_dropout_keys(module: nnx.Module, key: jax.Array) -> None:
    """Gives every adapter with dropout its own mask key for this call (in place).

    Stacked adapters get one key per layer, so a scanned layer draws its own mask.
    Called on the model that a training step merges (the keys are never saved).
    """
    for i, (_, adapter) in enumerate(adapters(module)):
        if adapter.dropout is None:
            continue
        lead = adapter.lora_a.shape[:-2]
        keys = jax.random.split(jax.random.fold_in(key, i), math.prod(lead))
        adapter.dropout_key = DropoutKey(keys.reshape(lead) if lead else keys[0])


def merge_params(params: Mapping[str, Any], cfg: PeftConfig) -> dict[str, Any]:
    """A nested parameter dict with every `lora` subtree folded into its kernel.

    `params` holds kernels and adapters as arrays (or on devices); the result has the
    layout of the same model without adapters (scheme `none`).
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Mapping) and ADAPTER in value and "kernel" in value:
            rest = {k: v for k, v in value.items() if k != ADAPTER}
            kernel, ab = rest["kernel"], value[ADAPTER]
            delta = lora_delta(ab["lora_a"], ab["lora_b"], cfg.scale, kernel.shape)
            merged = jnp.asarray(kernel, jnp.float32) + delta
            out[name] = {**rest, "kernel": merged.astype(kernel.dtype)}
        elif isinstance(value, Mapping):
            out[name] = merge_params(value, cfg)
        else:
            out[name] = value
    return out
