"""`data.group_by_modality_length`: single-modality batches, LLaVA's grouped order,
exact resume, resharding across process counts."""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np
import pytest

from neva_jax.data import grouping, pipeline
from neva_jax.data.config import DataConfig
from neva_jax.data.dataset import RecordFileSource

IMAGE_ID = 4  # the synthetic tokenizer's <image>
N_IMAGE, N_TEXT = 96, 42


@pytest.fixture
def mixed_cfg(tmp_path, synth_cfg: DataConfig, synth_dir: str) -> DataConfig:
    """96 image records of 1-4 rounds and 42 text-only ones of 1-3 rounds, interleaved."""
    base = RecordFileSource(os.path.join(synth_dir, "stage2.json")).records
    image = [
        dict(r, conversations=r["conversations"][: 2 * (i % 4 + 1)]) for i, r in enumerate(base)
    ]
    text = []
    for i in range(N_TEXT):
        turns = [dict(t) for t in base[i]["conversations"][: 2 * (i % 3 + 1)]]
        turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
        text.append({"id": f"text_{i}", "conversations": turns})
    records = image[:48] + text + image[48:]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return dataclasses.replace(
        synth_cfg,
        train_files=(str(path),),
        eval_files=(str(path),),
        group_by_modality_length=True,
        batch_size=4,
        seed=3,
    )


def _modality(batch: dict) -> set[bool]:
    """{True} all-image, {False} all-text, both when mixed (rows without samples ignored)."""
    rows = batch["segment_ids"].max(axis=1) > 0
    return {bool(x) for x in (batch["input_ids"][rows] == IMAGE_ID).any(axis=1)}


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_every_batch_is_single_modality_and_an_epoch_is_every_record_once(
    mixed_cfg: DataConfig, packing: bool, batch_samples
) -> None:
    cfg = dataclasses.replace(mixed_cfg, num_epochs=1, packing=packing)
    it = pipeline.make_train_iterator(cfg)
    batches = list(it)
    it.close()
    modalities = [_modality(b) for b in batches]
    assert all(len(m) == 1 for m in modalities)
    assert {True} in modalities and {False} in modalities
    ref_it = pipeline.make_eval_iterator(dataclasses.replace(cfg, group_by_modality_length=False))
    everything = list(ref_it)
    ref_it.close()
    assert sorted(batch_samples(batches)) == sorted(batch_samples(everything))
    rep = it.report()
    assert rep["samples_yielded"] == N_IMAGE + N_TEXT
    by = rep["batches_by_stream"]
    assert by == {
        "image": sum(m == {True} for m in modalities),
        "text": sum(m == {False} for m in modalities),
    }
    if not packing:  # 96/4 full image batches; 42 text = 10 full batches + one of 2
        assert by == {"image": 24, "text": 11} and len(batches) == 35


def test_processes_draw_the_same_modality_at_every_step(
    mixed_cfg: DataConfig, batch_samples
) -> None:
    cfg = dataclasses.replace(mixed_cfg, batch_size=8, num_epochs=1)
    shards = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, process_index=p, process_count=2)
        shards.append(list(it))
        it.close()
    assert len(shards[0]) == len(shards[1]) == 12 + 6  # 96/8 image, ceil(42/8) text steps
    for b0, b1 in zip(*shards, strict=True):
        assert len(_modality(b0) | _modality(b1)) == 1
    ref_it = pipeline.make_eval_iterator(dataclasses.replace(cfg, group_by_modality_length=False))
    assert sorted(batch_samples(shards[0] + shards[1])) == sorted(batch_samples(list(ref_it)))
    ref_it.close()


@pytest.mark.parametrize("packing", [False, True])
def test_restoring_the_state_mid_epoch_continues_identically(
    mixed_cfg: DataConfig, packing: bool, state_round_trip
) -> None:
    cfg = dataclasses.replace(mixed_cfg, packing=packing, max_images_per_row=2)
    state, batches = state_round_trip(cfg, 9, 12)  # 12 more: past the end of the epoch
    assert state["schedule_pos"] >= 9 and len(state["streams"]) == 1
    assert all(len(_modality(b)) == 1 for b in batches)
    plain = pipeline.make_train_iterator(dataclasses.replace(cfg, group_by_modality_length=False))
    with pytest.raises(ValueError, match="group_by_modality_length differs"):
        plain.set_state(state)
    plain.close()


def test_state_saved_by_two_processes_resumes_in_one(mixed_cfg: DataConfig, batch_samples) -> None:
    cfg = dataclasses.replace(mixed_cfg, batch_size=8)
    one = pipeline.make_train_iterator(cfg)
    straight = _take(one, 10)
    one.close()
    states = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, process_index=p, process_count=2)
        _take(it, 7)
        states.append(json.loads(json.dumps(it.get_state())))
        it.close()
    resumed = pipeline.make_train_iterator(cfg)
    resumed.set_state(pipeline.reshard_state(states, 0, 1))
    got = _take(resumed, 3)
    resumed.close()
    for a, b in zip(straight[7:], got, strict=True):  # the same records, whole megabatches
        assert sorted(batch_samples([a])) == sorted(batch_samples([b]))


def test_order_is_llavas_length_grouped_megabatches() -> None:
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11])
    idx = np.array([0, 2, 3, 5, 6, 8, 9, 10])  # one modality's records
    src = grain.MapDataset.source(list(range(len(lengths))))
    order = grouping.ModalityOrder(src, idx, lengths[idx], megabatch=3, seed=1)
    for epoch in range(3):
        got = [order[epoch * len(idx) + i] for i in range(len(idx))]
        assert sorted(got) == sorted(idx.tolist())
        for start in range(0, len(got), 3):  # each megabatch longest first
            mb = lengths[got[start : start + 3]]
            assert (np.diff(mb) <= 0).all()
    assert order.order(0).tolist() != order.order(1).tolist()  # a fresh order per epoch
    schedule = grouping.ModalitySchedule([24.0, 10.5], seed=0)
    steps = [schedule(k) for k in range(2 * 34 + 1)]  # two blocks: 24 + 10, then 24 + 11
    assert steps[:34].count(0) == 24 and steps[34:69].count(1) == 11
    assert steps[:34] != sorted(steps[:34])  # megabatches of both kinds shuffled together


def test_grouping_config_errors(mixed_cfg: DataConfig) -> None:
    with pytest.raises(ValueError, match=r"config\.data\.weights: not used with group_by"):
        dataclasses.replace(
            mixed_cfg, train_files=mixed_cfg.train_files * 2, weights=(1.0, 2.0)
        ).validate()
    cfg = dataclasses.replace(mixed_cfg, train_files=("tfds:nothing:train",))
    with pytest.raises(ValueError, match=r"group_by_modality_length: tfds:nothing:train is not"):
        pipeline.make_train_iterator(cfg)


def test_llava_stage2_recipe_groups_by_modality() -> None:
    import importlib.util

    from neva_jax.config import from_config_dict

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "llava_v15", os.path.join(root, "configs", "llava_v15.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for stage, grouped in (("stage1", False), ("stage2", True)):
        cfg = from_config_dict(module.get_config(stage), num_devices=8, check_environment=False)
        assert cfg.data.group_by_modality_length is grouped and cfg.data.truncation == "tokens"
