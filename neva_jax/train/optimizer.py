"""Stage freezing as data, and the optimizer.

Freezing is partitioning: the model's parameters are split once into the trained
part and the frozen part by their top-level submodule (`vision`, `projector`,
`llm`; `neva_jax.model.parts`). Gradients are taken only with respect to the trained part and the optimizer
state exists only for it, so frozen parameters cost neither gradient memory nor
Adam moments, and stay bit-identical by construction.

| stage | trained | frozen |
|---|---|---|
| 1 (`model.llm.freeze=True`) | projector | llm, vision |
| 2 (`model.llm.freeze=False`) | projector, llm | vision |
| 2 with `model.peft.scheme=lora` | projector, the LLM's LoRA adapters | llm, vision |
| either, `model.vision_encoder.freeze=False` | + vision | |

`train.projector_lr` gives the projector its own peak learning rate (LLaVA's
`mm_projector_lr`, NeMo PEFT's 0.1x): the parameters are labelled by part and each
label gets its own AdamW (`optax.multi_transform`) on the same schedule shape, as a
torch optimizer's parameter groups under one scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neva_jax.run_config import TrainSection

PyTree = Any
# Path elements that mark a parameter excluded from weight decay.
NO_DECAY_NAMES = ("bias", "scale", "norm", "ln", "layernorm", "layer_norm")


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)).lower())
                break
        else:
            names.append(str(k).lower())
    return names


def decays(path: tuple[Any, ...], leaf: Any) -> bool:
    """Whether weight decay applies: matrices and embeddings yes; norms and biases no."""
    names = _path_names(path)
    if any(n in NO_DECAY_NAMES or "norm" in n for n in names):
        return False
    return np.ndim(leaf) >= 2


def decay_mask(params: PyTree) -> PyTree:
    """A pytree of booleans, True where weight decay applies (see `decays`)."""
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(train: TrainSection, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `train.lr`, then cosine decay to `train.min_lr`.

    `peak` scales the whole curve to another peak (min_lr scaled alike).
    """
    scale = 1.0 if peak is None else peak / train.lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr * scale,
        warmup_steps=train.warmup,
        decay_steps=max(train.steps, train.warmup + 1),
        end_value=train.min_lr * scale,
    )


PROJECTOR_LABEL, DEFAULT_LABEL = "projector", "default"


def lr_labels(params: PyTree) -> PyTree:
    """'projector' for the projector's parameters, 'default' for the rest."""
    return {
        k: jax.tree.map(lambda _, k=k: PROJECTOR_LABEL if k == "projector" else DEFAULT_LABEL, v)
        for k, v in params.items()
    }


