"""metrics.jsonl writing/truncation and the model-FLOPs convention (no compilation)."""

import json

import jax
import numpy as np

from neva_jax.train import metrics as metrics_lib


def test_writer_lines_and_drop_after(tmp_path):
    w = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2, 3):
        w.write(step, {"loss": np.float32(1.0 / step), "nonfinite_count": np.int32(0)})
    w.write(3, {"eval/loss": 0.5})
    w.drop_after(2)
    w.write(3, {"loss": 0.25, "finite": np.bool_(True)})
    w.close()
    lines = (tmp_path / metrics_lib.METRICS_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "loss": 1.0, "nonfinite_count": 0}
    assert rows[2]["finite"] is True
    assert list((tmp_path / "tensorboard").iterdir())  # event files


def test_a_step_keeps_one_eval_line(tmp_path):
    """A second evaluation of a step (--mode eval again, a finished run started again)
    replaces the first; it appended a second line."""
    w = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    w.write(4, {"loss": 1.0})
    w.write(4, {"eval/loss": 0.5})
    w.write(6, {"eval/loss": 0.4})
    w.write(4, {"eval/loss": 0.3})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / metrics_lib.METRICS_FILE).read_text().splitlines()]
    assert rows == [
        {"step": 4, "loss": 1.0},
        {"step": 6, "eval/loss": 0.4},
        {"step": 4, "eval/loss": 0.3},
    ]


def test_model_flops_convention():
    D, F, V, L, S = 8, 16, 32, 2, 10
    params = {
        "llm": {
            "embed": {"embedding": np.zeros((V, D))},  # excluded
            "layers": {"mlp": {"up": {"kernel": np.zeros((L, D, F))}}},
            "final_norm": {"scale": np.zeros((D,))},  # excluded
            "lm_head": {"kernel": np.zeros((D, V))},
        },
        "vision": {"patch_embed": {"kernel": np.zeros((4, 4, 3, D))}},
        "projector": {"linear_1": {"kernel": np.zeros((D, D))}},
    }
    n_llm = L * D * F + D * V
    common = dict(tokens=100, seq_len=S, images=2, image_tokens=20, num_layers=L, hidden_size=D)
    stage1 = metrics_lib.model_flops_per_step(params, trained_parts=("projector",), **common)
    stage2 = metrics_lib.model_flops_per_step(params, trained_parts=("projector", "llm"), **common)
    vision = 2 * (4 * 4 * 3 * D) * 10 * 2  # forward only: 10 patches per image, 2 images
    projector = 6 * D * D * 20
    assert stage1 == (4 * n_llm + 4 * S * D * L) * 100 + vision + projector
    assert stage2 == (6 * n_llm + 6 * S * D * L) * 100 + vision + projector


def test_no_mfu_without_a_measured_peak():
    assert metrics_lib.measured_peak_flops(jax.devices()[0]) is None  # CPU
