"""Multi-head / grouped-query attention with RoPE and a preallocated KV cache.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads,
H head dim, D model width, L layers.

The attention core is `jax.nn.dot_product_attention` with cuDNN (layout BTNH, GQA
native) and, on the XLA path, `dense_attention.attention` (the same function with a
memory-light backward pass and causal key blocks skipped); over a KV cache it is
`cached_attention`, the same arithmetic for the cache's heads-major layout (a decode
step then reads the cache in place instead of transposing it). Masks follow
docs/CONTRACTS.md: a query attends to keys with the same non-zero segment id and a
position <= its own; a causal layer also never attends to a later index (packed rows
satisfy both). Without segment ids or a cache the causal mask is expressed with
`is_causal` (no materialised mask, cuDNN flash friendly); otherwise an explicit
boolean mask [B, 1, T, S] is passed. Fully masked rows (padding queries) stay
finite: every path masks with a large finite negative number, so such rows attend
uniformly (on the XLA path, over their causal block) and never produce NaNs; no
real token reads them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neva_jax.model import dense_attention
from neva_jax.model.layers import DEFAULT_KERNEL_INIT, Dense, Initializer

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def select_implementation(
    attention_impl: str,
    dtype: jnp.dtype,
    head_dim: int,
    *,
    q_len: int = 2,
    kv_len: int = 2,
    has_mask: bool = False,
) -> str:
    """Resolves the `attention_impl` knob to the `implementation` of dot_product_attention.

    `auto` picks cuDNN flash attention when the backend is a GPU, the compute dtype
    is bf16/fp16, the head dim is one cuDNN supports (multiple of 8, <= 128) and, with
    an explicit mask (which cuDNN takes as a bias), both lengths are even (cuDNN's
    rule for a bias in training; odd lengths such as 1-token decode steps go to XLA).
    Everywhere else (CPU, fp32) it picks XLA. `cudnn` is honoured as asked (it
    raises where cuDNN is missing or the shape is unsupported); `xla` always works.
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if attention_impl != "auto":
        return attention_impl
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and not (has_mask and (q_len % 2 or kv_len % 2))
    )
    return "cudnn" if cudnn_ok else "xla"


# ---------------------------------------------------------------------------- RoPE


