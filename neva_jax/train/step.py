"""The pure training and evaluation steps.

`make_train_step` returns ONE pure function `train_step(state, batch) -> (state,
metrics)`; `jit_train_step` compiles it with explicit shardings and the state
donated. The loss is the masked cross-entropy, averaged as `loss_normalization` says
(docs/REFERENCE.md "Loss averaging"):

- `global_tokens`: one token mean over the whole global batch (all accumulation
  micro-batches and devices together); it does not depend on how the batch is split.
- `micro_batch` (HF Trainer as LLaVA runs it, NeMo NeVA): the token mean of each
  micro-batch on each batch shard (a data-parallel device: `batch_shards` =
  mesh.data x mesh.fsdp), then the mean of those G = grad_accum_steps x batch_shards
  means. A micro-batch without trained tokens contributes 0 and still counts in G
  (NeMo's `loss_func` divides its zero sum by 1; a PyTorch mean would be 0/0).

Both are one weighted sum, sum(CE x w), with per-token weights w fixed before the
forward pass, so the gradients need no extra pass to normalise them.

Logits are computed only where `loss_mask` is set: each row's trained positions are
gathered into a fixed capacity (`train.logits_fraction` of T) before the LM head;
a batch with more trained tokens in some row than that falls back to all positions
(`lax.cond`), so the capacity changes speed, never the result.

Logits of vocabulary rows past the tokenizer (`vocab_in_use`; imports pad 32002 ids
to 32064 rows as llava-hf) are masked before the softmax, so the loss sees exactly
the tokenizer's vocabulary.

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
from neva_jax.model.neva import mask_padded_vocab
from neva_jax.run_config import LOSS_NORMALIZATIONS
from neva_jax.train import optimizer as opt_lib
from neva_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def capacity(seq_len: int, fraction: float) -> int:
    """Trained positions per row that get logits; a multiple of 8 (or T)."""
    if fraction >= 1.0:
        return seq_len
    return min(seq_len, max(8, math.ceil(fraction * seq_len / 8) * 8))


def _cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, counted: jax.Array):
    """(sum of CE x weights, sum of correct x counted), float32."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # "The target has the largest logit", without an argmax (a slow variadic reduce on
    # CPU, ~0.5 s per step on the bench shape); ties count as correct.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(jax.lax.stop_gradient(correct) * counted)


