"""Exact resume: SIGKILL after step 3's checkpoint, SIGTERM at step 5, finish at 6.

The losses of every step and the final parameters equal those of an uninterrupted
6-step run; a half-written step folder is set aside; SIGTERM leaves a restorable
checkpoint at the step it arrived.
"""

import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np

from neva_jax.convert import checkpoint
from neva_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = {
    "train.steps": 6,
    "train.log_every": 1,
    "checkpoint.every_steps": 3,
    "checkpoint.keep": 2,
    "data.eval_files": (),
}


def test_sigkill_sigterm_resume_equals_uninterrupted(
    tmp_path, synth_dir, tiny_config, metrics_of, compilation_cache, signal_driver
):
    driver, driver_path = signal_driver
    ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    loop.train(tiny_config("stage1", **RUN), ref_dir)
    ref_rows = metrics_of(ref_dir)
    assert sorted(ref_rows) == [1, 2, 3, 4, 5, 6]

    # 1. A separate process (neva_jax.main), SIGKILLed right after step 3's checkpoint
    # committed.
    args = [f"--config.{k}={v}" for k, v in RUN.items() if k != "data.eval_files"]
    cmd = [
        sys.executable,
        driver_path,
        "3",
        "SIGKILL",
        f"--config={ROOT}/configs/tiny.py:stage1,data_dir={synth_dir}",
        f"--workdir={run_dir}",
        "--config.data.eval_files=()",
        *args,
    ]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert checkpoint.complete_steps(ckpt_dir) == [3]

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
