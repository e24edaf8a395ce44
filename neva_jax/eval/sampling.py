"""Next-token selection: repetition penalty, temperature, top-k, top-p.

Pure JAX on logits [B, V]. Every knob is a traced value (a scalar or one value
per row), so changing it does not recompile the decode loop; the "off" values
are temperature 0 (greedy), top_k 0, top_p 1 and repetition_penalty 1. The order
follows `transformers`: repetition penalty, then temperature, top-k, top-p.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
      temperature: 0 picks the most likely token (greedy); > 0 samples from
        softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (0: all).
      top_p: sample only among the most likely tokens whose probabilities add
        up to top_p (1: all).
      repetition_penalty: > 1 makes tokens already in the prompt or output
        less likely (CTRL-style: positive logits divided, negative multiplied).
      seed: random seed for sampling.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be in [0, 2^31) (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Penalises tokens already seen: logit / penalty if positive, * penalty if not.

    Args:
      logits: [B, V].
      seen: [B, V] bool, True for tokens present in the row's prompt or output.
      penalty: scalar or [B]; 1 leaves the logits unchanged.
    """
    penalty = jnp.reshape(jnp.asarray(penalty, logits.dtype), (-1, 1))
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def apply_top_k(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keeps the k largest logits of each row (ties with the k-th kept); k <= 0 keeps all."""
    vocab = logits.shape[-1]
    k = jnp.reshape(jnp.asarray(k, jnp.int32), (-1, 1))
    sorted_desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, vocab - 1), axis=-1)
    return jnp.where((k > 0) & (logits < kth), _NEG_INF, logits)


def apply_top_p(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens with mass >= p.

    A token is dropped when the tokens more likely than it already reach p; the
    most likely token is always kept. p >= 1 keeps all.
    """
    p = jnp.reshape(jnp.asarray(p, jnp.float32), (-1, 1))
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_desc, keep - 1, axis=-1)
    return jnp.where((p < 1.0) & (logits < threshold), _NEG_INF, logits)


def select_next(
    logits: jax.Array,
    seen: jax.Array,
    rng: jax.Array,
    *,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    repetition_penalty: jax.Array,
) -> jax.Array:
    """Picks the next token of every row.

    Args:
      logits: [B, V] float32 model logits for the next position.
      seen: [B, V] bool, tokens already in each row (for the repetition penalty).
      rng: PRNG key for this step.
      temperature, top_k, top_p, repetition_penalty: scalars or [B] (see
        `SamplingParams`); rows with temperature 0 are greedy.

    Returns:
      [B] int32 token ids.
    """
    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.reshape(jnp.asarray(temperature, logits.dtype), (-1,))
    is_greedy = jnp.broadcast_to(temperature <= 0, greedy.shape)

    def sample(logits: jax.Array) -> jax.Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = apply_top_p(apply_top_k(scaled, top_k), top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    # The filters sort the vocabulary: skip them when every row is greedy.
    sampled = jax.lax.cond(jnp.all(is_greedy), lambda _: greedy, sample, logits)
    return jnp.where(is_greedy, greedy, sampled)
