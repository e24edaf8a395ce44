"""`neva_jax.demo`'s report: the loss plot of both stages and the summary table.

The demo itself (data, two training stages, evaluation) is `make demo`; these check
the parts that need no training, on metrics files written here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from neva_jax import demo


def _write_metrics(workdir: Path, steps: int, eval_every: int) -> None:
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for step in range(10, steps + 1, 10):
            f.write(json.dumps({"step": step, "loss": 5.0 / step, "accuracy": step / steps}) + "\n")
            if step % eval_every == 0:
                row = {"step": step, "eval/loss": 6.0 / step, "eval/accuracy": 0.9}
                f.write(json.dumps(row) + "\n")


def test_plot_losses_writes_a_png_with_both_stages(tmp_path: Path):
    _write_metrics(tmp_path / "stage1", 50, 50)
    _write_metrics(tmp_path / "stage2", 200, 100)
    path = demo.plot_losses(tmp_path / "stage1", tmp_path / "stage2", tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def _score(acc: float) -> dict[str, float]:
    cats = ("colour", "shape", "where", "count")
    return {"accuracy": acc, "count": 800, **{f"accuracy/{c}": acc for c in cats}}


def test_format_summary_lists_every_type_and_the_baselines():
    stage = {"steps": 10, "seconds": 12.0, "final_loss": 0.5, "heldout_loss": None}
    summary = {
        "stage1": {**stage, "workdir": "runs/demo/stage1"},
        "stage2": {**stage, "workdir": "runs/demo/stage2", "heldout_loss": 0.01},
        "heldout": {"image": _score(0.975), "blank": _score(0.125), "other": _score(0.25)},
        "chance": {"colour": 0.125, "shape": 1 / 3, "where": 0.25, "count": 0.25, "mean": 0.24},
        "categories": ["colour", "shape", "where", "count"],
        "example": {"image": "x.png", "question": "Q?", "answer": "two", "reference": "two"},
        "plot": "runs/demo/loss_curves.png",
        "eval_dir": "runs/demo/eval",
        "summary_path": "runs/demo/summary.json",
        "logs": "runs/demo/logs",
        "total_seconds": 300.0,
    }
    text = demo.format_summary(summary)
    for word in ("colour", "shape", "where", "count", "all", "0.975", "0.125", "0.240"):
        assert word in text
    assert "runs/demo/loss_curves.png" in text


def test_a_failing_command_names_its_log(tmp_path: Path):
    with pytest.raises(demo.DemoError, match=r"status 3.*fail\.log"):
        demo.run_command([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "fail.log")
