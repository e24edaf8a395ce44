"""Records and sample preparation: file formats, truncation at turn boundaries."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from neva_jax.data.config import DataConfig
from neva_jax.data.dataset import (
    BadSampleError,
    DataError,
    RecordFileSource,
    SamplePreparer,
    load_records,
)


def _stage2_record(synth_dir: str) -> tuple[dict, str]:
    source = RecordFileSource(os.path.join(synth_dir, "stage2.json"))
    return source[0]


def test_over_long_samples_drop_whole_rounds(synth_cfg: DataConfig, synth_dir: str) -> None:
    raw, where = _stage2_record(synth_dir)
    synth_cfg = dataclasses.replace(synth_cfg, truncation="drop_rounds")
    full = SamplePreparer(synth_cfg).prepare(raw, where)
    assert full.dropped_rounds == 0 and int(full.encoded.trained.sum()) == 8
    short = SamplePreparer(dataclasses.replace(synth_cfg, max_seq_len=len(full.encoded) - 3))
    p = short.prepare(raw, where)
    assert p.dropped_rounds == 1 and p.cut_tokens == 0
    assert int(p.encoded.trained.sum()) == 6 and p.encoded.ids[-1] == 2  # ends with </s>
    np.testing.assert_array_equal(p.encoded.ids, full.encoded.ids[: len(p.encoded)])


def test_a_single_long_round_is_cut_when_its_image_fits(synth_cfg: DataConfig) -> None:
    raw = {
        "image": "train/000000.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": " ".join(["red"] * 400)},
        ],
    }
    p = SamplePreparer(synth_cfg).prepare(raw, "r")
    assert len(p.encoded) == synth_cfg.max_seq_len and p.cut_tokens > 0
    assert p.encoded.image.sum() == 64 and p.encoded.trained[-1]
    tiny = SamplePreparer(dataclasses.replace(synth_cfg, max_seq_len=80))
    with pytest.raises(BadSampleError) as e:
        tiny.prepare(raw, "r")
    assert e.value.reason == "image_slots_cut"


def test_jsonl_and_bad_files(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1, "conversations": []}\n\nnot json\n{"id": 2}\n')
    records = load_records(str(path))
    assert len(records) == 3 and records[0]["id"] == 1
    source = RecordFileSource(str(path))
    assert source[0][1] == "a.jsonl record 0 (id 1)"
    bad = tmp_path / "b.json"
    bad.write_text('[{"id": 1},\n{"id": ]')
    with pytest.raises(DataError, match=r"b.json: invalid JSON at line 2"):
        load_records(str(bad))
    with pytest.raises(DataError, match="cannot read"):
        load_records(str(tmp_path / "missing.json"))


def test_file_level_problems_are_one_error_naming_the_file(tmp_path) -> None:
    """A byte-order mark is fine; one JSON object spread over lines, or bytes that are not
    UTF-8, are one error for the file (they were N malformed records or a bare codec error)."""
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + b'[\n  {"id": 1, "conversations": []}\n]')
    assert load_records(str(bom))[0]["id"] == 1
    obj = tmp_path / "obj.json"
    obj.write_text('{\n  "data": [{"id": 1}]\n}')
    with pytest.raises(DataError, match=r"obj.json: one JSON object \(keys data\)"):
        load_records(str(obj))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin\.json: not UTF-8 text"):
        load_records(str(latin))


def _turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("template", "turns", "reason"),
    [
        ("vicuna_v1", _turns("<image>\nWhat?", "Write <s>old</s> here."), "control_token_in_text"),
        ("vicuna_v1", _turns("<image>\nWhat?", "   "), "empty_answer"),
        ("plain", _turns("<image>\nQ1", "A1", "Where?", "A2"), "plain_not_one_caption"),
        ("plain", _turns("no image here", "a caption"), "plain_not_one_caption"),
    ],
)
def test_samples_that_would_train_wrongly_are_skipped(
    synth_cfg: DataConfig, template: str, turns: list[dict], reason: str
) -> None:
    """A control token in the text would be encoded as one (an answer that stops mid-way),
    an empty answer would train only the end of turn, and plain is one caption of one
    image: each is a counted skip (LLaVA masks or refuses the same samples)."""
    images = "train/000000.png" if "<image>" in turns[0]["value"] else None
    raw = {"image": images, "conversations": turns} if images else {"conversations": turns}
    cfg = dataclasses.replace(synth_cfg, template=template)
    with pytest.raises(BadSampleError) as e:
        SamplePreparer(cfg).prepare(raw, "r")
    assert e.value.reason == reason, e.value


def test_unparsable_jsonl_line_is_a_malformed_record(tmp_path, synth_cfg: DataConfig) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("not json\n")
    item = SamplePreparer(synth_cfg)(RecordFileSource(str(path))[0])
    assert item["bad"] == "malformed_record" and "line 1" in item["detail"]


def test_config_validation_messages(synth_cfg: DataConfig) -> None:
    synth_cfg.validate()
    cases = {
        "template": ("vicuna", "config.data.template='vicuna'"),
        "image_aspect_ratio": ("crop", "image_aspect_ratio='crop'"),
        "weights": ((1.0, 2.0), "need one weight per train file"),
        "max_seq_len": (64, "one image alone takes 64 tokens"),
        "train_files": (("nope.json",), "'nope.json' does not exist"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(synth_cfg, **{key: value}).validate()
    with pytest.raises(ValueError, match=r"cfg\.with_model"):
        DataConfig(train_files="x.json").require_model_fields()
    assert DataConfig(train_files="x.json").train_files == ("x.json",)
    filled = DataConfig().with_model(image_size=336, num_image_slots=576, use_im_start_end=False)
    assert (filled.image_size, filled.num_image_slots) == (336, 576)
    assert json.dumps(dataclasses.asdict(filled))  # JSON-able for checkpoint metadata
