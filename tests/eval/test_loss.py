"""Held-out loss and perplexity against the `transformers` model's cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neva_jax.eval.evaluate import heldout_loss

IMAGE_ID = 4


def test_heldout_loss_matches_transformers(llava_dir, imported):
    from transformers import LlavaForConditionalGeneration

    rng = np.random.default_rng(0)
    T = 24
    ids = rng.integers(5, 480, size=(2, T)).astype(np.int32)
    ids[:, 1:17] = IMAGE_ID
    pixels = rng.normal(size=(2, 1, 32, 32, 3)).astype(np.float32)
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    mask = np.zeros((2, T), np.float32)
    mask[0, 17:-1] = 1  # row 0: 6 trained tokens
    mask[1, 20:-1] = 1  # row 1: 3 trained tokens
    batch = dict(
        input_ids=ids,
        targets=targets,
        loss_mask=mask,
        positions=np.tile(np.arange(T, dtype=np.int32), (2, 1)),
        segment_ids=np.ones((2, T), np.int32),
        images=pixels,
    )
    # Two batches of one row each: the mean is over tokens, not over batches.
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    got = heldout_loss(imported.model, rows)

    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    with torch.no_grad():
        logits = ref(
            input_ids=torch.from_numpy(ids).long(),
            pixel_values=torch.from_numpy(pixels[:, 0].transpose(0, 3, 1, 2).copy()),
        ).logits
    # Over the tokenizer's 480 ids: the model's 32 rows past it are vocabulary padding.
    n = imported.config.tokenizer_vocab_size
    assert n == 480 < logits.shape[-1]
    logits = logits[..., :n]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        torch.from_numpy(targets).long().reshape(-1),
        reduction="none",
    )
    want = float((nll * torch.from_numpy(mask).reshape(-1)).sum() / mask.sum())
    assert got["tokens"] == 9
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_heldout_loss_without_trained_tokens_is_an_error(imported):
    T = 8
    batch = dict(
        input_ids=np.ones((1, T), np.int32),
        targets=np.ones((1, T), np.int32),
        loss_mask=np.zeros((1, T), np.float32),
        positions=np.arange(T, dtype=np.int32)[None],
        segment_ids=np.ones((1, T), np.int32),
    )
    with pytest.raises(ValueError, match="no trained tokens"):
        heldout_loss(imported.model, [batch])
