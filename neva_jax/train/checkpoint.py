"""Orbax checkpoints of a training run: save, find, resume, restore for evaluation.

Layout under a workdir (docs/CONTRACTS.md):

    checkpoints/STEP/state/      params (all, nested dict), opt_state, step, counters
    checkpoints/STEP/meta/       JSON: run config, model_config, versions, mesh
    checkpoints/STEP/data_iter/  grain iterator state (one file per process)

Orbax writes each step into a temporary folder and renames it when every item has
committed, so a step folder is complete or absent; a folder that is named like a
step but lacks the files a commit writes (copied by hand, or a file system without
atomic renames) is moved aside as `STEP.incomplete` and never restored. A state
with a non-finite parameter is refused, so a checkpoint always holds finite values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
# Replicated arrays are written by all their replicas in parallel (Orbax's default)
# only when each replica's slice has at least this many bytes: below it the slicing
# costs more (one small compile per shape) than it saves.
MIN_REPLICA_PARALLEL_BYTES = 4 << 20
ITEMS = ("state", "meta", "data_iter")
# Files Orbax writes last, on commit: a step folder without them never finished.
_STEP_COMMIT_FILE = "_CHECKPOINT_METADATA"
_ITEM_COMMIT_FILES = {"state": "_METADATA", "meta": "metadata"}


def _is_int(name: str) -> bool:
    return name.isdigit()


def is_complete_step(step_dir: str) -> bool:
    """Whether `step_dir` holds a committed checkpoint (state and meta written)."""
    if not os.path.isfile(os.path.join(step_dir, _STEP_COMMIT_FILE)):
        return False
    return all(
        os.path.isfile(os.path.join(step_dir, item, name))
        for item, name in _ITEM_COMMIT_FILES.items()
    )


def complete_steps(ckpt_dir: str) -> list[int]:
    """Sorted steps under `ckpt_dir` whose folders are complete."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        int(n)
        for n in os.listdir(ckpt_dir)
        if _is_int(n) and is_complete_step(os.path.join(ckpt_dir, n))
    )


def set_aside_incomplete(ckpt_dir: str) -> list[str]:
    """Renames step-named folders that never committed to `STEP.incomplete[.k]`."""
    moved = []
    if not os.path.isdir(ckpt_dir) or jax.process_index() != 0:
        return moved
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if _is_int(name) and os.path.isdir(path) and not is_complete_step(path):
            target, k = f"{path}.incomplete", 0
            while os.path.exists(target):
                k += 1
                target = f"{path}.incomplete.{k}"
            os.rename(path, target)
            logging.warning("checkpoint %s is incomplete; moved aside to %s", path, target)
            moved.append(target)
    return moved


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(checkpoints folder, step) for a workdir, a `checkpoints/` folder or a step folder.

    A workdir or `checkpoints/` folder resolves to its newest complete step.
    Raises FileNotFoundError with a one-line message when there is none.
    """
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip("/"))
    if _is_int(name) and os.path.isdir(path):
        if not is_complete_step(path):
            raise FileNotFoundError(f"{path}: checkpoint step folder is incomplete")
        return os.path.dirname(path), int(name)
    ckpt_dir = path
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {CHECKPOINT_DIR}/STEP/)")
    return ckpt_dir, steps[-1]


def is_training_checkpoint(path: str) -> bool:
    """Whether `path` is a workdir, `checkpoints/` folder or step folder of a training run."""
    try:
        resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return True


def read_meta(path: str) -> dict[str, Any]:
    """The JSON `meta` item (config, model_config, versions, mesh) of a checkpoint."""
    ckpt_dir, step = resolve_checkpoint(path)
    item_dir = os.path.join(ckpt_dir, str(step), "meta")
    with open(os.path.join(item_dir, _ITEM_COMMIT_FILES["meta"])) as f:
        meta = json.load(f)
    meta.setdefault("step", step)
    return meta


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating leaf of `tree` is finite (one device reduction)."""
    return bool(_all_finite(tree))


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The `state` item's handler (Orbax's standard one with MIN_REPLICA_PARALLEL_BYTES)."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (
            jax.Array,
            th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES),
        ),
        (str, th.StringHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )


