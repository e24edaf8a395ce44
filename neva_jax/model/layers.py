"""Leaf layers shared by the decoder and the vision tower: dense, norms, MLPs, embeddings.

Axis letters: B batch, T length, D model width, F FFN width, V vocab.

Every parameter is created through `nnx.with_partitioning` with logical axis names;
`neva_jax.sharding.LOGICAL_RULES` maps those names onto mesh axes. Parameters are
stored in `param_dtype` and cast to the compute `dtype` where they are used, so bf16
compute with fp32 master weights needs no special code path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
Shape = int | Sequence[int]

DEFAULT_INIT_STD = 0.02  # LLaMA / GPT initializer_range
DEFAULT_KERNEL_INIT = nnx.initializers.normal(DEFAULT_INIT_STD)
ZEROS_INIT = nnx.initializers.zeros_init()


def _as_tuple(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """Creates an `nnx.Param` of `shape` carrying the logical axis names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(nnx.with_partitioning(init, tuple(axes))(key, tuple(shape), dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """`jnp.tensordot(x, kernel, n_in)` with a CPU-friendly weight gradient.

    The kernel's gradient contracts x and dy over their batch dims. Left to itself,
    XLA:CPU writes the larger operand (often dy, e.g. [B*T, F] of an MLP) transposed
    and runs a slower generic dot on it. Here both are flattened to matrices first,
    x [B*T, in] and dy [B*T, out] (free reshapes of row-major arrays), and the
    gradient is one 2-D product x^T dy, which XLA:CPU's matmul reads with x transposed
    in place: no copy of either operand. That product is fast when its rows are the
    narrower side; when the output is narrower than the input (a LoRA A, an MLP's
    down projection) it computes dy^T x [out, in] and transposes the kernel-sized
    result (a rank-16 A's gradient: 6x faster). The same products and sums (in another
    order).
    """
    return jnp.tensordot(x, kernel, axes=n_in)


def _contract_fwd(x, kernel, n_in):
    return jnp.tensordot(x, kernel, axes=n_in), (x, kernel)


def _contract_bwd(n_in, res, dy):
    x, kernel = res
    nb = x.ndim - n_in
    dx = jnp.tensordot(dy, kernel, axes=(list(range(nb, dy.ndim)), list(range(n_in, kernel.ndim))))
    rows = math.prod(x.shape[:nb])
    x2, dy2 = x.reshape(rows, -1), dy.reshape(rows, -1)  # [B*T, in], [B*T, out]
    rows_only = (((0,), (0,)), ((), ()))  # contract the rows, no batch dims
    if dy2.shape[1] < x2.shape[1]:
        # The narrower operand's columns as the product's rows: [out, in], then
        # transposed. The barrier keeps XLA's algebraic simplifier from folding the
        # transpose into the product (the slow form); XLA:CPU drops the barrier itself
        # later, so the compiled program has the transpose and no barrier. Measured
        # with and without it, one core: rank-16 A gradient 0.38 vs 1.33 ms, [512, 128]
        # 2.3 vs 2.9 ms, equal for an MLP's down projection.
        dk_t = jax.lax.optimization_barrier(jax.lax.dot_general(dy2, x2, rows_only))
        dk = dk_t.T.reshape(kernel.shape)
    else:
        dk = jax.lax.dot_general(x2, dy2, rows_only).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)


class Dense(nnx.Module):
    """A linear map from `in_shape` trailing dims to `out_shape` dims (DenseGeneral).

    The kernel has shape `in_shape + out_shape` and logical axes `axes` (one name per
    kernel dim); the optional bias has shape `out_shape` with the output axes' names.
    E.g. a query projection: `Dense(D, (N, H), axes=('embed', 'heads', 'head_dim'))`
    maps [B, T, D] -> [B, T, N, H]; the output projection
    `Dense((N, H), D, axes=('heads', 'head_dim', 'embed'))` maps back.

    `row_major_weight_grads=True` computes the kernel's gradient with `contract` (one
    2-D matmul of the flattened input and output gradient): the fast form on XLA:CPU.
    False leaves the gradient to XLA, which GPU matmul libraries serve best (they take
    transposed operands as they are). The forward pass is the same either way; the
    caller chooses per backend (`neva_jax.platform`), the layer never asks.

    `lora`: an optional low-rank adapter (`model/lora.py: Adapter`, set by
    `lora.attach`) whose output is added to the layer's; None without one.
    """

    def __init__(
        self,
        in_shape: Shape,
        out_shape: Shape,
        *,
        axes: Sequence[str | None],
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = ZEROS_INIT,
        row_major_weight_grads: bool = False,
        rngs: nnx.Rngs,
    ):
        self.in_shape = _as_tuple(in_shape)
        self.out_shape = _as_tuple(out_shape)
        self.dtype = dtype
        self.row_major_weight_grads = row_major_weight_grads
        self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape, axes, param_dtype)
        out_axes = tuple(axes)[len(self.in_shape) :]
        self.bias = (
            param(rngs, bias_init, self.out_shape, out_axes, param_dtype) if use_bias else None
        )
        self.lora: nnx.Module | None = nnx.data(None)

    @classmethod
    def of(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        in_ndim: int = 1,
        dtype: jnp.dtype = jnp.float32,
        row_major_weight_grads: bool = False,
    ) -> Dense:
        """A Dense holding the given arrays (no logical axes: built for inference from
        other layers' weights, e.g. the fused projections of `FusedAttention`)."""
        shape = kernel.shape
        return cls(
            shape[:in_ndim],
            shape[in_ndim:],
            axes=(None,) * kernel.ndim,
            use_bias=bias is not None,
            dtype=dtype,
            param_dtype=kernel.dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            row_major_weight_grads=row_major_weight_grads,
            rngs=None,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Contracts the trailing `len(in_shape)` dims of `x` with the kernel."""
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"Dense expects trailing dims {self.in_shape}, got {x.shape}")
        kernel = self.kernel[...].astype(self.dtype)
        if self.row_major_weight_grads:
            y = contract(x.astype(self.dtype), kernel, n_in)
        else:
            y = jnp.tensordot(x.astype(self.dtype), kernel, axes=n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square norm (LLaMA): statistics in float32, then `scale * x`."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        axis_name: str = "norm",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(
            rngs, nnx.initializers.ones_init(), (features,), (axis_name,), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises the last axis of `x` [..., D]."""
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return y * self.scale[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with optional bias; `zero_centered_gamma` is NeMo's `layernorm1p`.

    Statistics are computed in float32. Used by CLIP (eps 1e-5, with bias) and by
    NeMo-style decoders (`normalization='layernorm'`/`'layernorm1p'`).
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        zero_centered_gamma: bool = False,
        axis_name: str = "norm",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.zero_centered_gamma = zero_centered_gamma
        scale_init = (
            nnx.initializers.zeros_init() if zero_centered_gamma else nnx.initializers.ones_init()
        )
        self.scale = param(rngs, scale_init, (features,), (axis_name,), param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros_init(), (features,), (axis_name,), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises the last axis of `x` [..., D]."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        scale = self.scale[...].astype(self.dtype)
        if self.zero_centered_gamma:
            scale = scale + 1
        y = y * scale
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


NORMALIZATIONS = ("rmsnorm", "layernorm", "layernorm1p")


def make_norm(
    kind: str,
    features: int,
    *,
    eps: float,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> RMSNorm | LayerNorm:
    """Builds the norm named by NeMo's `normalization` knob (see NORMALIZATIONS)."""
    if kind == "rmsnorm":
        return RMSNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind in ("layernorm", "layernorm1p"):
        return LayerNorm(
            features,
            eps=eps,
            use_bias=use_bias,
            zero_centered_gamma=kind == "layernorm1p",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    raise ValueError(f"normalization={kind!r} is not one of {NORMALIZATIONS}")


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def squared_relu(x: jax.Array) -> jax.Array:
    """NeMo's `squared-relu` activation relu(x)^2."""
    return jnp.square(jax.nn.relu(x))


# Non-gated activations by name; 'swiglu' is the gated SiLU handled by `Mlp`.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "squared-relu": squared_relu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
GATED_ACTIVATIONS = ("swiglu",)


class Mlp(nnx.Module):
    """Feed-forward block D -> F -> D.

    `activation='swiglu'`: down(silu(gate(x)) * up(x)) with parameters `gate`, `up`,
    `down` (LLaMA). Any name in ACTIVATIONS: down(act(up(x))) with `up`, `down`.
    Kernels: up/gate [D, F] ('embed', 'mlp'), down [F, D] ('mlp', 'embed'), i.e.
    column-parallel then row-parallel under tensor parallelism.
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        activation: str = "swiglu",
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        row_major_weight_grads: bool = False,
        rngs: nnx.Rngs,
    ):
        if activation not in GATED_ACTIVATIONS and activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not one of {GATED_ACTIVATIONS + tuple(ACTIVATIONS)}"
            )
        self.activation = activation
        kw = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            row_major_weight_grads=row_major_weight_grads,
            rngs=rngs,
        )
        self.gate = (
            Dense(features, hidden, axes=("embed", "mlp"), **kw)
            if activation in GATED_ACTIVATIONS
            else None
        )
        self.up = Dense(features, hidden, axes=("embed", "mlp"), **kw)
        self.down = Dense(hidden, features, axes=("mlp", "embed"), **kw)

    def hidden(self, x: jax.Array) -> jax.Array:
        """[..., D] -> the activations [..., F] that `down` maps back."""
        if self.gate is not None:
            return jax.nn.silu(self.gate(x)) * self.up(x)
        return ACTIVATIONS[self.activation](self.up(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        return self.down(self.hidden(x))


class FusedMlp(Mlp):
    """A gated `Mlp` whose gate and up projections are one [D, 2F] matmul (inference).

    Built from a trained `Mlp` (`FusedMlp(mlp)`); the same function, one weight read
    and one matmul instead of two: the decode form (`Llama.unstack_layers`).
    """

    def __init__(self, mlp: Mlp):
        if mlp.gate is None:
            raise ValueError(f"only a gated MLP has a gate to fuse, not {mlp.activation!r}")
        self.activation = mlp.activation
        self.gate, self.up, self.down = None, None, mlp.down
        g, u = mlp.gate, mlp.up
        bias = None
        if g.bias is not None:
            bias = jnp.concatenate([g.bias[...], u.bias[...]], axis=-1)
        self.gate_up = Dense.of(
            jnp.concatenate([g.kernel[...], u.kernel[...]], axis=-1),
            bias,
            dtype=g.dtype,
            row_major_weight_grads=g.row_major_weight_grads,
        )

    def hidden(self, x: jax.Array) -> jax.Array:
        """[..., D] -> silu(gate) * up [..., F] from the one fused matmul."""
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return jax.nn.silu(gate) * up


class Embed(nnx.Module):
    """Token (or position) embedding table [V, D] with axes ('vocab', 'embed').

    `attend(x)` multiplies by the transposed table, for a tied LM head.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str, str] = ("vocab", "embed"),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        embedding_init: Initializer = DEFAULT_KERNEL_INIT,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.dtype = dtype
        self.embedding = param(rngs, embedding_init, (num_embeddings, features), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] int -> [B, T, D] in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> float32 logits [B, T, V]."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum(
            "BTD,VD->BTV", x.astype(self.dtype), table, preferred_element_type=jnp.float32
        )


def checkpoint_policy(name: str) -> Any:
    """The jax.checkpoint policy for `remat_policy` (None = save nothing: full remat)."""
    if name == "selective":
        # Keep the projection/MLP matmul outputs (no batch dims); recompute the
        # attention scores and softmax (batched dots) and elementwise ops.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def apply_stacked(
    layer_fn: Callable[[jax.Array, Any], jax.Array],
    x: jax.Array,
    state: Any,
    *,
    scan: bool,
    remat_policy: str,
) -> jax.Array:
    """`x` through the layers whose parameters `state` holds stacked ([L, ...] leaves):
    `layer_fn(x, one layer's state) -> x`, remat per layer under `remat_policy`.

    `scan=True` is one `lax.scan` (compile time independent of depth). Unrolled, the
    stack is taken apart once with `lax.unstack`, whose transpose is one concatenate:
    indexing `a[i]` per layer would make the weight gradient a sum of L zero-padded
    [L, ...] arrays, and a scan writes every layer's saved activations into [L, ...]
    buffers that the unrolled form never builds.
    """
    if remat_policy != "none":
        layer_fn = jax.checkpoint(
            layer_fn, policy=checkpoint_policy(remat_policy), prevent_cse=not scan
        )
    if scan:
        x, _ = jax.lax.scan(lambda h, s: (layer_fn(h, s), None), x, state)
        return x
    leaves, treedef = jax.tree.flatten(state)
    per_layer = zip(*(jax.lax.unstack(a) for a in leaves), strict=True)
    for layer_leaves in per_layer:
        x = layer_fn(x, jax.tree.unflatten(treedef, layer_leaves))
    return x
