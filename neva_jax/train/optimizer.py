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
| either, `model.vision_encoder.freeze=False` | + vision | |
"""

from __future__ import annotations

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


def learning_rate_schedule(train: TrainSection) -> optax.Schedule:
    """Linear warmup from 0 to `train.lr`, then cosine decay to `train.min_lr`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup,
        decay_steps=max(train.steps, train.warmup + 1),
        end_value=train.min_lr,
    )


def make_optimizer(train: TrainSection) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay, masked to matrices)."""
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(train),
            b1=train.adam_b1,
            b2=train.adam_b2,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def opt_state_shardings(
    tx: optax.GradientTransformation,
    abstract_opt_state: PyTree,
    param_shardings: PyTree,
    replicated: jax.sharding.Sharding,
) -> PyTree:
    """Shardings for the optimizer state: moments like their parameters, scalars replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def largest_leaf(tree: PyTree) -> int:
    """Size of the largest array leaf (0 for an empty tree)."""
    return max((int(np.prod(x.shape)) for x in jax.tree.leaves(tree)), default=0)


def describe_split(trained: PyTree, frozen: PyTree) -> str:
    """'trainable 1,234 of 5,678 parameters (21.7%): projector' for the start-up log."""
    n_train, n_frozen = count_params(trained), count_params(frozen)
    total = n_train + n_frozen
    frac = 100.0 * n_train / max(total, 1)
    names = ", ".join(sorted(trained)) or "nothing"
    return f"trainable {n_train:,} of {total:,} parameters ({frac:.1f}%): {names}"


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves, in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
