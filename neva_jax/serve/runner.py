"""The model side of the engine: a fixed [slots, S] KV cache, prefill-and-insert, one decode step.

Axis letters: B slots, S cache columns (`--max-seq-len`), T a prompt's bucketed
length, M images of a request, V vocab, K alternatives reported per token.

Three compiled programs, whatever the traffic:
  - `_prefill_insert` (one per prompt bucket and image count): the request alone,
    right padded to its bucket, through the vision tower, projector and LLM into a
    fresh batch-1 cache (whose length is the prompt's true length, so decoding writes
    over the padding); that cache is inserted into row `slot` of the big one (`slot`
    is traced: one program for every slot); the first token is picked from the last
    real position.
  - `_decode` (per decode bucket R, greedy and a sampling variant used while any
    active slot samples): one token for each of the first R rows, each continuing its
    own sequence (R = 1 or all the slots by default: a lone request, a small step).
  - `_free`: empties a row.
Warm-up compiles them all for every bucket up to S; `compilations()` counts the
programs compiled so far (jit cache entries), so a recompilation after warm-up
shows up in /metrics.

Each request samples with its own key, `fold_in(key(seed), n)` for its n-th token,
so a seeded answer does not depend on which slot it got or what else was running.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neva_jax import platform
from neva_jax.eval import generate as gen_lib
from neva_jax.eval.sampling import select_next
from neva_jax.serve.engine import GenParams, Token
from neva_jax.serve.protocol import MAX_TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Host copies of one prefill (B = 1) or decode step (B = slots)."""

    tokens: np.ndarray  # [B] int32
    logprobs: np.ndarray  # [B] float32, of the raw logits
    top_ids: np.ndarray  # [B, K]
    top_logprobs: np.ndarray  # [B, K]

    def token(self, row: int) -> Token:
        top = tuple(
            (int(i), float(lp))
            for i, lp in zip(self.top_ids[row], self.top_logprobs[row], strict=True)
        )
        return Token(int(self.tokens[row]), float(self.logprobs[row]), top)