class Checkpointer:
    """An Orbax `CheckpointManager` for {state, meta, data_iter}: async, keep newest N."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        os.makedirs(self.directory, exist_ok=True)
        set_aside_incomplete(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=ITEMS,
            item_handlers={
                "state": _state_handler(),
                "meta": ocp.JsonCheckpointHandler(),
                "data_iter": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Complete steps, oldest first."""
        return complete_steps(self.directory)

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any],
        data_iter: Any = None,
        *,
        force: bool = True,
    ) -> bool:
        """Starts an (async) save of step `step`; False if skipped (e.g. non-finite params)."""
        params = state["params"] if isinstance(state, Mapping) and "params" in state else state
        if not all_finite(params):
            logging.error("step %d: not checkpointed, a parameter is non-finite", step)
            return False
        if step in self._manager.all_steps():
            return False
        items = {
            "state": ocp.args.PyTreeSave(state),
            "meta": ocp.args.JsonSave(dict(meta)),
        }
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def restore(
        self, step: int, abstract_state: Any, data_iter: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto `abstract_state` (ShapeDtypeStructs with shardings).

        `data_iter`, when given and saved, is set to the saved position in place.
        """
        items = {
            "state": _restore_args(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        data_dir = os.path.join(self.directory, str(step), "data_iter")
        if data_iter is not None and os.path.isdir(data_dir):
            if os.path.isfile(os.path.join(data_dir, _data_iter_file())):
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:  # saved by another number of processes
                _restore_resharded(data_dir, data_iter)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        """Blocks until pending async saves have committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _data_iter_file(index: int | None = None, count: int | None = None) -> str:
    """grain's per-process file name in a checkpoint's `data_iter/` folder."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return f"process_{index}-of-{count}.json"


def _restore_resharded(data_dir: str, data_iter: Any) -> None:
    """Positions `data_iter` from iterator states saved by another number of processes."""
    from neva_jax.data import pipeline

    names = [n for n in os.listdir(data_dir) if n.startswith("process_") and n.endswith(".json")]
    count = int(names[0].rsplit("-of-", 1)[1][: -len(".json")]) if names else 0
    saved = []
    for i in range(count):
        path = os.path.join(data_dir, _data_iter_file(i, count))
        if os.path.isfile(path):
            with open(path) as f:
                saved.append(json.load(f))
    state = pipeline.reshard_state(saved, jax.process_index(), jax.process_count())
    if len(saved) != count or not count or state is None:
        logging.warning(
            "%s: the data iterator state (%d processes) cannot be resharded for %d processes; "
            "the data stream restarts from the beginning",
            data_dir,
            count,
            jax.process_count(),
        )
        return
    data_iter.set_state(state)
    logging.warning(
        "%s: data iterator saved by %d processes, resharded for %d: this process resumes "
        "at record %d of its shard",
        data_dir,
        count,
        jax.process_count(),
        state["parent"]["next_index"],
    )


def _abstract_tree(metadata_tree: Any) -> Any:
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        metadata_tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def saved_param_shapes(directory: str, *, root: bool = False) -> Any:
    """ShapeDtypeStructs of the saved parameters (no data read).

    `directory` is a step folder (its `state/params`) or, with `root=True`, a params
    folder whose whole tree is the parameters (a model folder's `params/`).
    """
    path = directory if root else os.path.join(directory, "state")
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    return _abstract_tree(tree if root else tree["params"])


def restore_param_tree(directory: str, target: Any, *, root: bool = False) -> Any:
    """Restores (a subset of) saved parameters onto `target` (ShapeDtypeStructs + shardings)."""
    path = directory if root else os.path.join(directory, "state")
    item = target if root else {"params": target}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
    return restored if root else restored["params"]


def restore_params(path: str, abstract_params: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores only the parameters of a training checkpoint (no optimizer state).

    `path` is a workdir, `checkpoints/` folder or step folder. `abstract_params`
    (ShapeDtypeStructs with shardings) places the arrays; None restores all of them
    as saved onto the first device. Returns (nested param dict, meta).
    """
    ckpt_dir, step = resolve_checkpoint(path)
    step_dir = os.path.join(ckpt_dir, str(step))
    if abstract_params is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
            saved_param_shapes(step_dir),
        )
    return restore_param_tree(step_dir, abstract_params), read_meta(step_dir)


def restore_model_from_workdir(
    path: str, mesh: jax.sharding.Mesh | None = None, **runtime: Any
) -> tuple[Any, dict[str, Any]]:
    """A `Neva` with the parameters of a training checkpoint, for evaluation/generation.

    `path`: a workdir (newest complete step), its `checkpoints/` folder or a step
    folder. `mesh`: place parameters by their logical axes (None: first device).
    `runtime`: run-time overrides on both sub-configs (`dtype`, `attention_impl`,
    `remat_policy`, `scan_layers`, `param_dtype`). Returns (model, info) with info =
    {"step", "model_config" (NevaConfig), "config" (run config dict), "tokenizer"
    (the workdir's tokenizer folder, or None), "checkpoint" (the step folder)}.
    """
    from flax import nnx

    from neva_jax import sharding
    from neva_jax.model import neva

    ckpt_dir, step = resolve_checkpoint(path)
    step_dir = os.path.join(ckpt_dir, str(step))
    meta = read_meta(step_dir)
    ncfg = neva.config_from_dict(meta["model_config"])
    if runtime:
        ncfg = neva.with_runtime(ncfg, **runtime)

    def make() -> Any:
        return neva.Neva(ncfg, rngs=nnx.Rngs(0))

    if mesh is not None:
        graphdef, abstract = sharding.abstract_sharded(make, mesh)
    else:
        with nnx.use_eager_sharding(False):
            graphdef, abstract = nnx.split(nnx.eval_shape(make))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract
        )
    target = nnx.to_pure_dict(abstract)
    params = restore_param_tree(step_dir, target)
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    tokenizer = os.path.join(os.path.dirname(ckpt_dir), "tokenizer")
    info = {
        "step": step,
        "model_config": ncfg,
        "config": meta.get("config", {}),
        "tokenizer": tokenizer if os.path.isdir(tokenizer) else None,
        "checkpoint": step_dir,
    }
    return model, info
