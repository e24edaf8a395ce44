"""Exact resume: SIGKILL after step 3's checkpoint, SIGTERM at step 5, finish at 6.

The losses of every step and the final parameters equal those of an uninterrupted
6-step run; a half-written step folder is set aside; SIGTERM leaves a restorable
checkpoint at the step it arrived.
"""

import os
import shutil
import signal

import jax
import numpy as np

from neva_jax.convert import checkpoint
from neva_jax.train import loop

RUN = {
    "train.steps": 6,
    "train.log_every": 1,
    "checkpoint.every_steps": 3,
    "checkpoint.keep": 2,
    "data.eval_files": (),
}


def test_sigkill_sigterm_resume_equals_uninterrupted(
    tmp_path, tiny_config, metrics_of, signal_driver, kill_at_step
):
    driver, _ = signal_driver
    ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    loop.train(tiny_config("stage1", **RUN), ref_dir)
    ref_rows = metrics_of(ref_dir)
    assert sorted(ref_rows) == [1, 2, 3, 4, 5, 6]

    # 1. A separate process (neva_jax.main), SIGKILLed right after step 3's checkpoint
    # committed.
    args = [f"--config.{k}={v}" for k, v in RUN.items() if k != "data.eval_files"]
    kill_at_step(3, "stage1", run_dir, *args)
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    # 2. A half-written step folder (no commit files) must be ignored on resume.
    shutil.copytree(os.path.join(ckpt_dir, "3", "state"), os.path.join(ckpt_dir, "4", "state"))

    # 3. Resume; SIGTERM arrives during step 5: the run saves step 5, commits, returns.
    sigterm_at_5 = loop.Hooks(after_step=(driver.signal_at(5, signal.SIGTERM),))
    summary = loop.train(tiny_config("stage1", **RUN), run_dir, hooks=sigterm_at_5)
    assert summary == {"step": 5, "stopped": "SIGTERM"}
    assert checkpoint.complete_steps(ckpt_dir) == [3, 5]
    assert os.path.isdir(os.path.join(ckpt_dir, "4.incomplete"))
    params5, meta5 = checkpoint.restore_params(run_dir)
    assert meta5["step"] == 5 and all(np.isfinite(x).all() for x in jax.tree.leaves(params5))

    # 4. Resume again and finish.
    loop.train(tiny_config("stage1", **RUN), run_dir)
    rows = metrics_of(run_dir)
    assert sorted(rows) == sorted(ref_rows)
    for step, ref in ref_rows.items():
        assert rows[step]["loss"] == ref["loss"], step
        assert rows[step]["grad_norm"] == ref["grad_norm"], step
    final, _ = checkpoint.restore_params(run_dir)
    expected, _ = checkpoint.restore_params(ref_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
