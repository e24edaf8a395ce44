"""Checkpoints on a small state: keep-N, half-written folders, non-finite refusal, resharding."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from neva_jax.convert import checkpoint
from neva_jax.run_config import TrainSection
from neva_jax.train import checkpointer
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib

TX = opt_lib.make_optimizer(TrainSection(steps=10))


def _state(standin, step=0):
    _, state = state_lib.create(standin(), ("projector", "llm"), TX)
    return state.replace(step=jnp.int32(step))


def _abstract(tree, sharding=None):
    def one(x):
        s = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree)


def test_save_keep_n_resume_and_half_written_ignored(tmp_path, standin):
    ck = checkpointer.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        assert ck.save(step, _state(standin, step).checkpoint_tree(), {"step": step})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    # A step folder that never committed (copied without its commit files) and an
    # Orbax temporary folder are both ignored; the newest complete step is 3.
    d = ck.directory
    shutil.copytree(os.path.join(d, "3", "state"), os.path.join(d, "9", "state"))
    os.makedirs(os.path.join(d, "7.orbax-checkpoint-tmp-123", "state"))
    ck.close()
    assert checkpoint.complete_steps(d) == [2, 3]
    ck = checkpointer.Checkpointer(str(tmp_path), keep=2)
    assert ck.latest_step() == 3
    assert os.path.isdir(os.path.join(d, "9.incomplete"))
    tree = _state(standin, 3).checkpoint_tree()
    restored, meta = ck.restore(3, _abstract(tree))
    assert meta == {"step": 3} and int(restored["step"]) == 3
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    ck.close()
    assert checkpoint.resolve_checkpoint(str(tmp_path)) == (d, 3)
    assert checkpoint.resolve_checkpoint(os.path.join(d, "2")) == (d, 2)
    assert checkpoint.read_meta(str(tmp_path))["step"] == 3


def test_close_waits_for_the_clean_up_of_an_earlier_runs_temporary_folders(tmp_path):
    """Orbax removes the temporary folders of a save that never committed in a thread
    started with the manager; a run that fails before its first save (a bad dataset)
    closes at once, and must not exit while that thread still runs."""
    tmp = os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR, "7.orbax-checkpoint-tmp-123")
    os.makedirs(os.path.join(tmp, "state"))
    checkpointer.Checkpointer(str(tmp_path)).close()
    assert not os.path.exists(tmp)


def test_non_finite_params_are_never_saved(tmp_path, standin):
    ck = checkpointer.Checkpointer(str(tmp_path), keep=2, async_save=False)
    tree = _state(standin, 1).checkpoint_tree()
    tree["params"]["projector"]["bias"] = tree["params"]["projector"]["bias"].at[0].set(jnp.nan)
    assert not ck.save(1, tree, {})
    ck.close()
    assert checkpoint.complete_steps(ck.directory) == []
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve_checkpoint(str(tmp_path))


def test_restore_params_onto_another_sharding(tmp_path, standin):
    ck = checkpointer.Checkpointer(str(tmp_path), keep=1, async_save=False)
    tree = _state(standin, 5).checkpoint_tree()
    ck.save(5, tree, {"model_config": {}})
    ck.close()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    params, meta = checkpoint.restore_params(str(tmp_path), _abstract(tree["params"], replicated))
    assert meta["step"] == 5
    leaf = jax.tree.leaves(params)[0]
    assert leaf.sharding == replicated and len(leaf.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Without a target: as saved, on one device; no optimizer state is read.
    params, _ = checkpoint.restore_params(str(tmp_path))
    assert set(params) == {"vision", "projector", "llm"}
