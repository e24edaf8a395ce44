"""Fixtures for the data tests: the real 32k SentencePiece LLaMA-layout tokenizer
(shipped inside `mistral-common`), a tiny trained BPE, and a small synthetic dataset."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from neva_jax.data import synth
from neva_jax.data.config import DataConfig

# The words of the golden conversations plus the template strings: the tiny BPE
# is trained on exactly this, so its ids do not depend on the synthetic vocabulary.
BPE_CORPUS = [
    "The assistant gives helpful answers.",
    "What colour are the shapes?",
    "Where are the shapes?",
    "red top-left",
    "\nWhat colour are the shapes?",
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> System User Assistant",
    "user assistant system",
] * 20


@pytest.fixture(scope="session")
def llama_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A HF tokenizer folder built from mistral-common's `tokenizer.model.v1`."""
    import mistral_common

    model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    src = tmp_path_factory.mktemp("llama_sp")
    shutil.copy(model, src / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    # Convert once (SentencePiece -> tokenizer.json) so every later load is fast.
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("llama_tok")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def bpe_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bpe_tok")
    synth.build_tokenizer(str(out), vocab_size=160, corpus=BPE_CORPUS)
    return str(out)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(str(out), seed=0, n_train=96, n_eval=16)
    return str(out)


@pytest.fixture
def synth_cfg(synth_dir: str) -> DataConfig:
    """Stage-2 synthetic data with a tiny vision tower (64 px, patch 8 -> 64 slots)."""
    return DataConfig(
        train_files=os.path.join(synth_dir, "stage2.json"),
        eval_files=os.path.join(synth_dir, "stage2_eval.json"),
        image_folder=os.path.join(synth_dir, "images"),
        tokenizer=os.path.join(synth_dir, "tokenizer"),
        template="vicuna_v1",
        image_size=64,
        num_image_slots=64,
        max_seq_len=256,
        batch_size=4,
        max_images_per_row=2,
        read_threads=1,
        prefetch_buffer_size=4,
    )


Q = {"from": "human", "value": "<image>\nWhat colour are the shapes?"}


def _qa(answer: str = "red") -> list[dict]:
    return [Q, {"from": "gpt", "value": answer}]


@pytest.fixture
def bad_data(tmp_path, synth_dir: str) -> tuple[str, str]:
    """bad.json + image folder: one record of every bad kind between good ones."""
    images = tmp_path / "images"
    images.mkdir()
    good = os.path.join(synth_dir, "images", "train", "000000.png")
    shutil.copy(good, images / "good.png")
    (images / "junk.png").write_bytes(b"not a png")
    data = (images / "good.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    shutil.copy(good, tmp_path / "outside.png")
    hi = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]
    three = [{"from": "human", "value": "<image><image><image>x"}, {"from": "gpt", "value": "y"}]
    records = [
        {"id": "good0", "image": "good.png", "conversations": _qa("red")},
        {"id": "text", "conversations": hi},
        {"id": "missing", "image": "nope.png", "conversations": _qa()},
        {"id": "junk", "image": "junk.png", "conversations": _qa()},
        {"id": "trunc", "image": "trunc.png", "conversations": _qa()},
        "not a record",
        {"id": "role", "image": "good.png", "conversations": [Q, {"from": "robot", "value": "x"}]},
        {"id": "count", "image": "good.png", "conversations": hi},
        {"id": "slots", "image": "good.png", "system": "word " * 300, "conversations": _qa()},
        {"id": "noanswer", "image": "good.png", "conversations": [Q]},
        {"id": "escape", "image": "../outside.png", "conversations": _qa()},
        {"id": "many", "image": ["good.png"] * 3, "conversations": three},
        {"id": "good1", "image": "good.png", "conversations": _qa("blue")},
        {
            "id": "good2",
            "image": "good.png",
            "conversations": [*_qa("green"), {"from": "human", "value": "And?"}, _qa("no")[1]],
        },
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


def tokenizer_image_token(prompt: str, tokenizer, image_ids: list[int]) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token with `image_ids` in place of each image."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.extend(image_ids)
        ids.extend(chunk[offset:])
    return ids


@pytest.fixture(scope="session")
def llava_tokenizer_image_token():
    """`tokenizer_image_token(prompt, hf_tokenizer, image_ids)` (LLaVA's, written out)."""
    return tokenizer_image_token


def round_trip(cfg: DataConfig, before: int, after: int) -> tuple[dict, list[dict]]:
    """Takes `before` batches, saves the state (through JSON), takes `after` more; a
    fresh iterator restored from the state must give the same batches and report.
    Returns (state, the batches after it)."""
    from neva_jax.data import pipeline

    it = pipeline.make_train_iterator(cfg)
    for _ in range(before):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(after)]
    report = it.report()
    it.close()
    again = pipeline.make_train_iterator(cfg)
    again.set_state(state)
    got = [next(again) for _ in range(after)]
    assert again.report() == report
    again.close()
    for a, b in zip(expected, got, strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    return state, expected


@pytest.fixture(scope="session")
def state_round_trip():
    """`round_trip(cfg, before, after)`: resume from a mid-stream state is exact."""
    return round_trip


def samples_of(batches: list[dict]) -> list[tuple]:
    """Recovers per-sample (ids, targets, loss_mask, images) from (packed) batches
    of the synthetic tokenizer (<image> = 4, 64 slots per image)."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            seg, img = b["segment_ids"][r], 0
            for s in range(1, seg.max() + 1):
                sel = seg == s
                ids = b["input_ids"][r][sel]
                k = int((ids == 4).sum()) // 64
                out.append(
                    (
                        tuple(ids),
                        tuple(b["targets"][r][sel]),
                        tuple(b["loss_mask"][r][sel]),
                        b["images"][r, img : img + k].tobytes(),
                    )
                )
                img += k
    return out


@pytest.fixture(scope="session")
def batch_samples():
    """`samples_of(batches)`: the samples of (packed) synthetic batches, as tuples."""
    return samples_of
