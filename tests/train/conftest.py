"""Fixtures for the training tests: a small stand-in for `Neva` (same top-level names and
step interface) and random batches in the docs/CONTRACTS.md layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neva_jax import sharding
from neva_jax.config import from_config_dict
from neva_jax.data import synth
from neva_jax.run_config import RunConfig
from neva_jax.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V, D, T, B = 32, 16, 12, 4


class StandInLlm(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.block = nnx.Linear(D, D, rngs=rngs)
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.lm_head(h).astype(jnp.float32)

    def last_layer(self, h, *, positions=None, segment_ids=None, queries=None):
        if queries is not None:  # the block is position-wise: the rows just go first
            h = jnp.take_along_axis(h, queries[:, :, None], axis=1)
        return self.final_norm(h + jnp.tanh(self.block(h)))


class StandIn(nnx.Module):
    """vision -> projector -> added to every token embedding -> llm."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.vision = nnx.Linear(3, 8, rngs=rngs)
        self.projector = nnx.Linear(8, D, rngs=rngs)
        self.llm = StandInLlm(rngs)

    def hidden_states(
        self, input_ids, images, *, positions=None, segment_ids=None, stop_before_last=False, **_
    ):
        feats = self.projector(self.vision(images.mean(axis=(1, 2, 3))))  # [B, D]
        x = self.llm.embed(input_ids) + feats[:, None, :]
        return x if stop_before_last else self.llm.last_layer(x)


def batch_of(ids: np.ndarray, mask: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
    """The docs/CONTRACTS.md batch of unpacked rows `ids` [B, T] (one sample each)."""
    b, t = ids.shape
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": mask,
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "images": images,
    }


def batch(seed: int = 0, b: int = B) -> dict[str, np.ndarray]:
    """A random batch in the docs/CONTRACTS.md layout (some rows with few trained tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(b, T)).astype(np.int32)
    mask = np.zeros((b, T), np.float32)
    for r in range(b):
        n = 2 + r % 3
        mask[r, T - 1 - n : T - 1] = 1.0
    return batch_of(ids, mask, rng.normal(size=(b, 1, 4, 4, 3)).astype(np.float32))


def inject_nan(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` whose first loss weight is NaN, so the step's loss and gradients are NaN."""
    mask = np.array(batch["loss_mask"], copy=True)
    mask.flat[0] = np.nan
    return {**batch, "loss_mask": mask}


@pytest.fixture
def nan_batch():
    """inject_nan(batch): the fault the non-finite tests feed the step."""
    return inject_nan


@pytest.fixture
def standin() -> type[StandIn]:
    return StandIn


@pytest.fixture
def make_batch():
    return batch


@pytest.fixture(scope="session")
def make_batch_of():
    """batch_of(ids, loss_mask, images): a batch of the given rows."""
    return batch_of


# ----------------------------------------------------------------------------------------
# The real tiny model on the bundled synthetic data.


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache: identical programs (resumed runs, subprocesses, the other
    xdist worker) compile once per test session."""
    base = tmp_path_factory.getbasetemp()
    path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@pytest.fixture
def kill_at_step(synth_dir, compilation_cache, signal_driver):
    """kill_at_step(step, stage, workdir, *flags): `python -m neva_jax.main` on the tiny
    config in a separate process, SIGKILLed right after step `step`'s checkpoint
    committed (tests/signal_at_step.py); checks it died so, with that checkpoint."""
    from neva_jax.convert import checkpoint

    def run(step: int, stage: str, workdir: str, *flags: str) -> None:
        cmd = [
            sys.executable,
            signal_driver[1],
            str(step),
            "SIGKILL",
            f"--config={ROOT}/configs/tiny.py:{stage},data_dir={synth_dir}",
            f"--workdir={workdir}",
            "--config.data.eval_files=()",
            *flags,
        ]
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [step]

    return run


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=96, n_eval=16)
    return out


@pytest.fixture
def tiny_config(synth_dir, tiny_dict):
    """tiny_config(variant, **changes) -> RunConfig of configs/tiny.py on the synthetic data."""

    def make(variant: str = "stage1", **changes: Any) -> RunConfig:
        return from_config_dict(tiny_dict(synth_dir, variant, **changes))

    return make


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl training lines by step (the last line per step wins)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows


@pytest.fixture
def metrics_of():
    return read_metrics


def initial_params(cfg: RunConfig) -> dict[str, Any]:
    """The random initialisation a run of `cfg` starts from (same construction, same mesh)."""
    import dataclasses

    constructor = build.model_constructor(
        dataclasses.replace(cfg.model, image_token_id=4), cfg.seed
    )
    model = sharding.create_sharded(constructor, build.run_mesh(cfg))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def same(a: Any, b: Any) -> bool:
    """Whether two pytrees hold bit-identical leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture
def init_params():
    """initial_params(cfg): the parameters a run of `cfg` is initialised with."""
    return initial_params


@pytest.fixture
def bit_identical():
    """same(a, b): two pytrees with bit-identical leaves."""
    return same
