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
from flax import nnx

from neva_jax.model import dense_attention
from neva_jax.model.layers import DEFAULT_KERNEL_INIT, Dense, Initializer
from neva_jax.model.rope import RopeScaling, apply_rope

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
    """Resolves the model's `attention_impl` to the `implementation` of dot_product_attention.

    The model never asks which backend it runs on: `auto` reaches a model only where
    cuDNN is available (`neva_jax.platform.runtime_choices` turns the run config's
    `auto` into `xla` on every other backend). Here `auto` picks cuDNN flash attention
    when the compute dtype is bf16/fp16, the head dim is one cuDNN supports (multiple
    of 8, <= 128) and, with an explicit mask (which cuDNN takes as a bias), both
    lengths are even (cuDNN's rule for a bias in training; odd lengths such as 1-token
    decode steps go to XLA); else XLA. `cudnn` is honoured as asked (it raises where
    cuDNN is missing or the shape is unsupported); `xla` always works.
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if attention_impl != "auto":
        return attention_impl
    cudnn_ok = (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and not (has_mask and (q_len % 2 or kv_len % 2))
    )
    return "cudnn" if cudnn_ok else "xla"


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
    """Preallocated KV cache: one k and one v buffer per layer, static shapes.

    k, v: tuples of L arrays [B * K, S, H] in the compute dtype (rows and kv heads
    merged, row-major: merged row b * K + j is row b's kv head j), heads before slots
    so that a decode step reads each head's keys as one contiguous [S, H] block; each
    buffer is its own loop-carried value that a decode step updates in place and
    attends over directly (no per-step slicing of a stacked array, no reshape between
    the update and the attention).
    segment_ids, positions: [B, S] int32 of the cached tokens; segment 0 marks empty
    slots and padding, which no query attends to.
    lengths: [B] int32, the next slot each row writes: rows advance independently, so
    a serving engine can hold requests of different lengths in different rows
    (`insert`, `free`); `generate_tokens` left-pads prompts so that all rows share it.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    positions: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
    ) -> KVCache:
        """An empty cache: zeros, segment ids 0, every row's length 0."""
        shape = (batch * num_kv_heads, max_len, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        """B, the number of rows (slots)."""
        return self.segment_ids.shape[0]

    @property
    def max_len(self) -> int:
        """S, the number of columns per row."""
        return self.segment_ids.shape[1]

    @property
    def num_kv_heads(self) -> int:
        """K."""
        return self.k[0].shape[0] // self.batch

    def next_positions(self) -> jax.Array:
        """[B] int32: one past the largest cached position of each row (0 when empty)."""
        cached = jnp.where(self.segment_ids != 0, self.positions, -1)
        return jnp.max(cached, axis=1) + 1

    def start_prefill(self, segment_ids: jax.Array, positions: jax.Array) -> KVCache:
        """Records T prompt tokens [B, T] in columns [0, T) of every row, the rest empty.

        Whatever the rows held before is forgotten (their k/v are overwritten by the
        layers or masked). A row's length becomes one past its last real token: T for
        a left-padded row, the prompt's length for a right-padded one (its padding is
        then overwritten by the tokens it decodes).
        """
        T = segment_ids.shape[1]
        pad = ((0, 0), (0, self.max_len - T))
        real = segment_ids != 0
        last = jnp.max(jnp.where(real, jnp.arange(T, dtype=jnp.int32), -1), axis=1)
        return self.replace(
            segment_ids=jnp.pad(segment_ids.astype(jnp.int32), pad),
            positions=jnp.pad(positions.astype(jnp.int32), pad),
            lengths=last + 1,
        )

    def append(self, segment_ids: jax.Array, positions: jax.Array) -> KVCache:
        """Records T new tokens [B, T] at each row's own length, which advances by T.

        The layers write the matching k/v (`write_rows`); a row already full keeps
        writing into its last T columns (clamped, as `dynamic_update_slice` does).
        """
        return self.replace(
            segment_ids=write_rows(self.segment_ids, segment_ids.astype(jnp.int32), self.lengths),
            positions=write_rows(self.positions, positions.astype(jnp.int32), self.lengths),
            lengths=self.lengths + segment_ids.shape[1],
        )

    def insert(self, prefix: KVCache, slot: jax.Array | int) -> KVCache:
        """Copies the one-row cache `prefix` (S' <= S columns) into row `slot`.

        The row's columns [0, S') take the prefix, the rest is emptied; its length
        becomes the prefix's. `slot` may be traced: one compiled insert serves every
        slot (a serving engine's prefill-then-insert).
        """
        if prefix.batch != 1 or prefix.max_len > self.max_len:
            raise ValueError(
                f"insert needs a one-row cache of at most {self.max_len} columns, got "
                f"{prefix.batch} rows of {prefix.max_len}"
            )
        if len(prefix.k) != len(self.k) or prefix.num_kv_heads != self.num_kv_heads:
            raise ValueError("insert: the caches have different layer or kv-head counts")
        slot = jnp.asarray(slot, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        K = self.num_kv_heads

        def put(buf: jax.Array, new: jax.Array) -> jax.Array:  # [B*K, S, H] <- [K, S', H]
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (slot * K, zero, zero))

        def row(big: jax.Array, small: jax.Array) -> jax.Array:  # [B, S] <- [1, S'] + empty
            full = jnp.pad(small, ((0, 0), (0, self.max_len - prefix.max_len)))
            return jax.lax.dynamic_update_slice(big, full, (slot, zero))

        return self.replace(
            k=tuple(put(b, n) for b, n in zip(self.k, prefix.k, strict=True)),
            v=tuple(put(b, n) for b, n in zip(self.v, prefix.v, strict=True)),
            segment_ids=row(self.segment_ids, prefix.segment_ids),
            positions=row(self.positions, prefix.positions),
            lengths=jax.lax.dynamic_update_slice(self.lengths, prefix.lengths, (slot,)),
        )

    def free(self, slot: jax.Array | int) -> KVCache:
        """Row `slot` emptied: segment ids 0 and length 0 (its k/v are never read again)."""
        slot = jnp.asarray(slot, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        empty = jnp.zeros((1, self.max_len), jnp.int32)
        return self.replace(
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, empty, (slot, zero)),
            lengths=jax.lax.dynamic_update_slice(self.lengths, jnp.zeros((1,), jnp.int32), (slot,)),
        )


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new [R, T, ...] into buf [R, S, ...] at column starts[r] of each row r.

    One scatter (a vmapped `dynamic_update_slice`); in a decode loop it updates the
    loop-carried buffer in place.
    """

    def one(b: jax.Array, n: jax.Array, s: jax.Array) -> jax.Array:
        start = (s,) + (jnp.zeros((), jnp.int32),) * (b.ndim - 1)
        return jax.lax.dynamic_update_slice(b, n, start)

    return jax.vmap(one)(buf, new.astype(buf.dtype), starts.astype(jnp.int32))


def write_kv(cache_kv: jax.Array, new_kv: jax.Array, starts: jax.Array | None = None) -> jax.Array:
    """Writes new_kv [B, T, K, H] into one layer's buffer [B * K, S, H].

    At column 0 of every row (a prefill: one `dynamic_update_slice`), or at column
    starts[b] of row b (`starts` [B], a decode step: one scatter).
    """
    B, T, K, H = new_kv.shape
    new_kv = jnp.swapaxes(new_kv, 1, 2).reshape(B * K, T, H).astype(cache_kv.dtype)
    if starts is None:
        return jax.lax.dynamic_update_slice(cache_kv, new_kv, (0, 0, 0))
    return write_rows(cache_kv, new_kv, jnp.repeat(starts, K))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of q [B, T, N, H] over one layer's cache k, v [B * K, S, H] -> [B, T, N, H].

    mask [B, 1, T, S] bool. The same arithmetic as `jax.nn.dot_product_attention`'s
    XLA path (logits and softmax in float32, masked logits set to a large finite
    negative number, scale 1/sqrt(H)). The einsums keep the cache as the operand in
    its stored order ([S, H] per head, then [S, H] again for the values), so XLA
    reads the cache in place instead of transposing or reshaping it on every decode
    step; only the T*G queries per kv head (G = N / K) are rearranged.
    """
    B, T, N, H = q.shape
    K = k.shape[0] // B
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B * K, T * G, H)
    logits = jnp.einsum("CSH,CQH->CQS", k, q, preferred_element_type=jnp.float32)
    logits = logits.reshape(B, K, T * G, -1) * jnp.float32(H**-0.5)
    keep = jnp.broadcast_to(mask[:, :, :, None, :], (B, 1, T, G, mask.shape[-1]))
    masked = jnp.float32(dense_attention.MASKED_LOGIT)
    logits = jnp.where(keep.reshape(B, 1, T * G, -1), logits, masked)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("CQS,CSH->CQH", probs.reshape(B * K, T * G, -1), v)
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


