"""Rotary position embeddings: frequencies (with Llama 3.1's scaling), their
application to q/k, and the mapping from `transformers`' RoPE settings.

Axis letters: B batch, T length, N heads, H head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "llama3")  # llama3: Llama 3.1's frequency scaling (transformers)

# Llama 3.1's RoPE frequency scaling (transformers' `rope_type: llama3`):
# (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
RopeScaling = tuple[float, float, float, int]


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2], float32, as `transformers` computes them.

    `scaling` (Llama 3.1, `_compute_llama3_parameters`): wavelengths shorter than
    original / high_freq_factor are kept, those longer than original / low_freq_factor
    divided by `factor`, the ones between interpolated smoothly; every step in float32,
    in transformers' order.
    """
    f32 = np.float32
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(f32) / f32(rotary_dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponents)).astype(f32)
    if scaling is None:
        return inv_freq
    factor, low, high, original = scaling
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    wavelen = (f32(2 * np.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(original) / wavelen - f32(low)) / f32(high - low)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def _materialized(table: jax.Array) -> jax.Array:
    """`table` [..., F] float32, unchanged (times the identity: x * 1 plus zeros, exact
    for finite values), as the output of a matmul, which XLA does not fuse into the
    table's consumers.

    The cosine and sine tables are [B, T, rot/2], their consumers [B, T, N, rot/2]:
    fused, XLA:CPU recomputes both transcendentals for every head of every element it
    writes (N times over, in each q and k rotation and in their backward passes),
    about 3% of the bench's train step. `jax.lax.optimization_barrier` does not stop
    it: XLA removes barriers before fusion. Identical tables (q and k, every layer)
    are one computation after XLA's common-subexpression elimination.
    """
    eye = jnp.eye(table.shape[-1], dtype=table.dtype)
    return jnp.einsum("...F,FG->...G", table, eye, precision="highest")


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    theta: float,
    rotary_dim: int,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotary embedding, Hugging Face `rotate_half` convention (no q/k permutation needed).

    x [B, T, N, H], positions [B, T] int. The first `rotary_dim` features of each head
    are rotated (NeMo's `rotary_percentage` < 1 leaves the rest untouched, as Megatron's
    `apply_rotary_pos_emb`); the two halves of that block form the (real, imaginary)
    pairs. `scaling`: Llama 3.1's frequency scaling (`rope_inv_freq`).
    """
    inv_freq = jnp.asarray(rope_inv_freq(rotary_dim, theta, scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    cos, sin = (_materialized(t)[:, :, None, :] for t in (jnp.cos(freqs), jnp.sin(freqs)))
    half = rotary_dim // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:rotary_dim].astype(jnp.float32)
    # x * [cos, cos] + rotate_half(x) * [sin, sin], one half at a time: the same products
    # and sums, with each angle's cosine and sine taken once instead of twice.
    parts = [(x1 * cos - x2 * sin).astype(x.dtype), (x2 * cos + x1 * sin).astype(x.dtype)]
    if x.shape[-1] > rotary_dim:
        parts.append(x[..., rotary_dim:])
    return jnp.concatenate(parts, axis=-1)


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """LlamaConfig's RoPE fields from a `transformers` config dict: `rope_parameters`
    (transformers 5: rope_type, rope_theta, factor, ...) or `rope_theta` beside
    `rope_scaling` (transformers 4). A RoPE type not in ROPE_TYPES is a ValueError."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json rope_type={rope_type!r} is not supported ({', '.join(ROPE_TYPES)})"
        )
    out = dict(
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type,
    )
    if rope_type == "llama3":
        out.update(
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    return out
