"""The pure training and evaluation steps.

`make_train_step` returns ONE pure function `train_step(state, batch) -> (state,
metrics)`; `jit_train_step` compiles it with explicit shardings and the state
donated. The loss is the masked cross-entropy normalised by the number of trained
tokens over the whole global batch (all accumulation micro-batches together), so
the result does not depend on how the batch is split over devices or micro-batches.

Logits are computed only where `loss_mask` is set: each row's trained positions are
gathered into a fixed capacity (`train.logits_fraction` of T) before the LM head;
a batch with more trained tokens in some row than that falls back to all positions
(`lax.cond`), so the capacity changes speed, never the result.

A non-finite loss or gradient norm leaves params and optimizer state untouched and
counts the step in `nonfinite_count` / `nonfinite_streak`.

LoRA dropout (`model.peft.dropout`) draws its masks from `dropout_seed`, the step and
the micro-batch (`lora.set_dropout_keys`), so a resumed run draws the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from neva_jax.data.pipeline import BATCH_KEYS  # docs/CONTRACTS.md "The batch"
from neva_jax.model import lora
from neva_jax.model import parts as model_parts
from neva_jax.train import optimizer as opt_lib
from neva_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def capacity(seq_len: int, fraction: float) -> int:
    """Trained positions per row that get logits; a multiple of 8 (or T)."""
    if fraction >= 1.0:
        return seq_len
    return min(seq_len, max(8, math.ceil(fraction * seq_len / 8) * 8))


def _cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Sums of CE * weights and of correct * weights (float32)."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # "The target has the largest logit", without an argmax (a slow variadic reduce on
    # CPU, ~0.5 s per step on the bench shape); ties count as correct.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(jax.lax.stop_gradient(correct) * weights)


def token_loss_sums(
    model: nnx.Module,
    batch: Batch,
    logits_fraction: float = 1.0,
    *,
    stop_vision_gradient: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE over trained tokens, number of trained tokens, number correct).

    `model` follows docs/CONTRACTS.md: `hidden_states(input_ids, images, positions=,
    segment_ids=, stop_vision_gradient=)` -> [B, T, D] and `llm.logits(h)` -> float32
    [B, T, V]. `stop_vision_gradient` (frozen tower) runs no backward pass through it.
    """
    h = model.hidden_states(
        batch["input_ids"],
        batch["images"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        stop_vision_gradient=stop_vision_gradient,
    )  # [B, T, D]
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    targets = batch["targets"]
    n_tokens = jnp.sum(mask)
    T = mask.shape[1]
    C = capacity(T, logits_fraction)

    def all_positions():
        return _cross_entropy(model.llm.logits(h), targets, mask)

    if C >= T:
        loss_sum, correct = all_positions()
        return loss_sum, n_tokens, correct

    def trained_positions():
        # Per row, the indices of the first C trained positions (row-local: keeps the
        # batch sharding); slots past a row's count get weight 0.
        idx = jax.vmap(lambda m: jnp.nonzero(m > 0, size=C, fill_value=0)[0])(mask)  # [B, C]
        valid = jnp.arange(C)[None, :] < jnp.sum(mask > 0, axis=1, keepdims=True)
        h_c = jnp.take_along_axis(h, idx[:, :, None], axis=1)  # [B, C, D]
        w = jnp.take_along_axis(mask, idx, axis=1) * valid
        return _cross_entropy(model.llm.logits(h_c), jnp.take_along_axis(targets, idx, axis=1), w)

    fits = jnp.max(jnp.sum(mask > 0, axis=1)) <= C
    # The fallback is rematerialised: otherwise its [B, T, V] residuals exist (as zeros)
    # on every step, also when the capacity suffices.
    loss_sum, correct = jax.lax.cond(fits, trained_positions, jax.checkpoint(all_positions))
    return loss_sum, n_tokens, correct


def _micro_batches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...]; micro-batch a takes rows a, n+a, 2n+a, ... (shard-local)."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    trained_parts: Sequence[str] = ("projector",),
    grad_accum_steps: int = 1,
    logits_fraction: float = 1.0,
    dropout_seed: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step for `graphdef` split with `trained_parts` trained."""
    stop_vision = "vision" not in trained_parts

    def micro_grads(state: TrainState, batch: Batch, denom: jax.Array, micro: jax.Array):
        def loss_fn(params):
            model = model_parts.merge_model(graphdef, params, state.frozen, state.other)
            key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
            lora.set_dropout_keys(model, jax.random.fold_in(key, micro))
            loss_sum, n, correct = token_loss_sums(
                model, batch, logits_fraction, stop_vision_gradient=stop_vision
            )
            # Normalised here by the whole batch's trained-token count (known before the
            # backward pass), so the gradients need no extra pass to divide them.
            return loss_sum / denom, (loss_sum, n, correct)

        (_, (loss_sum, n, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, loss_sum, n, correct

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = {k: batch[k] for k in BATCH_KEYS}
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if grad_accum_steps == 1:
            grads, loss_sum, n, correct = micro_grads(state, batch, denom, jnp.int32(0))
        else:

            def body(carry, xs):
                micro, index = xs
                g, ls, n, c = micro_grads(state, micro, denom, index)
                acc = jax.tree.map(jnp.add, carry, (g, ls, n, c))
                return acc, None

            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                *(jnp.zeros((), jnp.float32) for _ in range(3)),
            )
            (grads, loss_sum, n, correct), _ = jax.lax.scan(
                body,
                zeros,
                (_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps)),
            )
        loss = loss_sum / denom
        grad_norm = opt_lib.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        skipped = (~finite).astype(jnp.int32)
        applied = state.step - state.nonfinite_count  # updates applied so far
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(new_params, state.params),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            nonfinite_count=state.nonfinite_count + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(applied), jnp.float32),
            "accuracy": correct / denom,
            "trained_tokens": n,
            "finite": finite,
            "nonfinite_count": new_state.nonfinite_count,
            "nonfinite_streak": new_state.nonfinite_streak,
        }
        return new_state, metrics

    return train_step


def jit_train_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    state_shardings: TrainState,
    batch_shardings: Mapping[str, jax.sharding.Sharding],
    replicated: jax.sharding.Sharding,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`jax.jit` with explicit in/out shardings; the state argument is donated."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, dict(batch_shardings)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(
    graphdef: nnx.GraphDef, *, logits_fraction: float = 1.0
) -> Callable[..., Metrics]:
    """`eval_step(params, other, batch) -> {loss_sum, tokens, correct}` (sums).

    `params` holds all parameters (trained and frozen together), so both stages
    share one compiled program.
    """

    def eval_step(params: Any, other: Any, batch: Batch) -> Metrics:
        batch = {k: batch[k] for k in BATCH_KEYS}
        model = model_parts.merge_model(graphdef, params, other)
        loss_sum, n, correct = token_loss_sums(model, batch, logits_fraction)
        return {"loss_sum": loss_sum, "tokens": n, "correct": correct}

    return eval_step
