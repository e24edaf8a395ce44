"""Fixtures for the scale-out tests: the synthetic dataset and configs/tiny.py."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

from neva_jax.config import RunConfig, from_config_dict
from neva_jax.data import synth

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=64, n_eval=8)
    return out


def tiny_dict(data_dir: str, variant: str = "stage2", **changes: Any) -> dict[str, Any]:
    """configs/tiny.py as a plain dict with dotted-key `changes` applied."""
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config(f"{variant},data_dir={data_dir}").to_dict()
    for key, value in changes.items():
        *parents, name = key.split(".")
        target = cd
        for part in parents:
            target = target[part]
        target[name] = value
    return cd


@pytest.fixture(scope="session")
def tiny_config(synth_dir):
    """tiny_config(variant, **changes) -> RunConfig of configs/tiny.py on the synthetic data."""

    def make(variant: str = "stage2", **changes: Any) -> RunConfig:
        return from_config_dict(tiny_dict(synth_dir, variant, **changes))

    return make
