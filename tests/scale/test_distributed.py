"""Where a launch's coordinator, process count and id come from; the data iterator's
position carried across a change in the number of processes."""

import pytest

from neva_jax import distributed
from neva_jax.data import pipeline


def test_detect_explicit_env_scheduler_and_single():
    d = distributed.detect
    assert d("127.0.0.1:1234", 2, 1, env={}) == distributed.Launch(
        "explicit", 2, 1, "127.0.0.1:1234"
    )
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert d(env=env) == distributed.Launch("env", 4, 3, "h:1")
    assert d("", 0, -1, env=env).source == "env"  # config defaults mean "unset"
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
    }
    assert d(env=slurm) == distributed.Launch("slurm", 16, 9)
    assert not d(env={**slurm, "SLURM_NTASKS": "1"}).multi_process  # one task: no runtime
    # An explicit value overrides the scheduler's, which fills the rest.
    assert d("10.0.0.1:9", env=slurm) == distributed.Launch("explicit", 16, 9, "10.0.0.1:9")
    assert d(env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}).process_id == 1
    assert d(env={}) == distributed.Launch("single")
    assert not d(num_processes=1, env={}).multi_process


def test_half_specified_launch_names_the_missing_key():
    with pytest.raises(ValueError, match=r"^config\.distributed\.process_id is not set"):
        distributed.detect("127.0.0.1:1", 2, env={})
    with pytest.raises(ValueError, match=r"^config\.distributed\.coordinator_address"):
        distributed.detect(num_processes=2, process_id=0, env={})
    with pytest.raises(ValueError, match=r"process_id=2: must be in \[0, num_processes=2\)"):
        distributed.detect("h:1", 2, 2, env={})


def test_initialize_single_process_does_nothing(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() == distributed.Launch("single")
    assert distributed.is_primary()
    assert not distributed.reached_preemption_sync_point(1)


def _state(next_index: int, read: int, skipped: dict) -> dict:
    stats = pipeline.BatchIterator._new_stats()
    stats.update(samples_read=read, batches=3, skipped=skipped)
    return {"parent": {"next_index": next_index}, "stats": stats, "exhausted": False}


def test_reshard_data_state_continues_the_stream():
    saved = [_state(12, 12, {"missing_image": 1}), _state(12, 12, {"missing_image": 2})]
    one = pipeline.reshard_state(saved, 0, 1)
    assert one["parent"] == {"next_index": 24}  # records 0..23 were read by the two
    assert one["stats"]["samples_read"] == 24 and one["stats"]["skipped"] == {"missing_image": 3}
    # Four processes: 24 records read; process j starts at its first record >= 24.
    four = [pipeline.reshard_state(saved, j, 4)["parent"]["next_index"] for j in range(4)]
    assert four == [6, 6, 6, 6]
    three = [
        pipeline.reshard_state([_state(5, 5, {})], j, 3)["parent"]["next_index"] for j in range(3)
    ]
    assert three == [2, 2, 1]  # records 5, 6, 7 -> process 2, 0, 1
    assert pipeline.reshard_state([{"parent": {"workers_state": {}}}], 0, 2) is None
    assert pipeline.reshard_state(saved, 1, 2)["stats"]["samples_read"] == 0