# ---------------------------------------------------------------------------- module


class Attention(nnx.Module):
    """Self-attention: q/k/v projections, optional RoPE, GQA, output projection.

    Parameters (logical axes): q/kernel [D, N, H] ('embed', 'heads', 'head_dim'),
    k/kernel and v/kernel [D, K, H] ('embed', 'kv_heads', 'head_dim'),
    o/kernel [N, H, D] ('heads', 'head_dim', 'embed'); biases, when `use_bias`, on the
    output axes. Q/K/V are column-parallel and O row-parallel under tensor parallelism.
    `rope_theta=None` disables RoPE (CLIP, learned absolute positions); `causal=False`
    gives bidirectional attention (CLIP). `row_major_weight_grads`: see `layers.Dense`.
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
        rope_scaling: RopeScaling | None = None,
        causal: bool = True,
        attention_impl: str = "xla",
        row_major_weight_grads: bool = False,
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
        self.rope_scaling = rope_scaling
        self.rotary_dim = int(head_dim * rotary_percentage) // 2 * 2
        self.causal = causal
        self.attention_impl = attention_impl
        self.dtype = dtype
        kw = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            row_major_weight_grads=row_major_weight_grads,
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
        kv: tuple[jax.Array, jax.Array] | None = None,
        write_at: jax.Array | None = None,
        queries: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, jax.Array] | None, jax.Array]:
        """x [B, T, D] -> (updated (k, v) cache buffers or None, output [B, T, D]).

        `queries` [B, C] (no cache): only the tokens at these indices of each row query
        (keys and values are still every token's); the output is [B, C, D] and the
        mask [B, 1, C, T] is required. The training step's last layer uses it: only the
        positions whose logits are needed go through q, o and the MLP.

        positions [B, T]: RoPE positions (default arange(T)). mask: the complete
        boolean mask (causality included, e.g. from `make_attention_mask`); None =
        causal (or full when `causal=False`) over x itself.

        Without `kv` the queries attend over this call's tokens (mask [B, 1, T, T]).
        With `kv`, this layer's cache buffers (each [B * K, S, H], see `KVCache`), the
        new keys/values are written and the call is one of two kinds:
        - a prefill (`write_at=None`): they go to columns [0, T) of every row and the
          queries attend over the new tokens alone (mask [B, 1, T, T]; causal key
          blocks skipped), as without a cache;
        - a decode step (`write_at` [B]: each row's first new column): they go to
          those columns and the queries attend over the whole cache (mask [B, 1, T, S]).
        """
        B, T, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q_positions = positions
        if queries is None:
            q, k, v = self.project(x)  # [B, T, N, H], [B, T, K, H], [B, T, K, H]
        else:
            if kv is not None or mask is None:
                raise ValueError("attention over `queries` needs a mask and no KV cache")
            q = self.q(jnp.take_along_axis(x, queries[:, :, None], axis=1))  # [B, C, N, H]
            k, v = self.k(x), self.v(x)
            q_positions = jnp.take_along_axis(positions, queries, axis=1)
        if self.rope_theta is not None:
            rope = dict(
                theta=self.rope_theta, rotary_dim=self.rotary_dim, scaling=self.rope_scaling
            )
            q = apply_rope(q, q_positions, **rope)
            k = apply_rope(k, positions, **rope)
        if kv is None:
            return None, self.o(self._attend(q, k, v, mask, causal=queries is None))
        if mask is None:
            raise ValueError("attention with a KV cache needs an explicit mask")
        new_kv = (write_kv(kv[0], k, write_at), write_kv(kv[1], v, write_at))
        if write_at is None:  # prefill: the keys are this call's tokens
            return new_kv, self.o(self._attend(q, k, v, mask))
        k_all, v_all = (c.astype(q.dtype) for c in new_kv)
        return new_kv, self.o(cached_attention(q, k_all, v_all, mask))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H] (before RoPE)."""
        return self.q(x), self.k(x), self.v(x)

    def _attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        *,
        causal: bool = True,
    ) -> jax.Array:
        """Attention of q [B, T, N, H] over k, v [B, S, K, H] of the same sequence; with
        `causal` (and a causal layer) query t is token t (T == S) and later keys are
        skipped, else `mask` [B, 1, T, S] says everything."""
        causal = causal and self.causal
        impl = select_implementation(
            self.attention_impl,
            self.dtype,
            self.head_dim,
            q_len=q.shape[1],
            kv_len=k.shape[1],
            has_mask=mask is not None,
        )
        if impl == "xla":
            # Same function as dot_product_attention's XLA path; causal key blocks are
            # skipped and the backward keeps no [T, S] residual (see dense_attention).
            return dense_attention.attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, causal=causal
            )
        return jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=mask,
            is_causal=causal and mask is None,
            implementation=impl,
        )  # [B, T, N, H]


