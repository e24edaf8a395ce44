"""`python -m neva_jax.data synth|inspect|validate` and the synthetic dataset."""

from __future__ import annotations

import filecmp
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from neva_jax.data import synth
from neva_jax.data.__main__ import main

CONFIG = """
import ml_collections

def get_config(arg="stage2"):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.use_im_start_end = False
    c.model.vision_encoder = ml_collections.ConfigDict(
        dict(image_size=64, patch_dim=8, class_token_length=1))
    c.data = ml_collections.ConfigDict(dict(
        train_files={train!r} if arg == "stage2" else {stage1!r},
        eval_files={eval!r},
        image_folder={images!r},
        tokenizer={tokenizer!r},
        template="vicuna_v1" if arg == "stage2" else "plain",
        max_seq_len=256,
        max_images_per_row=2,
        read_threads=1,
        max_skip_ratio=0.01,
    ))
    c.train = ml_collections.ConfigDict(dict(batch_size=4))
    return c
"""


def _config(tmp_path, data_dir: str, train: str, images: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        CONFIG.format(
            train=train,
            stage1=os.path.join(data_dir, "stage1.json"),
            eval=os.path.join(data_dir, "stage2_eval.json"),
            images=images,
            tokenizer=os.path.join(data_dir, "tokenizer"),
        )
    )
    return str(path)


@pytest.fixture
def synth_config(tmp_path, synth_dir: str) -> str:
    return _config(
        tmp_path,
        synth_dir,
        os.path.join(synth_dir, "stage2.json"),
        os.path.join(synth_dir, "images"),
    )


def test_synth_is_deterministic_per_seed(tmp_path) -> None:
    dirs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = str(tmp_path / name)
        assert (
            main(["synth", "--out", out, "--seed", str(seed), "--n-train", "12", "--n-eval", "3"])
            == 0
        )
        dirs.append(out)
    cmp = filecmp.dircmp(dirs[0], dirs[1])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ("images/train", "images/eval", "tokenizer"):
        m = filecmp.cmpfiles(
            os.path.join(dirs[0], sub),
            os.path.join(dirs[1], sub),
            os.listdir(os.path.join(dirs[0], sub)),
            shallow=False,
        )
        assert not m[1] and not m[2], sub
    assert not filecmp.cmp(
        os.path.join(dirs[0], "stage2.json"), os.path.join(dirs[2], "stage2.json"), shallow=False
    )


def test_synth_layout_and_answers(synth_dir: str) -> None:
    root = pathlib.Path(synth_dir)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["chance"]["mean"] <= 0.25
    questions = [json.loads(x) for x in (root / "eval_questions.jsonl").read_text().splitlines()]
    answers = (root / "eval_answers.jsonl").read_text().splitlines()
    refs = {r["question_id"]: r for r in map(json.loads, answers)}
    assert len(questions) == 4 * meta["n_eval"]
    vocab = {
        "colour": synth.COLOURS,
        "shape": synth.SHAPES,
        "where": synth.WHERE,
        "count": synth.COUNTS,
    }
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"} and "<image>" not in q["text"]
        assert refs[q["question_id"]]["answer"] in vocab[q["category"]]
        assert os.path.exists(os.path.join(synth_dir, "images", q["image"]))
    stage2 = json.loads((root / "stage2.json").read_text())
    assert len(stage2) == meta["n_train"] and len(stage2[0]["conversations"]) == 8
    img = Image.open(os.path.join(synth_dir, "images", stage2[0]["image"]))
    assert img.size == (64, 64) and img.mode == "RGB"
    # the answer is visible: the quadrant holding the shapes differs from the background
    arr = np.asarray(img).astype(int)
    where = next(t["value"] for t in stage2[0]["conversations"][1::2] if t["value"] in synth.WHERE)
    q = synth.WHERE.index(where)
    quad = arr[(q // 2) * 32 : (q // 2) * 32 + 32, (q % 2) * 32 : (q % 2) * 32 + 32]
    assert quad.std() > 3 * arr[arr.sum(-1) < 200].std() + 1


def test_inspect_shows_what_is_trained(synth_config: str, capsys) -> None:
    assert main(["inspect", "--config", f"{synth_config}:stage2", "--index", "5", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert "stage2.json record 5 (id 'train_000005')" in out
    assert "image slots 64 at [" in out and "<image x64>" in out
    assert out.count("ASSISTANT:⟦ ") == 4 and out.count("</s>⟧") == 4
    assert (
        main(["inspect", f"--config={synth_config}:stage1", "--config.data.max_seq_len=100"]) == 0
    )
    out = capsys.readouterr().out
    assert "template plain" in out and "<image x64>⟦" in out and "of max_seq_len 100" in out


def test_validate_synthetic_passes(synth_config: str, capsys) -> None:
    assert main(["validate", "--config", synth_config]) == 0
    out = capsys.readouterr().out
    assert "records 112: good 112, skipped 0" in out and "OK" in out
    assert "non-padding fraction (batch 4 x 256): unpacked" in out


def test_validate_bad_dataset_fails(tmp_path, synth_dir: str, bad_data, capsys) -> None:
    path, images = bad_data
    cfg = _config(tmp_path, synth_dir, path, images)
    assert main(["validate", "--config", cfg, "--split", "train"]) == 1
    captured = capsys.readouterr()
    assert "records 14: good 4, skipped 10" in captured.out
    assert "image_missing" in captured.out and "bad.json record 2 (id 'missing')" in captured.out
    assert "FAILED" in captured.err
    assert (
        main(["validate", "--config", cfg, "--split", "train", "--config.data.max_skip_ratio=0.9"])
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", "--config", cfg, "--index", "2"]) == 1
    assert "SKIPPED: image_missing" in capsys.readouterr().out


@pytest.mark.parametrize("config", ["tiny.py:stage2", "demo.py:lora"])
def test_shipped_configs_read_as_training_reads_them(config: str, synth_dir: str, capsys) -> None:
    """The shipped files leave keys unset (the architecture, `data.template`) for
    training to resolve; the data CLIs resolve them the same way."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", config)
    assert main(["inspect", "--config", f"{path},data_dir={synth_dir}"]) == 0
    out = capsys.readouterr().out
    assert "template vicuna_v1" in out and "ASSISTANT:⟦ " in out
    assert main(["validate", "--config", f"{path},data_dir={synth_dir}", "--split", "eval"]) == 0
    assert "OK" in capsys.readouterr().out
    # A stage that the file does not have fails, naming it, rather than running another.
    assert main(["validate", "--config", f"{path.split(':')[0]}:stag2,data_dir={synth_dir}"]) == 2
    assert "error: config argument 'stag2': unknown variant" in capsys.readouterr().err


def test_bad_config_is_one_line_exit_2(synth_config: str, capsys) -> None:
    assert main(["validate", "--config", synth_config, "--config.data.template=vicuna"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.data.template='vicuna': unknown") and "\n" not in err
    assert main(["validate", "--config", synth_config, "--config.data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["validate", "--config", synth_config, "--config.dta.template=plain"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config.dta.template: unknown config key; did you mean config.data.template?"
    )


def test_validate_refuses_an_empty_file_as_training_does(tmp_path, synth_dir: str, capsys) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    cfg = _config(tmp_path, synth_dir, str(empty), os.path.join(synth_dir, "images"))
    assert main(["validate", "--config", cfg, "--split", "train"]) == 2
    assert "empty.json: holds no records" in capsys.readouterr().err
