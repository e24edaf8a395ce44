"""Logit processors: hand-worked cases and agreement with `transformers`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from neva_jax.eval import sampling


def test_repetition_penalty_hand_worked():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    out = sampling.apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])


def test_top_k_hand_worked():
    logits = jnp.array([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 5.0, 1.0]])
    out = sampling.apply_top_k(logits, jnp.array([2, 0]))  # row 2: disabled
    assert np.isneginf(out[0]).tolist() == [True, False, False, True]
    np.testing.assert_array_equal(out[1], logits[1])


def test_top_p_hand_worked():
    # probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits)
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125]]))
    kept = lambda p: (~np.isneginf(sampling.apply_top_p(logits, p)[0])).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 already reaches 0.5
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.1) == [True, False, False, False]  # the top token always stays
    assert kept(1.0) == [True, True, True, True]


def test_processors_match_transformers():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, size=(3, 7))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    t = torch.from_numpy(logits)
    ref = hf.RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), t.clone())
    got = sampling.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
    ref = hf.TopKLogitsWarper(5)(None, t.clone())
    np.testing.assert_array_equal(sampling.apply_top_k(jnp.asarray(logits), 5), ref.numpy())
    for p in (0.3, 0.8, 0.95):
        ref = hf.TopPLogitsWarper(p)(None, t.clone())
        got = sampling.apply_top_p(jnp.asarray(logits), p)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref.numpy()))


def test_select_next_greedy_and_sampled():
    logits = jnp.array([[0.0, 3.0, 2.9, -1.0]] * 2)
    seen = jnp.zeros((2, 4), bool)
    kw = dict(top_k=2, top_p=1.0, repetition_penalty=1.0)
    out = sampling.select_next(
        logits, seen, jax.random.key(0), temperature=jnp.array([0.0, 1.0]), **kw
    )
    assert int(out[0]) == 1  # greedy row
    draws = jax.vmap(lambda k: sampling.select_next(logits, seen, k, temperature=1.0, **kw))(
        jax.random.split(jax.random.key(1), 200)
    )
    assert set(np.unique(draws).tolist()) == {1, 2}  # only the top-2 tokens, both drawn
    # Same seed, same draw.
    a = sampling.select_next(logits, seen, jax.random.key(3), temperature=1.0, **kw)
    b = sampling.select_next(logits, seen, jax.random.key(3), temperature=1.0, **kw)
    np.testing.assert_array_equal(a, b)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.SamplingParams(temperature=-1.0)
