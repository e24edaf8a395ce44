"""Pipeline: bad samples counted by reason, strict mode, packing, checkpoint round trip."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from neva_jax.data import pipeline
from neva_jax.data.config import DataConfig
from neva_jax.data.dataset import DataError

Q = {"from": "human", "value": "<image>\nWhat colour are the shapes?"}


def _qa(answer: str = "red") -> list[dict]:
    return [Q, {"from": "gpt", "value": answer}]


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.fixture
def bad_cfg(bad_data: tuple[str, str], synth_cfg: DataConfig) -> DataConfig:
    path, images = bad_data
    return dataclasses.replace(
        synth_cfg,
        train_files=(path,),
        eval_files=(path,),
        image_folder=images,
        batch_size=2,
        max_skip_ratio=1.0,
    )


BAD_REASONS = {
    "image_missing": 1,
    "image_unreadable": 1,
    "image_file_truncated": 1,
    "malformed_record": 2,
    "image_count_mismatch": 1,
    "image_slots_cut": 1,
    "no_trained_token": 1,
    "image_path_outside_folder": 1,
    "too_many_images": 1,
}


def test_bad_samples_are_counted_and_good_ones_all_yielded(
    bad_cfg: DataConfig, batch_samples
) -> None:
    it = pipeline.make_eval_iterator(bad_cfg)
    batches = list(it)
    it.close()
    rep = it.report()
    assert rep["skipped_by_reason"] == BAD_REASONS
    assert rep["samples_read"] == 14 and rep["samples_yielded"] == 4
    assert len(batches) == 2  # 4 good samples / 2 rows
    answers = [s for s in batch_samples(batches)]
    assert len(answers) == 4
    assert "bad.json record 2 (id 'missing')" in rep["first_skipped_by_reason"]["image_missing"]
    # the text-only sample has no image slot and zero pixels
    text_only = [s for s in answers if 4 not in s[0]]
    assert len(text_only) == 1 and not np.frombuffer(text_only[0][3], np.float32).size


def test_eval_gives_every_process_the_same_batch_count(bad_cfg: DataConfig, batch_samples) -> None:
    counts, samples = [], 0
    for p in range(2):
        it = pipeline.make_eval_iterator(bad_cfg, process_index=p, process_count=2)
        batches = list(it)
        it.close()
        counts.append(len(batches))
        samples += len(batch_samples(batches))
    assert counts == [7, 7] and samples == 4  # 14 records, 1 row per process per batch


def test_training_stream_trains_through_bad_samples(bad_cfg: DataConfig, batch_samples) -> None:
    cfg = dataclasses.replace(bad_cfg, num_epochs=1, packing=True, max_images_per_row=2)
    it = pipeline.make_train_iterator(cfg)
    batches = list(it)
    it.close()
    assert len(batch_samples(batches)) == 4
    assert sum(it.report()["skipped_by_reason"].values()) == 10


def test_strict_mode_names_the_first_bad_record(bad_cfg: DataConfig) -> None:
    it = pipeline.make_eval_iterator(dataclasses.replace(bad_cfg, strict=True))
    with pytest.raises(DataError, match=r"image_missing\) in bad.json record 2 \(id 'missing'\)"):
        list(it)
    it.close()


def test_skip_ratio_stops_the_run(bad_cfg: DataConfig) -> None:
    cfg = dataclasses.replace(bad_cfg, max_skip_ratio=0.2, skip_ratio_min_samples=5)
    it = pipeline.make_eval_iterator(cfg)
    with pytest.raises(DataError, match=r"samples skipped .* > config.data.max_skip_ratio=0.2"):
        list(it)
    it.close()


def test_batches_follow_the_contract(synth_cfg: DataConfig) -> None:
    it = pipeline.make_eval_iterator(synth_cfg)
    b = next(it)
    it.close()
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "input_ids": ((4, 256), "int32"),
        "targets": ((4, 256), "int32"),
        "loss_mask": ((4, 256), "float32"),
        "segment_ids": ((4, 256), "int32"),
        "positions": ((4, 256), "int32"),
        "images": ((4, 2, 64, 64, 3), "float32"),
    }
    row, n = 0, int((b["segment_ids"][0] == 1).sum())
    ids = b["input_ids"][row]
    np.testing.assert_array_equal(b["targets"][row, : n - 1], ids[1:n])
    assert b["targets"][row, n - 1] == 0 and b["loss_mask"][row, n - 1] == 0
    assert (ids[n:] == 3).all() and (b["segment_ids"][row, n:] == 0).all()  # <pad> = 3
    assert (ids == 4).sum() == 64 and b["images"][row, 1].max() == 0
    # targets under the mask are exactly the 4 answers and their </s>
    trained = b["targets"][row][b["loss_mask"][row] > 0]
    assert len(trained) == 8 and (trained[1::2] == 2).all()


def test_packing_keeps_samples_intact_and_fills_rows(synth_cfg: DataConfig, batch_samples) -> None:
    plain_it = pipeline.make_eval_iterator(synth_cfg)
    packed_it = pipeline.make_eval_iterator(dataclasses.replace(synth_cfg, packing=True))
    plain, packed = list(plain_it), list(packed_it)
    plain_it.close()
    packed_it.close()
    assert sorted(batch_samples(plain)) == sorted(batch_samples(packed))
    assert len(packed) < len(plain)
    b = packed[0]
    for r in range(b["input_ids"].shape[0]):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        real = seg > 0
        assert (np.diff(seg[real]) >= 0).all() and (seg[~real] == 0).all()
        starts = np.flatnonzero(np.r_[True, np.diff(seg) != 0] & real)
        assert (pos[starts] == 0).all()
        for s in range(1, seg.max() + 1):
            p = pos[seg == s]
            np.testing.assert_array_equal(p, np.arange(len(p)))
            assert b["loss_mask"][r][seg == s][-1] == 0  # no target across samples
    rp, ru = packed_it.report(), plain_it.report()
    assert rp["real_tokens"] == ru["real_tokens"]
    assert rp["non_padding_fraction_unpacked"] == pytest.approx(ru["non_padding_fraction"])
    assert rp["rows_used"] < ru["rows_used"]
    figs = pipeline.padding_figures([(125, 1)] * 16, batch_size=4, seq_len=256, max_images=2)
    assert figs["unpacked"] == pytest.approx(125 / 256)
    assert figs["packed"] == pytest.approx(125 * 16 / (2 * 4 * 256))


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_round_trip(
    synth_cfg: DataConfig, synth_dir: str, packing: bool, state_round_trip
) -> None:
    cfg = dataclasses.replace(
        synth_cfg,
        train_files=(
            os.path.join(synth_dir, "stage1.json"),
            os.path.join(synth_dir, "stage2.json"),
        ),
        weights=(1.0, 3.0),
        packing=packing,
        seed=7,
    )
    state_round_trip(cfg, 3, 4)


def test_blending_weights_and_process_shards(
    synth_cfg: DataConfig, synth_dir: str, batch_samples
) -> None:
    cfg = dataclasses.replace(
        synth_cfg,
        train_files=(
            os.path.join(synth_dir, "stage1.json"),
            os.path.join(synth_dir, "stage2.json"),
        ),
        weights=(3.0, 1.0),
        batch_size=8,
    )
    shards = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, process_index=p, process_count=2)
        shards.append(batch_samples(_take(it, 8)))  # 4 rows per process
        it.close()
    captions = [s[0].count(2) == 1 for s in shards[0] + shards[1]]  # one </s>: stage 1
    assert abs(np.mean(captions) - 0.75) < 0.1
    assert len(shards[0]) == len(shards[1]) == 32
    assert not set(shards[0]) & set(shards[1])  # each process reads its own records


def test_worker_processes_give_the_same_batches(synth_cfg: DataConfig) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    ref_it = pipeline.make_train_iterator(synth_cfg)
    ref = _take(ref_it, 3)
    ref_it.close()
    it = pipeline.make_train_iterator(dataclasses.replace(synth_cfg, num_workers=1))
    try:
        got = _take(it, 3)
    finally:
        it.close()
    for a, b in zip(ref, got, strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_tfds_array_record_source(tmp_path, synth_cfg: DataConfig) -> None:
    import tensorflow_datasets as tfds

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 30, 3), v, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    class NevaTfdsProbe(tfds.core.GeneratorBasedBuilder):
        # tfds resolves a builder's code path from its module; a dotted test module
        # name sends it through `importlib_resources` (absent in this environment).
        __module__ = "__main__"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "conversations": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield (
                    i,
                    {"id": f"t{i}", "image": png(40 * i), "conversations": json.dumps(_qa("red"))},
                )

    NevaTfdsProbe(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = dataclasses.replace(synth_cfg, tfds_data_dir=str(tmp_path), batch_size=2)
    it = pipeline.make_eval_iterator(cfg, files=("tfds:neva_tfds_probe:train",))
    batches = list(it)
    it.close()
    assert it.report()["samples_yielded"] == 5 and len(batches) == 3
    assert batches[0]["images"][1, 0].mean() != batches[0]["images"][0, 0].mean()
    assert (batches[0]["input_ids"][0] == 4).sum() == 64
