"""Writing and resuming a training run's Orbax checkpoints.

Layout under a workdir (docs/CONTRACTS.md; the constants and every reader live in
`neva_jax.convert.checkpoint`, the one restore path):

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

from neva_jax.convert.checkpoint import CHECKPOINT_DIR, ITEMS, complete_steps, is_complete_step

# Replicated arrays are written by all their replicas in parallel (Orbax's default)
# only when each replica's slice has at least this many bytes: below it the slicing
# costs more (one small compile per shape) than it saves.
MIN_REPLICA_PARALLEL_BYTES = 4 << 20


def set_aside_incomplete(ckpt_dir: str) -> list[str]:
    """Renames step-named folders that never committed to `STEP.incomplete[.k]`."""
    moved = []
    if not os.path.isdir(ckpt_dir) or jax.process_index() != 0:
        return moved
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.isdigit() and os.path.isdir(path) and not is_complete_step(path):
            target, k = f"{path}.incomplete", 0
            while os.path.exists(target):
                k += 1
                target = f"{path}.incomplete.{k}"
            os.rename(path, target)
            logging.warning("checkpoint %s is incomplete; moved aside to %s", path, target)
            moved.append(target)
    return moved


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
        """Waits for pending saves and for Orbax's clean-up of an earlier run's temporary
        folders, then releases the manager."""
        self._manager.wait_until_finished()
        # The manager starts that clean-up in a thread when it is made and awaits it only
        # before its first save; `close` does not. A run that fails before saving (a bad
        # dataset) would exit with the thread still running and Python would print its
        # "cannot schedule new futures after interpreter shutdown" traceback.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
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