def prompt_buckets(max_len: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The prefill lengths prompts are padded to: `sizes` (default: `generate`'s buckets)
    below `max_len`, and `max_len` itself for the longest prompts."""
    if sizes is None:
        sizes, n = [], 1
        while n < max_len:
            sizes.append(gen_lib.bucket_prompt_length(n))
            n = sizes[-1] + 1
    return sorted({int(b) for b in sizes if 0 < b < max_len} | {max_len})


def row_buckets(slots: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The row counts a decode step runs on: `sizes` (default: 1) below `slots`, and
    `slots` itself. A step computes only the first R rows of the cache, so a server
    with one request in flight does not pay for all its slots. On CPU only the 1-row
    step is cheaper: XLA:CPU's matmul with 4 rows takes as long as with 16 (it packs
    the whole weight matrix either way), and one row takes the matrix-vector path."""
    if sizes is None:
        sizes = [1]
    return sorted({int(b) for b in sizes if 0 < b < slots} | {slots})


class ModelStatic:
    """The model's GraphDef and its weights' tree structure: the static argument of the
    serving programs. Its hash is computed once; equal to itself at once, and to
    another runner's when both parts are equal (so servers of one model share the
    compiled programs)."""

    __slots__ = ("_hash", "graphdef", "treedef")

    def __init__(self, graphdef: nnx.GraphDef, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, ModelStatic) or self._hash != other._hash:
            return False
        return self.treedef == other.treedef and self.graphdef == other.graphdef

    def merge(self, weights: Sequence[jax.Array]) -> Any:
        """(model, per-layer decode weights or None) from the flat weights."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, weights))


class KVSlotRunner:
    """Owns the model, the [slots, S] cache and each slot's sampling state (host side)."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        slots: int,
        max_len: int,
        eos_ids: Sequence[int],
        pad_id: int,
        max_images: int = 1,
        buckets: Sequence[int] | None = None,
        decode_buckets: Sequence[int] | None = None,
        decode_layers: Sequence[nnx.Module] | None = None,
    ):
        cfg = model.config
        self.slots, self.max_len, self.max_images = slots, max_len, max_images
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = pad_id
        self.buckets = prompt_buckets(max_len, buckets)
        self.decode_buckets = row_buckets(slots, decode_buckets)
        self.image_shape = (cfg.vision.image_size, cfg.vision.image_size, 3)
        self.image_slots = cfg.num_image_tokens
        self.image_token_id = cfg.image_token_id
        # Per-layer weights (sliced from the stack once; a `Generator`'s when given) on
        # CPU, where a step reading them in place is much faster; stacked elsewhere (no
        # second copy of the weights).
        layers = decode_layers
        if layers is None and platform.per_layer_decode():
            layers = gen_lib.prepare_decode_layers(model)
        layers = tuple(layers) if layers is not None else None
        graphdef, state = nnx.split((model, layers))
        # The weights as a flat list and their structure as one static argument whose
        # hash is computed once: a step then spends no time flattening the nnx.State
        # or hashing the GraphDef (together ~5 ms per step on CPU).
        self.weights, treedef = jax.tree.flatten(state)
        self.static = ModelStatic(graphdef, treedef)
        # Placed (committed) like the weights: the programs then see the same argument
        # placement on the first call as on every later one (no second compilation).
        sharding = self.weights[0].sharding
        self.cache = jax.device_put(model.llm.init_cache(slots, max_len), sharding)
        self.last = np.zeros(slots, np.int32)  # the token each slot feeds next
        self.count = np.zeros(slots, np.int32)  # tokens generated per slot (key index)
        self.seed = np.zeros(slots, np.uint32)
        self.temperature = np.zeros(slots, np.float32)
        self.top_p = np.ones(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)

    # ------------------------------------------------------------------ programs

    def compilations(self) -> int:
        """Programs compiled so far by this module's jitted functions (all runners)."""
        return sum(f._cache_size() for f in (_prefill_insert, _decode, _free))

    def warmup(self) -> None:
        """Compiles every prefill bucket (per image count), both decode variants and `_free`."""
        for m in range(self.max_images + 1):
            pixels = np.zeros((m, *self.image_shape), np.float32) if m else None
            for T in self.buckets:
                n = min(T, self.max_len - 1)  # the longest prompt padded to T
                if self.bucket(n) != T or n <= m * self.image_slots:
                    continue  # no prompt (with m images) is padded to T
                ids = [self.pad_id] * n
                ids[: m * self.image_slots] = [self.image_token_id] * (m * self.image_slots)
                self.prefill(0, ids, pixels, GenParams(max_tokens=1))
                self.free(0)
        for temperature in (0.0, 1.0):  # the greedy and the sampling decode step
            self.temperature[:] = temperature
            for R in self.decode_buckets:
                self.decode(np.arange(self.slots) < R)
        for slot in range(self.slots):
            self.free(slot)
        self.temperature[:] = 0.0

    def bucket(self, n: int) -> int:
        """The prefill length of an n-token prompt."""
        return next(b for b in self.buckets if b >= n)

    def prefill(
        self, slot: int, ids: list[int], pixels: np.ndarray | None, params: GenParams
    ) -> StepOutput:
        """Prefills one request into `slot`; returns its first token (row 0)."""
        n = len(ids)
        if not 0 < n < self.max_len:
            raise ValueError(f"prompt of {n} tokens: must be 1..{self.max_len - 1}")
        T = self.bucket(n)
        input_ids = np.full((1, T), self.pad_id, np.int32)
        input_ids[0, :n] = ids
        segment_ids = np.zeros((1, T), np.int32)
        segment_ids[0, :n] = 1
        positions = np.zeros((1, T), np.int32)
        positions[0, :n] = np.arange(n)
        images = None if pixels is None else np.asarray(pixels, np.float32)[None]
        self.seed[slot] = np.uint32((params.seed or 0) % 2**32)  # any int: OpenAI allows negatives
        self.temperature[slot] = params.temperature
        self.top_p[slot] = params.top_p
        self.top_k[slot] = params.top_k
        self.count[slot] = 0
        knobs = self._knobs(np.array([slot]))
        self.cache, out = _prefill_insert(
            self.weights,
            self.cache,
            input_ids,
            segment_ids,
            positions,
            images,
            np.int32(slot),
            np.int32(n),
            knobs,
            static=self.static,
        )
        return self._record(out, np.array([slot]))

    def decode(self, active: np.ndarray) -> StepOutput:
        """One token for the first R slots, R the smallest decode bucket that holds every
        active slot (the engine fills the lowest free slots first); rows of inactive slots
        among them are computed and ignored."""
        used = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
        R = next(b for b in self.decode_buckets if b >= used)
        rows = np.arange(R)
        sample = bool(np.any(active[:R] & (self.temperature[:R] > 0)))
        self.cache, out = _decode(
            self.weights,
            self.cache,
            self.last[:R],
            self._knobs(rows),
            static=self.static,
            sample=sample,
        )
        return self._record(out, rows)

    def free(self, slot: int) -> None:
        """Empties `slot`'s cache row (its next request overwrites it anyway)."""
        self.cache = _free(self.cache, np.int32(slot))

    # ------------------------------------------------------------------ host state

    def _knobs(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "seed": self.seed[rows],
            "count": self.count[rows],
            "temperature": self.temperature[rows],
            "top_p": self.top_p[rows],
            "top_k": self.top_k[rows],
        }

    def _record(self, out: tuple[jax.Array, ...], rows: np.ndarray) -> StepOutput:
        step = StepOutput(*(np.asarray(x) for x in out))
        self.last[rows] = step.tokens
        self.count[rows] += 1
        return step


# ---------------------------------------------------------------------------- jitted


def _pick(
    logits: jax.Array, knobs: dict[str, jax.Array], sample: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [B, V] -> token, its log-prob, the top-K ids and log-probs (raw logits)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if sample:

        def one(row_logits, seed, count, temperature, top_p, top_k):
            key = jax.random.fold_in(jax.random.key(seed), count)
            return select_next(
                row_logits[None],
                jnp.zeros((1, row_logits.shape[-1]), bool),
                key,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=jnp.float32(1.0),
            )[0]

        tok = jax.vmap(one)(
            logits,
            knobs["seed"],
            knobs["count"],
            knobs["temperature"],
            knobs["top_p"],
            knobs["top_k"],
        )
    else:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    top_lps, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return tok, lp, top_ids.astype(jnp.int32), top_lps


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _prefill_insert(
    weights: list[jax.Array],
    cache: Any,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    images: jax.Array | None,
    slot: jax.Array,
    length: jax.Array,
    knobs: dict[str, jax.Array],
    *,
    static: ModelStatic,
) -> tuple[Any, tuple[jax.Array, ...]]:
    model, layers = static.merge(weights)
    T = input_ids.shape[1]
    prefix = model.llm.init_cache(1, T)
    prefix, h = model.prefill(
        prefix,
        input_ids,
        images,
        positions=positions,
        segment_ids=segment_ids,
        layers=layers,
    )
    last = jax.lax.dynamic_index_in_dim(h, length - 1, axis=1, keepdims=True)  # [1, 1, D]
    logits = gen_lib.next_token_logits(model, last)  # the tokenizer's ids only
    # Right padding: the row's length is the prompt's, so decoding writes over the padding.
    cache = cache.insert(prefix, slot)
    # The sampling pick also serves greedy rows (argmax): one program per bucket.
    return cache, _pick(logits, knobs, sample=True)


@functools.partial(jax.jit, static_argnames=("static", "sample"), donate_argnames=("cache",))
def _decode(
    weights: list[jax.Array],
    cache: Any,
    last: jax.Array,
    knobs: dict[str, jax.Array],
    *,
    static: ModelStatic,
    sample: bool,
) -> tuple[Any, tuple[jax.Array, ...]]:
    model, layers = static.merge(weights)
    rows = last.shape[0]
    if rows == cache.batch:
        cache, h = model.llm.decode(cache, last[:, None], layers=layers)
    else:  # the first `rows` rows only: taken out, advanced, written back in place
        K = cache.num_kv_heads
        part = cache.replace(
            k=tuple(b[: rows * K] for b in cache.k),
            v=tuple(b[: rows * K] for b in cache.v),
            segment_ids=cache.segment_ids[:rows],
            positions=cache.positions[:rows],
            lengths=cache.lengths[:rows],
        )
        part, h = model.llm.decode(part, last[:, None], layers=layers)
        zero = jnp.zeros((), jnp.int32)

        def put(big: jax.Array, small: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_slice(big, small, (zero,) * big.ndim)

        cache = jax.tree.map(put, cache, part)
    return cache, _pick(gen_lib.next_token_logits(model, h), knobs, sample)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _free(cache: Any, slot: jax.Array) -> Any:
    return cache.free(slot)