def rope_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2], float32, as `transformers` computes them."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, rotary_dim: int) -> jax.Array:
    """Rotary embedding, Hugging Face `rotate_half` convention (no q/k permutation needed).

    x [B, T, N, H], positions [B, T] int. The first `rotary_dim` features of each head
    are rotated (NeMo's `rotary_percentage` < 1 leaves the rest untouched); the two
    halves of that block form the (real, imaginary) pairs.
    """
    inv_freq = jnp.asarray(rope_inv_freq(rotary_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rot]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x_rot, x_pass = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ---------------------------------------------------------------------------- masks


def make_attention_mask(
    q_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_segment_ids: jax.Array,
    kv_positions: jax.Array,
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same non-zero segment and key position <= query position.

    q_* are [B, T], kv_* are [B, S]. Covers packed rows, left/right padding (segment 0)
    and a KV cache (whose empty slots carry segment 0).
    """
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = kv_segment_ids[:, None, :] != 0
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return (same & real & causal)[:, None, :, :]


# ---------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Preallocated KV cache for all layers (static shapes; one write slot for the batch).

    k, v: either stacked, [L, B, K, S, H], or per layer, a tuple of L arrays
    [B * K, S, H] (rows and kv heads merged; `create(..., per_layer=True)` or
    `unstack()`), in the compute dtype, heads before slots so that a decode step
    reads each head's keys as one contiguous [S, H] block (no transposed copy of the
    cache per step; see `cached_attention`). The per-layer form is the decode form:
    each layer's buffer is its own loop-carried value that a step updates in place
    and attends over directly; no per-step slicing of a stacked array, and with its
    single batch axis no reshape between the update and the attention (with a batch
    of 1, a [1, K, S, H] buffer would be reshaped for the attention, and XLA then
    copies the whole buffer every step). segment_ids, positions: [B, S] int32 of the
    cached tokens (segment 0 marks empty slots and left padding). index: [] int32,
    the next slot to write; a call with T tokens writes slots [index, index + T).
    Rows with different prompt lengths are left padded so they share `index`.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
        *,
        per_layer: bool = False,
    ) -> KVCache:
        """An empty cache: zeros, segment ids 0, index 0 (k/v per layer if asked)."""
        if per_layer:
            shape = (batch * num_kv_heads, max_len, head_dim)
            k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        else:
            shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
            k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        return cls(
            k=k,
            v=v,
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.segment_ids.shape[1]

    @property
    def per_layer(self) -> bool:
        """True when k/v are tuples of per-layer arrays rather than stacked arrays."""
        return isinstance(self.k, tuple)

    def unstack(self) -> KVCache:
        """The same cache with k/v as tuples of per-layer [B * K, S, H] arrays."""
        if self.per_layer:
            return self

        def layers(x: jax.Array) -> tuple[jax.Array, ...]:
            L, B, K, S, H = x.shape
            return tuple(x[i].reshape(B * K, S, H) for i in range(L))

        return self.replace(k=layers(self.k), v=layers(self.v))

    def next_positions(self) -> jax.Array:
        """[B] int32: one past the largest cached position of each row (0 when empty)."""
        cached = jnp.where(self.segment_ids != 0, self.positions, -1)
        return jnp.max(cached, axis=1) + 1

    def append_tokens(self, segment_ids: jax.Array, positions: jax.Array) -> KVCache:
        """Records the segment ids/positions [B, T] of T new tokens and advances index.

        The per-layer k/v are written by the layers themselves (`Attention`).
        """
        start = (jnp.zeros((), jnp.int32), self.index)
        return self.replace(
            segment_ids=jax.lax.dynamic_update_slice(
                self.segment_ids, segment_ids.astype(jnp.int32), start
            ),
            positions=jax.lax.dynamic_update_slice(
                self.positions, positions.astype(jnp.int32), start
            ),
            index=self.index + segment_ids.shape[1],
        )


def write_kv(
    cache_kv: jax.Array, new_kv: jax.Array, index: jax.Array, layer: jax.Array | None = None
) -> jax.Array:
    """Writes new_kv [B, T, K, H] at slot `index` of one layer's cache, in place.

    The cache is one layer's [B, K, S, H], one layer's per-layer (merged) [B * K, S, H],
    or, with `layer`, that layer of the stacked cache [L, B, K, S, H].
    """
    zero = jnp.zeros((), jnp.int32)
    B, T, K, H = new_kv.shape
    new_kv = jnp.swapaxes(new_kv, 1, 2).astype(cache_kv.dtype)  # [B, K, T, H]
    if layer is not None:
        start = (jnp.asarray(layer, jnp.int32), zero, zero, index, zero)
        return jax.lax.dynamic_update_slice(cache_kv, new_kv[None], start)
    if cache_kv.ndim == 3:
        new_kv = new_kv.reshape(B * K, T, H)
        return jax.lax.dynamic_update_slice(cache_kv, new_kv, (zero, index, zero))
    return jax.lax.dynamic_update_slice(cache_kv, new_kv, (zero, zero, index, zero))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of q [B, T, N, H] over one layer's cache -> [B, T, N, H].

    k, v: [B, K, S, H], or the per-layer form [B * K, S, H] (see `KVCache`). mask
    [B, 1, T, S] bool. The same arithmetic as `jax.nn.dot_product_attention`'s
    XLA path (logits and softmax in float32, masked logits set to a large finite
    negative number, scale 1/sqrt(H)). The einsums keep the cache as the operand in
    its stored order ([S, H] per head, then [S, H] again for the values), so XLA
    reads the cache in place instead of transposing or reshaping it on every decode
    step; only the T*G queries per kv head (G = N / K) are rearranged.
    """
    B, T, N, H = q.shape
    merged = k.ndim == 3
    K = k.shape[0] // B if merged else k.shape[1]
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    if merged:
        q = q.reshape(B * K, T * G, H)
        logits = jnp.einsum("CSH,CQH->CQS", k, q, preferred_element_type=jnp.float32)
        logits = logits.reshape(B, K, T * G, -1)
    else:
        logits = jnp.einsum("BKSH,BKQH->BKQS", k, q, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(H**-0.5)
    keep = jnp.broadcast_to(mask[:, :, :, None, :], (B, 1, T, G, mask.shape[-1]))
    masked = jnp.float32(dense_attention.MASKED_LOGIT)
    logits = jnp.where(keep.reshape(B, 1, T * G, -1), logits, masked)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if merged:
        out = jnp.einsum("CQS,CSH->CQH", probs.reshape(B * K, T * G, -1), v)
        out = out.reshape(B, K, T * G, H)
    else:
        out = jnp.einsum("BKQS,BKSH->BKQH", probs, v)  # [B, K, T*G, H]
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


# ---------------------------------------------------------------------------- module


class Attention(nnx.Module):
    """Self-attention: q/k/v projections, optional RoPE, GQA, output projection.

    Parameters (logical axes): q/kernel [D, N, H] ('embed', 'heads', 'head_dim'),
    k/kernel and v/kernel [D, K, H] ('embed', 'kv_heads', 'head_dim'),
    o/kernel [N, H, D] ('heads', 'head_dim', 'embed'); biases, when `use_bias`, on the
    output axes. Q/K/V are column-parallel and O row-parallel under tensor parallelism.
    `rope_theta=None` disables RoPE (CLIP, learned absolute positions); `causal=False`
    gives bidirectional attention (CLIP).
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        use_bias: bool = False,
        rope_theta: float | None = 10000.0,
        rotary_percentage: float = 1.0,
        causal: bool = True,
        attention_impl: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or features // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.rotary_dim = int(head_dim * rotary_percentage) // 2 * 2
        self.causal = causal
        self.attention_impl = attention_impl
        self.dtype = dtype
        kw = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.q = Dense(features, (num_heads, head_dim), axes=("embed", "heads", "head_dim"), **kw)
        self.k = Dense(
            features, (num_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), **kw
        )
        self.v = Dense(
            features, (num_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), **kw
        )
        self.o = Dense((num_heads, head_dim), features, axes=("heads", "head_dim", "embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        cache_layer: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, D] -> [B, T, D].

        positions [B, T]: RoPE positions (default arange(T)). mask [B, 1, T, S] bool:
        the complete mask (causality included), e.g. from `make_attention_mask`; when
        None the attention is causal (or full when `causal=False`) over x itself.
        cache_kv: this layer's cache (k, v), each [B, K, S, H] or, in the per-layer
        form of `KVCache`, [B * K, S, H]; the new keys/values are
        written at `cache_index` and the queries attend over the whole cache (a mask
        is then required). A mask [B, 1, T, T] (keys: this call's tokens only) says
        the cache held nothing before this call (a prefill): the queries then attend
        over the new tokens alone (causal key blocks skipped) and the cache is only
        written. Returns the output, plus the updated (k, v) with a cache.
        cache_layer: when given, `cache_kv` holds every layer's cache [L, B, K, S, H]
        and this layer is `cache_layer`: the new slots are written in place into the
        stacked cache, which is returned (no per-layer copy of it is made).
        """
        B, T, _ = x.shape
        q = self.q(x)  # [B, T, N, H]
        k = self.k(x)  # [B, T, K, H]
        v = self.v(x)
        if self.rope_theta is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            q = apply_rope(q, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
            k = apply_rope(k, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
        if cache_kv is not None:
            if mask is None or cache_index is None:
                raise ValueError("attention with a KV cache needs an explicit mask and cache_index")
            k_cache = write_kv(cache_kv[0], k, cache_index, cache_layer)
            v_cache = write_kv(cache_kv[1], v, cache_index, cache_layer)
            if mask.shape[-1] == T:  # a fresh cache: only this call's tokens are keys
                return self.o(self._attend(q, k, v, mask)), (k_cache, v_cache)
            k, v = k_cache, v_cache  # [B, K, S, H], or per layer [B * K, S, H]
            if cache_layer is not None:  # this layer of the stacked cache
                k = jax.lax.dynamic_index_in_dim(k_cache, cache_layer, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v_cache, cache_layer, keepdims=False)
            out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
            return self.o(out), (k_cache, v_cache)
        return self.o(self._attend(q, k, v, mask))

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
    ) -> jax.Array:
        """Self-attention of q [B, T, N, H] over k, v [B, T, K, H] of the same tokens."""
        T = q.shape[1]
        impl = select_implementation(
            self.attention_impl,
            self.dtype,
            self.head_dim,
            q_len=T,
            kv_len=T,
            has_mask=mask is not None,
        )
        if impl == "xla":
            # Same function as dot_product_attention's XLA path; causal key blocks are
            # skipped and the backward keeps no [T, S] residual (see dense_attention).
            return dense_attention.attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, causal=self.causal
            )
        return jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=mask,
            is_causal=self.causal and mask is None,
            implementation=impl,
        )  # [B, T, N, H]
