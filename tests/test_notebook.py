"""The Colab quickstart runs top to bottom, headless, with its step counts reduced.

The notebook executes in a Jupyter kernel started from this environment's Python
(a kernel spec written to a temporary folder), from the repository root (where a
clone's `configs/demo.py` is), with one CPU device instead of the tests' eight.
Its parameter cell (tagged `parameters`) gets smaller values appended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from compile_flags import FAST_COMPILE
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "neva-jax-test"


def _reduced_parameters(workdir: Path) -> str:
    return "\n".join(
        [
            "# Reduced by tests/test_notebook.py.",
            f"WORKDIR = {str(workdir)!r}",
            "N_TRAIN = 256",
            "N_EVAL = 4",
            "STAGE1_STEPS = 4",
            "STAGE2_STEPS = 12",
            "BATCH_SIZE = 8",
        ]
    )


def _write_kernel_spec(root: Path) -> Path:
    """A kernel spec that starts this Python with one CPU device; returns its data dir."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "neva-jax test",
        "language": "python",
        # The tests simulate 8 devices (conftest.py); the notebook is a one-device user.
        "env": {
            "XLA_FLAGS": FAST_COMPILE,
            "JAX_PLATFORMS": "cpu",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # plots as outputs
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_parameter_cell_is_tagged():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("WORKDIR", "N_TRAIN", "STAGE1_STEPS", "STAGE2_STEPS"):
        assert f"{name} =" in tagged[0].source


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    workdir = tmp_path / "run"
    params.source += "\n\n" + _reduced_parameters(workdir)
    monkeypatch.setenv("JUPYTER_PATH", str(_write_kernel_spec(tmp_path / "jupyter")))

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=300,
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    client.execute()

    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "answers identically" in outputs
    assert "accuracy" in outputs
    for stage in ("stage1", "stage2"):
        assert (workdir / stage / "metrics.jsonl").is_file()
        assert any((workdir / stage / "checkpoints").iterdir())
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the data, the loss curves, the answered images
