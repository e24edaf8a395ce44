"""The training state: a pytree of pure dicts, so the step is a plain `jax.jit` function.

The model is split once (`model.parts.split_model`) into a static graphdef and three
states: trained parameters, frozen parameters and any other variables. The
optimizer state exists for the trained parameters only. A checkpoint stores all
parameters in one nested dict (`checkpoint_tree`), so evaluation and export read a
whole model from it whichever stage wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from neva_jax.model import parts as model_parts
from neva_jax.train import optimizer as opt_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes."""

    step: jax.Array  # int32 []: steps taken (= batches consumed), skipped ones included
    params: PyTree  # trained parameters (nested dict)
    frozen: PyTree  # frozen parameters (nested dict)
    other: PyTree  # non-parameter model variables (usually empty)
    opt_state: PyTree  # optax state of `params` only
    nonfinite_count: jax.Array  # int32 []: steps skipped for a non-finite loss or gradient
    nonfinite_streak: jax.Array  # int32 []: consecutive skipped steps up to now

    def checkpoint_tree(self) -> dict[str, Any]:
        """What a checkpoint's `state` item holds: all params in one tree, opt state, counters."""
        return {
            "params": model_parts.merge_dicts(self.params, self.frozen),
            "opt_state": self.opt_state,
            "step": self.step,
            "nonfinite_count": self.nonfinite_count,
            "nonfinite_streak": self.nonfinite_streak,
        }

    @classmethod
    def from_checkpoint_tree(
        cls, tree: Mapping[str, Any], parts: Sequence[str], other: PyTree
    ) -> TrainState:
        """Inverse of `checkpoint_tree` for the trained `parts`."""
        params, frozen = model_parts.split_dict(tree["params"], parts)
        return cls(
            step=tree["step"],
            params=params,
            frozen=frozen,
            other=other,
            opt_state=tree["opt_state"],
            nonfinite_count=tree["nonfinite_count"],
            nonfinite_streak=tree["nonfinite_streak"],
        )


def cast_frozen(frozen: PyTree, dtype: str) -> PyTree:
    """The frozen parameters held in `dtype` (`train.frozen_param_dtype`; "" = unchanged)."""
    if not dtype:
        return frozen
    return jax.tree.map(lambda x: x.astype(dtype), frozen)


def create(
    model: nnx.Module,
    parts: Sequence[str],
    tx: optax.GradientTransformation,
    frozen_dtype: str = "",
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` by `parts` and initialises the optimizer for the trained part;
    the frozen parameters are cast to `frozen_dtype` (see `cast_frozen`)."""
    graphdef, params, frozen, other = model_parts.split_model(model, parts)
    frozen = cast_frozen(frozen, frozen_dtype)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        other=other,
        opt_state=tx.init(params),
        nonfinite_count=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def abstract(
    make_model: Callable[[], nnx.Module],
    parts: Sequence[str],
    tx: optax.GradientTransformation,
    frozen_dtype: str = "",
) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs) without allocating anything."""
    out = {}

    def build() -> TrainState:
        graphdef, state = create(make_model(), parts, tx, frozen_dtype)
        out["graphdef"] = graphdef
        return state

    shapes = jax.eval_shape(build)
    return out["graphdef"], shapes


def shardings(
    abstract_state: TrainState,
    param_shardings: PyTree,
    parts: Sequence[str],
    replicated: jax.sharding.Sharding,
) -> TrainState:
    """The sharding of every leaf of a TrainState split with `parts` trained.

    `param_shardings` is the nested dict of all parameters' shardings (trained and
    frozen); optimizer moments follow their parameter, scalars are replicated.
    """
    trained, frozen = model_parts.split_dict(param_shardings, parts)
    return TrainState(
        step=replicated,
        params=trained,
        frozen=frozen,
        other=jax.tree.map(lambda _: replicated, abstract_state.other),
        opt_state=opt_lib.opt_state_shardings(abstract_state.opt_state, trained, replicated),
        nonfinite_count=replicated,
        nonfinite_streak=replicated,
    )


def with_shardings(abstract_state: PyTree, sharding_tree: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the matching sharding (a restore target)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        sharding_tree,
    )
