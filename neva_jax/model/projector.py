"""Projectors from vision features [.., E] to the LLM's embedding width [.., D].

Axis letters: E vision width, D model width.

- `linear`: one affine map E -> D (NeMo's / LLaVA-1's `linear`).
- `mlpNx_gelu` (N >= 2, e.g. LLaVA-1.5's `mlp2x_gelu`): Linear(E->D), then N-1 times
  [GELU, Linear(D->D)], with the exact erf GELU as PyTorch's `nn.GELU()`.
- `identity`: no parameters; needs E == D.

Parameters: `linear_{i}/kernel` [in, out] and `linear_{i}/bias` [out] for i = 1..N,
named like `transformers`' `multi_modal_projector.linear_{i}`. Kernels alternate
between ('embed', 'mlp') and ('mlp', 'embed') so consecutive layers are column- then
row-parallel under tensor parallelism.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from neva_jax.model.layers import Dense, Initializer

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(kind: str) -> int:
    """Number of linear layers of projector `kind` (0 for identity); raises on a bad name."""
    if kind == "identity":
        return 0
    if kind == "linear":
        return 1
    match = _MLP.match(kind)
    if match and int(match.group(1)) >= 2:
        return int(match.group(1))
    raise ValueError(f"projector={kind!r} is not 'linear', 'identity' or 'mlpNx_gelu' with N >= 2")


def _torch_linear_init(fan_in: int) -> Initializer:
    """PyTorch nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as LLaVA starts."""
    limit = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class Projector(nnx.Module):
    """Maps vision features [..., E] to LLM embeddings [..., D] (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        row_major_weight_grads: bool = False,
        rngs: nnx.Rngs,
    ):
        self.kind = kind
        self.depth = projector_depth(kind)
        if self.depth == 0 and in_features != out_features:
            raise ValueError(
                f"projector='identity' needs equal widths, got vision {in_features} and LLM {out_features}"
            )
        for i in range(self.depth):
            fan_in = in_features if i == 0 else out_features
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            init = _torch_linear_init(fan_in)
            layer = Dense(
                fan_in,
                out_features,
                axes=axes,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=init,
                bias_init=init,
                row_major_weight_grads=row_major_weight_grads,
                rngs=rngs,
            )
            setattr(self, f"linear_{i + 1}", layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., E] -> [..., D]."""
        for i in range(self.depth):
            if i > 0:
                x = jax.nn.gelu(x, approximate=False)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x
