"""Attention for the XLA path: exact softmax attention with a memory-light backward pass
and causal block skipping.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.

`attention` computes the same function as `jax.nn.dot_product_attention(...,
implementation="xla")` (float32 logits and softmax, masked logits set to a large
finite negative number so fully masked rows stay finite) with two differences in
how, not what:

- Backward pass (`jax.custom_vjp`): the residuals are q, k, v, the output and the
  per-row max and 1/sum of the softmax [B, K, G, T, 1], not the [B, N, T, S]
  probabilities; the backward
  recomputes the logits (one extra QK^T matmul) and uses the FlashAttention-2 form
  dS = P * (dP - rowsum(dO * O)). On CPU this removes most of the non-matmul work
  of autodiff through softmax, and the O(T * S) residual memory per layer.
- Causal block skipping: with `causal=True` the queries are cut into blocks and
  block i only reads keys [0, end of block i), so about half of QK^T and PV over
  masked keys is never computed. Each block's output is the exact softmax over its
  keys (the skipped keys are masked for every query of the block).

Inside, q, k, v are heads-major ([B, K, G, T, H], [B, K, S, H]: transposed once per
call): each product is then a batched matmul over (B, K) whose [T, S] operands are
used in the layout they are made in. With token-major operands ([B, T, K, G, H]) XLA
transposed the probabilities and score gradients of every block instead (7% of the
CPU bench's train step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Logit given to masked keys: finite (no NaN for fully masked rows), like the XLA
# path of jax.nn.dot_product_attention. Shared with `attention.cached_attention`.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_blocks(length: int, min_block: int = 128, max_blocks: int = 4) -> list[int]:
    """Block boundaries [b_1, ..., T] that cut `length` queries for causal skipping.

    Blocks are at least `min_block` long and at most `max_blocks` in number, and their
    boundaries are multiples of 8 where possible (friendlier matmul shapes).
    """
    if length <= min_block:
        return [length]
    n = min(max_blocks, max(1, length // min_block))
    size = math.ceil(length / n / 8) * 8
    ends = list(range(size, length, size))
    return [*ends, length]


def _logits(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q [B, K, G, T, H], k [B, K, S, H], mask [B, 1, T, S] -> masked float32 [B, K, G, T, S]."""
    scale = jnp.float32(q.shape[-1] ** -0.5)
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask[:, :, None], s, jnp.float32(MASKED_LOGIT))
    return s


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention q [B, K, G, T, H] over k, v [B, K, S, H] -> [B, K, G, T, H]."""
    return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    s = _logits(q, k, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / denom
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), v)
    # Row max and 1/sum kept apart (not as m + log(sum)): for a fully masked row m is
    # the huge masked logit and m + log(S) would round back to m.
    return out, (q, k, v, mask, out, m, 1.0 / denom)


def _attend_bwd(res, d_out):
    q, k, v, mask, out, m, inv_denom = res
    s = _logits(q, k, mask)
    probs = jnp.exp(s - m) * inv_denom  # [B, K, G, T, S]
    d_out32 = d_out.astype(jnp.float32)
    dv = jnp.einsum("BKGTS,BKGTH->BKSH", probs, d_out32)
    dp = jnp.einsum("BKGTH,BKSH->BKGTS", d_out32, v.astype(jnp.float32))
    delta = jnp.einsum("BKGTH,BKGTH->BKGT", d_out32, out.astype(jnp.float32))
    ds = probs * (dp - delta[..., None]) * jnp.float32(q.shape[-1] ** -0.5)
    if mask is not None:  # masked logits are constants (fully masked rows: uniform probs)
        ds = jnp.where(mask[:, :, None], ds, 0.0)
    dq = jnp.einsum("BKGTS,BKSH->BKGTH", ds, k.astype(jnp.float32))
    dk = jnp.einsum("BKGTS,BKGTH->BKSH", ds, q.astype(jnp.float32))
    d_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mask


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    min_block: int = 128,
) -> jax.Array:
    """Exact softmax attention: q [B, T, N, H], k, v [B, S, K, H] -> [B, T, N, H].

    mask [B, 1, T, S] bool (True = attend) or None. `causal=True` adds "key index <=
    query index" (T == S) and skips the key blocks it rules out; it may be combined
    with a mask (packed rows: same segment and causal positions).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    # Heads-major inside: every product below is then a plain batched matmul over
    # (B, K), whose large [T, S] operands (scores, probabilities and their gradients)
    # XLA never transposes; only q, k, v, the output and their gradients are, once.
    qh = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    if not causal:
        out = _attend(qh, kh, vh, mask)
    else:
        if T != S:
            raise ValueError(f"causal attention needs as many queries as keys, got {T} and {S}")
        outs, start = [], 0
        for end in causal_blocks(T, min_block):
            rows = jnp.arange(start, end)[:, None]
            cols = jnp.arange(end)[None, :]
            keep = (cols <= rows)[None, None]  # [1, 1, t, end]
            if mask is not None:
                keep = keep & mask[:, :, start:end, :end]
            q_block = qh[:, :, :, start:end]
            outs.append(_attend(q_block, kh[:, :, :end], vh[:, :, :end], keep))
            start = end
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