class AdamState(optax.ScaleByAdamState):
    """`optax.ScaleByAdamState` (same fields, same checkpoint paths) of `scale_by_adam`,
    whose update keeps it unchanged by itself when the step is not finite."""


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_adam` with the same arithmetic, for a step that writes each
    parameter's moments and the parameter once.

    The update takes `finite` (a scalar bool, default True) and keeps the state as it
    was when it is False, and computes the update from those kept-or-new moments, which
    are the moments the step returns. The step then need not select between old and
    new moments after the update (`keep_if_finite` passes an `AdamState` through).
    When it did, the update read new moments that were not the returned ones, so XLA
    (XLA:CPU has no multi-output fusion) recomputed them inside each parameter's
    update from the old moments, after the returned ones had been written in place
    into the same donated buffers: it copied every moment first. Here each moment is
    written in place from the old one and the gradient, and the parameter from the two
    new moments: 11 passes over the trained parameters' size per step instead of 18,
    and no moment-sized temporaries.
    """

    def init_fn(params: PyTree) -> AdamState:
        zeros = optax.tree.zeros_like
        return AdamState(count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params))

    def update_fn(
        updates: PyTree, state: AdamState, params: PyTree = None, *, finite: Any = True, **_: Any
    ) -> tuple[PyTree, AdamState]:
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count_inc = optax.safe_increment(state.count)
        count = count_inc
        if finite is not True:
            mu, nu, count = keep_if_finite(
                (mu, nu, count), (state.mu, state.nu, state.count), finite
            )
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, AdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales the gradients by min(1, max_norm / global norm), as torch's
    `clip_grad_norm_` (a multiplication by one scalar; `optax.clip_by_global_norm`
    divides every element by the norm, and XLA then writes the clipped gradients out
    once more rather than repeat a division in each of their consumers). The update
    takes `grad_norm=`, the norm the step already computed, else computes it."""

    def update_fn(
        updates: PyTree, state: Any, params: PyTree = None, *, grad_norm: Any = None, **_: Any
    ) -> tuple[PyTree, Any]:
        del params
        norm = global_norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


def keep_if_finite(new: PyTree, old: PyTree, finite: jax.Array) -> PyTree:
    """`new` where the step was finite, else `old`, leaf by leaf; an `AdamState` in
    the tree is taken from `new` as it is (its update already kept it)."""

    def keep(a: Any, b: Any) -> Any:
        if isinstance(a, AdamState):
            return a
        return jnp.where(finite, a, b)

    return jax.tree.map(keep, new, old, is_leaf=lambda x: isinstance(x, AdamState))


def make_optimizer(train: TrainSection) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping then AdamW (decoupled decay, masked to matrices); with
    `train.projector_lr` the projector's AdamW runs at its own learning rate.

    The chain is `optax.clip_by_global_norm` and `optax.adamw`'s (`scale_by_adam`,
    `add_decayed_weights`, `scale_by_learning_rate`) with this module's clipping and
    `scale_by_adam`: the same state tree, the same arithmetic but for the clipping's
    rounding; its update takes `finite=` and `grad_norm=` (see those two)."""

    def adamw(peak: float | None = None) -> optax.GradientTransformationExtraArgs:
        return optax.chain(
            scale_by_adam(train.adam_b1, train.adam_b2, train.adam_eps),
            optax.add_decayed_weights(train.weight_decay, decay_mask),
            optax.scale_by_learning_rate(learning_rate_schedule(train, peak)),
        )

    parts = []
    if train.grad_clip > 0:
        parts.append(clip_by_global_norm(train.grad_clip))
    if train.projector_lr in (0.0, train.lr):
        parts.append(adamw())
    else:
        groups = {DEFAULT_LABEL: adamw(), PROJECTOR_LABEL: adamw(train.projector_lr)}
        parts.append(optax.multi_transform(groups, lr_labels))
    return optax.chain(*parts)


def map_param_leaves(
    fn: Callable[[Any, Any], Any],
    opt_state: PyTree,
    params_like: PyTree,
    non_params: Callable[[Any], Any],
) -> PyTree:
    """Maps the optimizer state's per-parameter leaves (Adam moments) with
    `fn(leaf, matching leaf of params_like)` and every other leaf with `non_params`.

    A leaf belongs to the parameter whose dict-key path its own path ends with (the
    moments of `optax.multi_transform` groups included; a masked-out parameter has
    no leaf there).
    """
    by_path = {
        tuple(k.key for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(params_like)[0]
    }

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        keys: list[Any] = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(k.key)
        match = by_path.get(tuple(reversed(keys))) if keys else None
        return non_params(leaf) if match is None else fn(leaf, match)

    return jax.tree_util.tree_map_with_path(one, opt_state)


def opt_state_shardings(
    abstract_opt_state: PyTree, param_shardings: PyTree, replicated: jax.sharding.Sharding
) -> PyTree:
    """Shardings for the optimizer state: moments like their parameters, scalars replicated."""
    return map_param_leaves(
        lambda _, s: s, abstract_opt_state, param_shardings, lambda _: replicated
    )


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def largest_leaf(tree: PyTree) -> int:
    """Size of the largest array leaf (0 for an empty tree)."""
    return max((int(np.prod(x.shape)) for x in jax.tree.leaves(tree)), default=0)


def describe_split(trained: PyTree, frozen: PyTree) -> str:
    """'trainable 1,234 of 5,678 parameters (21.7%): projector' for the start-up log
    (a part trained only in part, e.g. through LoRA adapters, says so)."""
    n_train, n_frozen = count_params(trained), count_params(frozen)
    total = n_train + n_frozen
    frac = 100.0 * n_train / max(total, 1)
    names = ", ".join(f"{k} (adapters)" if k in frozen else k for k in sorted(trained))
    names = names or "nothing"
    return f"trainable {n_train:,} of {total:,} parameters ({frac:.1f}%): {names}"


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves, in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
