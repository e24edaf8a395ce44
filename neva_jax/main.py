"""Entry point: train or evaluate a NeVA experiment.

    python -m neva_jax.main --config configs/F.py[:ARG] --workdir DIR [--mode train|eval|plan] \\
        [--config.KEY=VALUE ...]

Training resumes from the newest complete checkpoint in DIR. `--mode plan` prints the
per-device memory plan of the config (`neva_jax.train.plan`; `config.plan.*`) and
compiles nothing. Several processes (one per host or GPU) join through
`neva_jax.distributed` (`config.distributed.*`, or SLURM / Open MPI / JAX_* variables);
only process 0 writes metrics and logs, all take part in checkpoints (launch/*.sh). Exit status: 0 the job
finished (or saved and stopped on SIGTERM); 2 a bad flag, config value or dataset
(one line on stderr naming the key or file, before anything is compiled); 3 the
run stopped after `train.max_consecutive_nonfinite` non-finite steps in a row.
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import logging as pylogging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from neva_jax.config import (
    ConfigError,
    error_line,
    from_config_dict,
    load_error_line,
    unknown_key_line,
)

EXIT_USAGE = 2
EXIT_NONFINITE = 3

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file: configs/F.py[:ARG]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, logs")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "plan"], "train, evaluate a checkpoint, or plan memory"
)


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    """Prints `error: message` as one line on stderr and exits."""
    line = " ".join(str(message).split())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose every failure is one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # config_flags: --config.KEY that does not exist
        _fail(unknown_key_line(e, argv) or f"--config: KeyError: {e}")  # else: the file's
    except (flags.Error, ValueError, TypeError, FileNotFoundError) as e:
        _fail(error_line(e))
    except Exception as e:  # the config file itself failed to import or run
        _fail(f"--config: {type(e).__name__}: {e}")
    return []  # unreachable


def _config_value():
    """The parsed ConfigDict, or a one-line failure if the file could not be loaded."""
    value = _CONFIG.value
    problem = load_error_line(value, flags.FLAGS["config"].config_filename)
    if problem:
        _fail(problem)
    return value


class _OwnInfoOnly(pylogging.Filter):
    """Keeps INFO lines from neva_jax only; libraries (Orbax, grain, ...) log warnings up."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}neva_jax{os.sep}" in record.pathname


def _start_distributed(raw: Any) -> None:
    """`jax.distributed` from `config.distributed` (before any JAX backend use); other
    processes than 0 log warnings only, unless --verbosity/-v is given."""
    from neva_jax import distributed

    d = raw.distributed
    distributed.initialize(
        d.coordinator_address,
        d.num_processes,
        d.process_id,
        initialization_timeout=d.initialization_timeout,
    )
    if not distributed.is_primary() and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _plan(raw: Any) -> None:
    """`--mode plan`: the memory plan on `plan.num_devices` devices, printed to stdout."""
    import jax

    from neva_jax.train import plan

    num_devices = raw.plan.num_devices or jax.device_count()
    cfg = from_config_dict(raw, num_devices=num_devices, check_environment=False)
    device_bytes = plan.device_memory_bytes(cfg.plan.device_memory_gb)
    print(plan.report(cfg, num_devices, device_bytes, cfg.plan.memory_fraction), flush=True)


def main(argv: Sequence[str]) -> None:
    """Dispatches to training, evaluation or the memory plan."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        _fail("--config is required: --config=configs/F.py[:ARG]")
    if not _WORKDIR.value:
        _fail("--workdir is required: the folder for checkpoints and metrics")
    # Imported here so that `--help` and flag errors stay fast.
    from neva_jax.data.dataset import DataError
    from neva_jax.train import loop

    raw = _config_value()
    try:
        if _MODE.value == "plan":
            _plan(raw)
            return
        _start_distributed(raw)  # before anything asks JAX for devices; 1 process: no-op
        cfg = from_config_dict(raw)
        if _MODE.value == "train":
            loop.train(cfg, _WORKDIR.value)
        else:
            loop.evaluate(cfg, _WORKDIR.value)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except loop.NonFiniteError as e:
        _fail(str(e), EXIT_NONFINITE)
    except (ValueError, FileNotFoundError) as e:
        # Errors that name a config key (tokenizer, data files, imports) are usage errors.
        if str(e).startswith(("config.", "--config")):
            _fail(str(e))
        raise


def run() -> None:
    """`python -m neva_jax.main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
