"""Test-wide set-up: 8 simulated CPU devices, set before JAX starts a backend."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    from compile_flags import FAST_COMPILE  # tests/compile_flags.py: why these flags

    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Imported after the environment above is set.
import importlib.util
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_dict():
    """tiny_dict(data_dir, variant, **changes) -> configs/tiny.py as a plain dict with
    dotted-key `changes` applied (the train and scale fixtures build on it)."""
    spec = importlib.util.spec_from_file_location("tiny_config", f"{ROOT}/configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make(data_dir: str, variant: str, **changes: Any) -> dict[str, Any]:
        cd = module.get_config(f"{variant},data_dir={data_dir}").to_dict()
        for key, value in changes.items():
            *parents, name = key.split(".")
            target = cd
            for part in parents:
                target = target[part]
            target[name] = value
        return cd

    return make


@pytest.fixture(scope="session")
def signal_driver():
    """tests/signal_at_step.py: the module (its `signal_at` hook) and its path (a driver)."""
    path = f"{ROOT}/tests/signal_at_step.py"
    spec = importlib.util.spec_from_file_location("signal_at_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


@pytest.fixture(scope="session")
def llama3_theta_folder(tmp_path_factory, tiny_dict):
    """A model folder of configs/tiny.py's architecture but rope theta 500000 (as a
    Llama-3 LLM has), for the init_from architecture checks."""
    import dataclasses

    from flax import nnx

    from neva_jax.config import model_config
    from neva_jax.convert import checkpoint
    from neva_jax.model.neva import Neva
    from neva_jax.sharding import unsharded

    cfg = model_config(tiny_dict("unused", "stage1"))
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, rope_theta=500000.0))
    out = tmp_path_factory.mktemp("theta") / "model"
    checkpoint.save_model(out, unsharded(lambda: Neva(cfg, rngs=nnx.Rngs(0))))
    return str(out)