def token_loss_sums(
    model: nnx.Module,
    batch: Batch,
    logits_fraction: float = 1.0,
    *,
    stop_vision_gradient: bool = True,
    weights: jax.Array | None = None,
    vocab_in_use: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE x weights over trained tokens, number of trained tokens, number correct).

    `model` follows docs/CONTRACTS.md: `hidden_states(input_ids, images, positions=,
    segment_ids=, stop_vision_gradient=)` -> [B, T, D] and `llm.logits(h)` -> float32
    [B, T, V]. `stop_vision_gradient` (frozen tower) runs no backward pass through it.
    `weights` [B, T] (default `loss_mask`) weigh each token's CE; `vocab_in_use` > 0
    masks the logits of ids >= it (`neva.mask_padded_vocab`).
    """
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    weights = mask if weights is None else weights.astype(jnp.float32)
    targets = batch["targets"]
    n_tokens = jnp.sum(mask)
    T = mask.shape[1]
    C = capacity(T, logits_fraction)
    # With a capacity, the LLM's last layer runs in the branches below: only at the
    # trained positions (its q, o and MLP on C rows instead of T), or at all of them.
    h = model.hidden_states(
        batch["input_ids"],
        batch["images"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        stop_vision_gradient=stop_vision_gradient,
        stop_before_last=C < T,
    )  # [B, T, D]

    def last_layer(queries: jax.Array | None = None) -> jax.Array:
        return model.llm.last_layer(
            h, positions=batch["positions"], segment_ids=batch["segment_ids"], queries=queries
        )

    def logits(h: jax.Array) -> jax.Array:
        return mask_padded_vocab(model.llm.logits(h), vocab_in_use)

    if C >= T:
        loss_sum, correct = _cross_entropy(logits(h), targets, weights, mask)
        return loss_sum, n_tokens, correct

    def all_positions():
        return _cross_entropy(logits(last_layer()), targets, weights, mask)

    def trained_positions():
        # Per row, the indices of the first C trained positions (row-local: keeps the
        # batch sharding); slots past a row's count get weight 0.
        idx = jax.vmap(lambda m: jnp.nonzero(m > 0, size=C, fill_value=0)[0])(mask)  # [B, C]
        valid = jnp.arange(C)[None, :] < jnp.sum(mask > 0, axis=1, keepdims=True)
        h_c = last_layer(idx)  # [B, C, D]
        w = jnp.take_along_axis(weights, idx, axis=1) * valid
        counted = jnp.take_along_axis(mask, idx, axis=1) * valid
        return _cross_entropy(logits(h_c), jnp.take_along_axis(targets, idx, axis=1), w, counted)

    fits = jnp.max(jnp.sum(mask > 0, axis=1)) <= C
    # The fallback is rematerialised: otherwise its [B, T, V] residuals exist (as zeros)
    # on every step, also when the capacity suffices.
    loss_sum, correct = jax.lax.cond(fits, trained_positions, jax.checkpoint(all_positions))
    return loss_sum, n_tokens, correct


def loss_weights(
    loss_mask: jax.Array, normalization: str, grad_accum_steps: int = 1, batch_shards: int = 1
) -> jax.Array:
    """Per-token weights [B, T] whose sum with the CE is the loss (see the module doc).

    Rows are grouped as the step runs them: batch shard d holds rows
    [d B/S, (d+1) B/S) (the batch sharding over (data, fsdp)), and accumulation
    micro-batch a takes rows a, n+a, 2n+a, ... (`_micro_batches`).
    """
    mask = loss_mask.astype(jnp.float32)
    if normalization == "global_tokens":
        return mask / jnp.maximum(jnp.sum(mask), 1.0)
    if normalization != "micro_batch":
        raise ValueError(f"loss normalization {normalization!r}: use one of {LOSS_NORMALIZATIONS}")
    B, T = mask.shape
    S, n = batch_shards, grad_accum_steps
    if B % (S * n):
        raise ValueError(f"{B} rows do not split into {S} shards x {n} micro-batches")
    groups = mask.reshape(S, B // (S * n), n, T)  # [shard, row in group, micro-batch, T]
    tokens = jnp.sum(groups, axis=(1, 3), keepdims=True)  # [S, 1, n, 1]
    scale = 1.0 / (jnp.maximum(tokens, 1.0) * (S * n))
    return (groups * scale).reshape(B, T)


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
    loss_normalization: str = "global_tokens",
    batch_shards: int = 1,
    vocab_in_use: int = 0,
    dropout_seed: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step for `graphdef` split with `trained_parts` trained.

    `loss_normalization` and `batch_shards` (mesh.data x mesh.fsdp): see the module
    doc; `vocab_in_use`: the tokenizer's size (0 = every vocabulary row is a token).
    """
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"loss_normalization={loss_normalization!r}: use one of {LOSS_NORMALIZATIONS}"
        )
    stop_vision = "vision" not in trained_parts

    def micro_grads(state: TrainState, batch: Batch, micro: jax.Array):
        weights = batch["loss_weights"]

        def loss_fn(params):
            model = model_parts.merge_model(graphdef, params, state.frozen, state.other)
            key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
            lora.set_dropout_keys(model, jax.random.fold_in(key, micro))
            loss, n, correct = token_loss_sums(
                model,
                batch,
                logits_fraction,
                stop_vision_gradient=stop_vision,
                weights=weights,
                vocab_in_use=vocab_in_use,
            )
            return loss, (n, correct)

        (loss, (n, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, loss, n, correct

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = {k: batch[k] for k in BATCH_KEYS}
        batch["loss_weights"] = loss_weights(
            batch["loss_mask"], loss_normalization, grad_accum_steps, batch_shards
        )
        if grad_accum_steps == 1:
            grads, loss, n, correct = micro_grads(state, batch, jnp.int32(0))
        else:

            def body(carry, xs):
                micro, index = xs
                acc = jax.tree.map(jnp.add, carry, micro_grads(state, micro, index))
                return acc, None

            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                *(jnp.zeros((), jnp.float32) for _ in range(3)),
            )
            (grads, loss, n, correct), _ = jax.lax.scan(
                body,
                zeros,
                (_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps)),
            )
        grad_norm = opt_lib.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = optax.with_extra_args_support(tx).update(
            grads, state.opt_state, state.params, finite=finite, grad_norm=grad_norm
        )
        new_params = optax.apply_updates(state.params, updates)

        skipped = (~finite).astype(jnp.int32)
        applied = state.step - state.nonfinite_count  # updates applied so far
        new_state = state.replace(
            step=state.step + 1,
            params=opt_lib.keep_if_finite(new_params, state.params, finite),
            opt_state=opt_lib.keep_if_finite(new_opt_state, state.opt_state, finite),
            nonfinite_count=state.nonfinite_count + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(applied), jnp.float32),
            "accuracy": correct / jnp.maximum(n, 1.0),
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
    graphdef: nnx.GraphDef, *, logits_fraction: float = 1.0, vocab_in_use: int = 0
) -> Callable[..., Metrics]:
    """`eval_step(params, other, batch) -> {loss_sum, tokens, correct}` (sums).

    `params` holds all parameters (trained and frozen together), so both stages
    share one compiled program. The loop divides the sums once over the whole eval
    set (a token mean, whatever the training's `loss_normalization`).
    """

    def eval_step(params: Any, other: Any, batch: Batch) -> Metrics:
        batch = {k: batch[k] for k in BATCH_KEYS}
        model = model_parts.merge_model(graphdef, params, other)
        loss_sum, n, correct = token_loss_sums(
            model, batch, logits_fraction, vocab_in_use=vocab_in_use
        )
        return {"loss_sum": loss_sum, "tokens": n, "correct": correct}

    return eval_step
