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


def make_optimizer(train: TrainSection) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay, masked to matrices); with
    `train.projector_lr` the projector's AdamW runs at its own learning rate."""

    def adamw(peak: float | None = None) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate_schedule(train, peak),
            b1=train.adam_b1,
            b2=train.adam_b2,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        )

    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
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
