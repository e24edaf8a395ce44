"""The XLA attention (custom backward, causal block skipping) and `layers.contract` give the
same values and gradients as the plain JAX functions they replace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neva_jax.model import dense_attention
from neva_jax.model.attention import make_attention_mask
from neva_jax.model.layers import contract

B, T, N, K, H = 2, 40, 4, 2, 8


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    return q, k, v, w


def _packed_mask():
    """Row 0: two packed samples (positions restart); row 1: right padding (segment 0)."""
    seg = np.ones((B, T), np.int32)
    seg[0, 25:] = 2
    seg[1, 33:] = 0
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    pos[0, 25:] = np.arange(T - 25)
    pos[1, 33:] = 0
    mask = make_attention_mask(*(jnp.asarray(a) for a in (seg, pos, seg, pos)))
    return mask, jnp.asarray(seg != 0)[:, :, None, None]


@pytest.mark.parametrize("case", ["causal", "causal+packed", "packed", "full"])
def test_matches_dot_product_attention(case):
    q, k, v, w = _inputs()
    mask, real = _packed_mask() if "packed" in case else (None, jnp.ones((B, T, 1, 1), bool))
    causal = case.startswith("causal")

    def ref(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal and mask is None, implementation="xla"
        )

    def ours(q, k, v):  # min_block 8: five causal blocks over T = 40
        return dense_attention.attention(q, k, v, mask=mask, causal=causal, min_block=8)

    # The loss reads real query rows only (a padding row's output is never used).
    def loss(f):
        return lambda *a: jnp.sum(jnp.where(real, f(*a) * w, 0.0))

    out_diff = jnp.max(jnp.where(real, jnp.abs(ref(q, k, v) - ours(q, k, v)), 0.0))
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    g_ours = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_ref, g_ours, strict=True))
    print(f"{case}: output {float(out_diff):.2e}, gradients {grad_diff:.2e}")
    assert float(out_diff) <= 1e-5
    assert grad_diff <= 1e-5
    assert float(jnp.max(jnp.abs(g_ours[1]))) > 0  # gradients do reach the keys


def test_fully_masked_rows_stay_finite_and_get_no_key_gradient():
    q, k, v, _ = _inputs(1)
    mask = jnp.zeros((B, 1, T, T), bool).at[:, :, :, : T // 2].set(True)
    mask = mask.at[0, :, 5].set(False)  # query row 5 of row 0 sees nothing

    def loss(q, k, v):
        return jnp.sum(dense_attention.attention(q, k, v, mask=mask)[0, 5])

    out = dense_attention.attention(q, k, v, mask=mask)
    assert bool(jnp.all(jnp.isfinite(out)))
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    # The masked row attends uniformly: its logits are constants, so q and k get nothing
    # from it, while v gets 1/T of the row's cotangent at every key.
    assert float(jnp.max(jnp.abs(dq))) == 0.0 and float(jnp.max(jnp.abs(dk))) == 0.0
    np.testing.assert_allclose(np.asarray(dv[0]), 2.0 / T, rtol=1e-6)


def test_causal_blocks_cover_the_sequence():
    assert dense_attention.causal_blocks(100) == [100]
    ends = dense_attention.causal_blocks(384)
    assert ends == [128, 256, 384]
    ends = dense_attention.causal_blocks(4096)
    assert len(ends) == 4 and ends[-1] == 4096 and all(e % 8 == 0 for e in ends)


@pytest.mark.parametrize("n_in", [1, 2])
def test_contract_matches_tensordot(n_in):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)), jnp.float32)
    shape = (6, 7) if n_in == 1 else (4, 6, 7)
    kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(3, 5, 4, 7) if n_in == 1 else (3, 5, 7)), jnp.float32)

    def grads(f):
        return jax.grad(lambda x, k: jnp.sum(f(x, k) * dy), argnums=(0, 1))(x, kernel)

    ref = grads(lambda x, k: jnp.tensordot(x, k, axes=n_in))
    ours = grads(lambda x, k: contract(x, k, n_in))
    for a, b in zip(ref, ours, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
