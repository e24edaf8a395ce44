"""Two processes on 127.0.0.1, each with 4 simulated CPU devices, form one 8-device mesh
(fsdp 4 x tensor 2) through `jax.distributed`: 3 steps of the tiny config give the
losses of one process with 8 devices, each process reads its own disjoint shard of
the data, a SIGTERM makes both stop and save at one agreed step (JAX's preemption
sync point), and that checkpoint restores in a single process that trains on.

Every run is `python -m neva_jax.main` in subprocesses with a deadline (the two that
SIGTERM themselves start it through tests/signal_at_step.py); when one fails
or hangs, all of them are killed and its log tail is shown.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from compile_flags import FAST_COMPILE

from neva_jax.convert import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 3
DEADLINE = 420  # seconds per phase: a hang fails the test (a loaded 2-core CPU takes ~170 s)
MAX_STEPS = 200  # the two-process run stops at the preemption sync point long before
RECORDS = re.compile(r"data batch \d+ records (\[.*\])")
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        JAX_COMPILATION_CACHE_DIR=cache,  # the resumed run reuses the reference's programs
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _main(synth_dir: str, workdir: str, *extra: str, runner: tuple[str, ...] = ()) -> list[str]:
    """`python -m neva_jax.main` with the common flags (`runner`: another way to start it)."""
    return [
        sys.executable,
        *(runner or ("-m", "neva_jax.main")),
        f"--config={TINY}:stage1,data_dir={synth_dir}",
        f"--workdir={workdir}",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        f"--config.checkpoint.every_steps={STEPS}",
        "--config.data.eval_files=()",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=4",
        "--config.mesh.tensor=2",
        "--v=1",  # the pipeline logs the record ids of each batch
        *extra,
    ]


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]], logs: str) -> dict[str, str]:
    """Starts every job at once, waits for all; returns {name: log text}.

    A job that fails, or any job still running at the deadline, kills them all.
    """
    procs, files = {}, {}
    for name, (cmd, env) in jobs.items():
        files[name] = open(os.path.join(logs, f"{name}.log"), "w+")  # noqa: SIM115
        procs[name] = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=files[name], stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + DEADLINE
    failed = None
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        failed = failed or next((n for n, p in procs.items() if p.poll() != 0), None)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    out = {}
    for name, f in files.items():
        f.seek(0)
        out[name] = f.read()
        f.close()
    if failed:
        rc = procs[failed].returncode
        pytest.fail(f"{failed} ended with status {rc}:\n{out[failed][-3000:]}")
    return out


def _losses(workdir: str) -> dict[int, float]:
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                assert row["step"] not in rows, f"step {row['step']} written twice"
                rows[row["step"]] = row["loss"]
    return rows


def _records(log: str, batches: int | None = None) -> list[str]:
    """Record ids of the first `batches` batches this process's pipeline logged."""
    found = [json.loads(m.group(1)) for m in RECORDS.finditer(log)]
    return [r for batch in found[:batches] for r in batch]


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory, signal_driver):
    base = tmp_path_factory.mktemp("multiprocess")
    cache, logs = str(base / "jax_cache"), str(base)
    two, one, resumed = (str(base / n) for n in ("two", "one", "resumed"))
    address = f"127.0.0.1:{_free_port()}"
    jobs = {
        f"p{i}": (
            _main(
                synth_dir,
                two,
                f"--config.distributed.coordinator_address={address}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                f"--config.train.steps={MAX_STEPS}",
                "--config.checkpoint.every_steps=1000",
                runner=(signal_driver[1], str(STEPS), "SIGTERM"),  # each SIGTERMs itself
            ),
            _env(4, cache),
        )
        for i in range(2)
    }
    jobs["single"] = (_main(synth_dir, one), _env(8, cache))
    out = _run_all(jobs, logs)
    stops = {int(m) for i in range(2) for m in STOPPED.findall(out[f"p{i}"])}
    assert len(stops) == 1, f"processes stopped at steps {stops}"
    stop = stops.pop()
    shutil.copytree(two, resumed)
    cmd = _main(synth_dir, resumed, f"--config.train.steps={stop + 2}")
    out.update(_run_all({"resumed": (cmd, _env(8, cache))}, logs))
    return {"two": two, "one": one, "resumed": resumed, "logs": out, "stop": stop}


def test_two_processes_match_one_process(runs):
    two, one = _losses(runs["two"]), _losses(runs["one"])
    assert sorted(two) == list(range(1, runs["stop"] + 1))  # process 0 wrote each step once
    assert sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5
    )
    meta = checkpoint.read_meta(runs["two"])
    assert meta["mesh"]["processes"] == 2 and meta["mesh"]["devices"] == 8
    assert "step 3/" in runs["logs"]["p0"] and "step 3/" not in runs["logs"]["p1"]


def test_sigterm_stops_both_processes_at_one_step_with_a_checkpoint(runs):
    stop = runs["stop"]
    assert STEPS < stop < MAX_STEPS
    assert checkpoint.complete_steps(os.path.join(runs["two"], "checkpoints")) == [stop]


def test_each_process_reads_a_disjoint_shard(runs):
    logs = runs["logs"]
    p0, p1 = (_records(logs[n], STEPS) for n in ("p0", "p1"))
    single = _records(logs["single"])
    assert len(p0) == len(p1) == STEPS * 4 and len(single) == STEPS * 8
    assert not set(p0) & set(p1)
    assert set(p0) | set(p1) == set(single)  # together: the stream one process reads


def test_two_process_checkpoint_restores_in_one_process(runs):
    stop = runs["stop"]
    losses = _losses(runs["resumed"])
    assert sorted(losses) == list(range(1, stop + 3))
    assert all(np.isfinite(list(losses.values())))
    # The single process continues the stream where the two left it: 8 records per step.
    assert f"resharded for 1: this process resumes at record {stop * 8}" in runs["logs"]["resumed"]
    assert checkpoint.complete_steps(os.path.join(runs["resumed"], "checkpoints"))[-1] == stop + 2
