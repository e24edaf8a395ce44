"""Fixtures for the scale-out tests: the synthetic dataset and configs/tiny.py."""

from __future__ import annotations

from typing import Any

import pytest

from neva_jax.config import from_config_dict
from neva_jax.data import synth
from neva_jax.run_config import RunConfig


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=64, n_eval=8)
    return out


@pytest.fixture(scope="session")
def tiny_config(synth_dir, tiny_dict):
    """tiny_config(variant, **changes) -> RunConfig of configs/tiny.py on the synthetic data."""

    def make(variant: str = "stage2", **changes: Any) -> RunConfig:
        return from_config_dict(tiny_dict(synth_dir, variant, **changes))

    return make
