"""`data.truncation`: `tokens` reproduces LLaVA's preprocess_v1 + model_max_length cut.

The reference below is LLaVA's (haotian-liu/LLaVA c121f04) definition written out:
`tokenizer_image_token` on the whole prompt (one IMAGE_TOKEN_INDEX per image),
`preprocess_v1`'s label masking by round lengths (non-legacy tokenizer: the
`round_len -= 1; instruction_len -= 1` branch for later rounds), the collator's
`[:model_max_length]` cut, then `prepare_inputs_labels_for_multimodal`: each image
token becomes the image's features (labels IGNORE) and the sequence is cut at
`tokenizer_model_max_length` again. It runs on the real 32k SentencePiece tokenizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from neva_jax.data.config import DataConfig
from neva_jax.data.conversation import LLAVA_SYSTEM
from neva_jax.data.dataset import BadSampleError, Prepared, SamplePreparer

IGNORE = -100
IMAGE_TOKEN_INDEX = -200
SLOTS = 64  # synth_cfg: 64 px images, patch 8

TURNS = [
    ("human", "What colour are the shapes?\n<image>"),
    ("gpt", "The shapes are red."),
    ("human", "Where are they?"),
    ("gpt", "They are in the top-left corner of the picture."),
    ("human", "How many are there?"),
    ("gpt", "There are three shapes in total."),
]


def _llava_v1(
    turns: list[tuple[str, str]], tokenizer, max_len: int, tokenizer_image_token
) -> tuple[list, list]:
    """conv_vicuna_v1.get_prompt + preprocess_v1 + collator + multimodal expansion."""

    def _tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
        return tokenizer_image_token(prompt, tokenizer, [IMAGE_TOKEN_INDEX])

    msgs = []
    for _role, v in turns:  # preprocess_multimodal
        if "<image>" in v:
            v = ("<image>\n" + v.replace("<image>", "").strip()).strip()
        msgs.append(v)
    conversation = LLAVA_SYSTEM + " "
    for i, v in enumerate(msgs):
        conversation += ("USER" if i % 2 == 0 else "ASSISTANT") + ": " + v
        conversation += " " if i % 2 == 0 else "</s>"
    input_ids = _tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    sep = " ASSISTANT: "
    total_len = len(input_ids)
    cur_len = 1
    target[:cur_len] = [IGNORE] * cur_len
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(_tokenizer_image_token(parts[0], tokenizer)) - 2
        if i != 0:  # not tokenizer.legacy (Vicuna v1.5) and tokenizers >= 0.14
            round_len -= 1
            instruction_len -= 1
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE] * (end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE] * max(0, len(target) - cur_len)
    assert cur_len == total_len  # else LLaVA masks the whole sample ("tokenization mismatch")
    input_ids, target = input_ids[:max_len], target[:max_len]  # DataCollatorForSupervisedDataset
    ids, labels = [], []
    for t, lab in zip(input_ids, target, strict=True):
        ids += ["img"] * SLOTS if t == IMAGE_TOKEN_INDEX else [t]
        labels += [IGNORE] * SLOTS if t == IMAGE_TOKEN_INDEX else [lab]
    return ids[:max_len], labels[:max_len]  # tokenizer_model_max_length


@pytest.fixture
def llama_cfg(synth_cfg: DataConfig, llama_tok_dir: str) -> DataConfig:
    return dataclasses.replace(synth_cfg, tokenizer=llama_tok_dir, max_seq_len=4096)


@pytest.fixture(scope="module")
def llama_tok(llama_tok_dir: str):
    from neva_jax.data.tokenize import load_tokenizer

    return load_tokenizer(llama_tok_dir, control_tokens=("</s>",))


def _prepare(cfg: DataConfig, tok, **changes) -> Prepared:
    return SamplePreparer(dataclasses.replace(cfg, **changes), tok).prepare(_record(), "r")


def _record() -> dict:
    return {
        "image": "train/000000.png",
        "conversations": [{"from": f, "value": v} for f, v in TURNS],
    }


def test_tokens_truncation_is_llavas_preprocess_v1_cut(
    llama_cfg: DataConfig, llama_tok, llava_tokenizer_image_token
) -> None:
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(llama_cfg.tokenizer)
    full = _prepare(llama_cfg, llama_tok)
    n = len(full.encoded)
    assert (n, int(full.encoded.image.sum()), full.cut_tokens) == (158, SLOTS, 0)
    trained = full.encoded.trained
    starts = np.flatnonzero(trained & ~np.r_[False, trained[:-1]])  # first token of each answer
    assert len(starts) == 3
    cuts = {  # max_seq_len: what the cut leaves
        int(starts[1]) + 4: "4 tokens of the second answer; round 3 gone",
        int(starts[2]) - 3: "ends inside the third question: nothing of its answer",
        int(starts[2]) + 2: "2 tokens of the last answer",
        n: "all",
    }
    image_id = llama_tok.image_token_id
    for max_len, what in cuts.items():
        p = _prepare(llama_cfg, llama_tok, max_seq_len=max_len, truncation="tokens")
        ids, labels = _llava_v1(TURNS, hf, max_len, llava_tokenizer_image_token)
        assert len(ids) == max_len, what
        assert ["img" if t == image_id else int(t) for t in p.encoded.ids] == ids, what
        np.testing.assert_array_equal(p.encoded.trained, np.array(labels) != IGNORE, what)
        assert (p.cut_tokens, p.full_length, p.dropped_rounds) == (n - max_len, n, 0), what
    # the partly cut answers are trained, as in LLaVA
    p = _prepare(llama_cfg, llama_tok, max_seq_len=int(starts[2]) + 2)
    assert p.encoded.trained[-2:].all()


def test_drop_rounds_keeps_whole_rounds_and_both_skip_cut_images(
    llama_cfg: DataConfig, llama_tok
) -> None:
    n = len(_prepare(llama_cfg, llama_tok).encoded)
    p = _prepare(llama_cfg, llama_tok, max_seq_len=n - 5, truncation="drop_rounds")
    assert p.dropped_rounds == 1 and p.cut_tokens == 0 and p.encoded.ids[-1] == 2  # </s>
    assert p.full_length == n and len(p.encoded) < n - 5
    for mode in ("tokens", "drop_rounds"):
        with pytest.raises(BadSampleError) as e:  # slots 34..97
            _prepare(llama_cfg, llama_tok, max_seq_len=60, truncation=mode)
        assert e.value.reason == "image_slots_cut"
    with pytest.raises(ValueError, match=r"config\.data\.truncation='rounds'"):
        dataclasses.replace(llama_cfg, truncation="rounds").validate(check_files=False)


def test_truncated_samples_are_counted_in_the_report(synth_cfg: DataConfig) -> None:
    from neva_jax.data import pipeline
    from neva_jax.data.dataset import RecordFileSource

    source = RecordFileSource(synth_cfg.eval_files[0])
    preparer = SamplePreparer(synth_cfg)
    lengths = [len(preparer.prepare(*source[i]).encoded) for i in range(len(source))]
    max_len = int(np.median(lengths))
    expected = sum(n > max_len for n in lengths)
    assert 0 < expected < len(lengths)
    it = pipeline.make_eval_iterator(dataclasses.replace(synth_cfg, max_seq_len=max_len))
    list(it)
    it.close()
    rep = it.report()
    assert rep["truncation"] == "tokens" and rep["samples_truncated"] == expected
    assert rep["truncated_tokens"] == sum(max(0, n - max_len) for n in lengths)
    assert rep["samples_yielded"] == len(lengths)
