"""Multi-process start-up on JAX's distributed runtime (multi-controller SPMD).

Every process runs the same program on its own devices; `jax.distributed`
connects them (a coordinator service on process 0) so that the mesh spans all
devices of all processes and XLA's collectives (NCCL on GPUs, gloo on CPUs) run
between them. Nothing here is ours beyond choosing the arguments:

    from neva_jax import distributed
    distributed.initialize()                                        # auto-detect
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # explicit

Where the values come from, first match wins:
1. explicit arguments (the trainer passes `config.distributed.*`);
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID` (the first is also read by JAX itself);
3. a SLURM step (`srun`, one task per GPU) or an Open MPI launch (`mpirun`):
   plain `jax.distributed.initialize()` detects them;
4. otherwise one process: nothing is initialised.

`initialize` must run before anything asks JAX for devices or creates an array.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Variables whose presence means the scheduler launched several tasks.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
_OMPI_SIZE = "OMPI_COMM_WORLD_SIZE"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: `source` is explicit | env | slurm | openmpi | single."""

    source: str
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str = ""

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def _scheduler(env: Mapping[str, str]) -> Launch | None:
    """The launch SLURM (`srun`) or Open MPI (`mpirun`) describes, if any."""
    if all(v in env for v in _SLURM_VARS):
        return Launch("slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    if _OMPI_SIZE in env:
        rank = _env_int(env, "OMPI_COMM_WORLD_RANK") or 0
        return Launch("openmpi", int(env[_OMPI_SIZE]), rank)
    return None


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Launch:
    """Resolves the launch from arguments, then environment, then scheduler (no side effects).

    Empty arguments (`""`, `None`, `num_processes <= 0`, `process_id < 0`) are unset; a
    scheduler fills what the others leave unset (an empty `coordinator_address` then
    means JAX's choice: the first node). Raises ValueError naming the missing value
    when a multi-process launch is only half specified.
    """
    env = os.environ if env is None else env
    explicit = bool(coordinator_address) or (num_processes or 0) > 0
    address = coordinator_address or env.get(ENV_COORDINATOR, "")
    count = num_processes if (num_processes or 0) > 0 else _env_int(env, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None and process_id >= 0 else None
    if pid is None:
        pid = _env_int(env, ENV_PROCESS_ID)
    sched = _scheduler(env)
    if count is None and not address:
        return sched if sched and sched.multi_process else Launch("single")
    source = "explicit" if explicit else "env"
    if sched is not None:
        count = sched.num_processes if count is None else count
        pid = sched.process_id if pid is None else pid
    if count == 1:
        return Launch(source, 1, 0, address)
    for name, value in (
        ("coordinator_address", address or ("(the scheduler's)" if sched else "")),
        ("num_processes", count),
        ("process_id", pid),
    ):
        if value in (None, ""):
            raise ValueError(
                f"config.distributed.{name} is not set (nor {ENV_COORDINATOR}/"
                f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); a multi-process launch needs "
                "coordinator_address (host:port of process 0), num_processes and process_id"
            )
    if not 0 <= pid < count:
        raise ValueError(
            f"config.distributed.process_id={pid}: must be in [0, num_processes={count})"
        )
    return Launch(source, count, pid, address)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> Launch:
    """Starts JAX's distributed runtime when this is a multi-process launch; returns it.

    One process (the default): does nothing. Calling it again after a successful
    initialisation is a no-op. Under SLURM/Open MPI JAX itself reads what is not given
    (coordinator = first node, port derived from the job id; with one task per GPU each
    process takes the GPU of its local rank).
    """
    launch = detect(coordinator_address, num_processes, process_id)
    if not launch.multi_process or jax.distributed.is_initialized():
        return launch
    explicit = launch.source in ("explicit", "env")
    jax.distributed.initialize(
        launch.coordinator_address or None,
        num_processes=launch.num_processes if explicit else None,
        process_id=launch.process_id if explicit else None,
        initialization_timeout=initialization_timeout,
    )
    logging.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices",
        launch.source,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return launch


def is_primary() -> bool:
    """Whether this is process 0: the one that writes metrics, logs and reports."""
    return jax.process_index() == 0


def reached_preemption_sync_point(step: int) -> bool:
    """Whether all processes agreed to stop and save at `step` (multi-process only).

    JAX's preemption sync manager (started by `jax.distributed.initialize`) catches
    SIGTERM on any process and picks one step at which all of them save; every process
    must call this once per step with the same step numbers. Single process: False
    (the trainer's own SIGTERM handler covers it).
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