class FusedAttention(Attention):
    """An `Attention` whose q, k and v projections are one [D, (N + 2K) * H] matmul.

    Built from a trained `Attention` (`FusedAttention(attn)`) for inference: the same
    function, one weight read and one matmul instead of three, which is what a decode
    step (one token per row) is bound by. The decode form (`Llama.unstack_layers`).
    """

    def __init__(self, attn: Attention):
        for name in (
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "rope_theta",
            "rope_scaling",
            "rotary_dim",
            "causal",
            "attention_impl",
            "dtype",
        ):
            setattr(self, name, getattr(attn, name))
        self.q = self.k = self.v = None
        self.o = attn.o
        parts = (attn.q, attn.k, attn.v)
        D = parts[0].kernel.shape[0]
        kernel = jnp.concatenate([p.kernel[...].reshape(D, -1) for p in parts], axis=-1)
        bias = None
        if parts[0].bias is not None:
            bias = jnp.concatenate([p.bias[...].reshape(-1) for p in parts], axis=-1)
        self.qkv = Dense.of(
            kernel,
            bias,
            dtype=parts[0].dtype,
            row_major_weight_grads=parts[0].row_major_weight_grads,
        )

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q, k, v from the one fused matmul."""
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [B, T, (N + 2K) * H]
        q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
        lead = x.shape[:-1]
        return q.reshape(*lead, N, H), k.reshape(*lead, K, H), v.reshape(*lead, K, H)
