"""LoRA adapters on the decoder (model/lora.py): targets, B = 0, merge, dropout, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neva_jax import sharding
from neva_jax.model import lora, neva
from neva_jax.model import parts as model_parts
from neva_jax.model.neva import Neva
from neva_jax.model.schema import FieldError

ALL = lora.PeftConfig(scheme="lora", rank=4, alpha=8.0, target_modules=("all_linear",))
IDS = (jnp.arange(24, dtype=jnp.int32).reshape(2, 12) * 7) % 500


def _model(cfg, seed=0):
    return sharding.unsharded(lambda: Neva(cfg, rngs=nnx.Rngs(seed)))


def _randomize_b(model, seed=1):
    """B = 0 at init; random A and B make the adapters do something."""
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), state)
    nnx.update(model, state)


def test_targets_map_nemo_llava_and_peft_names():
    def proj(*names):
        return lora.PeftConfig(scheme="lora", target_modules=names).projections

    assert proj("attention_qkv") == ("q", "k", "v")
    assert proj("attention_dense", "mlp_fc2") == ("o", "down")
    assert proj("mlp_fc1") == ("gate", "up")
    assert proj("all") == proj("all_linear") == proj("attention", "mlp") == tuple(lora.PROJECTIONS)
    assert proj("q_proj", "down_proj") == ("q", "down")
    assert lora.PeftConfig().projections == ()  # scheme none: no adapters
    assert lora.PeftConfig(scheme="lora", rank=8).scale == 1.0  # alpha None = rank (NeMo)
    assert ALL.scale == 2.0
    with pytest.raises(FieldError, match=r"model\.peft\.target_modules"):
        lora.PeftConfig(scheme="lora", target_modules=("lm_head",))
    with pytest.raises(FieldError, match=r"model\.peft\.rank=0"):
        lora.PeftConfig(rank=0)
    with pytest.raises(FieldError, match=r"model\.peft\.scheme='dora'"):
        lora.PeftConfig(scheme="dora")


@pytest.mark.parametrize("scan", [True, False])
def test_b_zero_leaves_logits_exactly_and_params_as_without(scan):
    base_cfg = neva.with_runtime(neva.tiny(), scan_layers=scan, row_major_weight_grads=scan)
    base, model = _model(base_cfg), _model(dataclasses.replace(base_cfg, peft=ALL))
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(base(IDS)))
    # the base weights are drawn as without adapters; A is random, B zero
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    trained, frozen = model_parts.split_dict(params, (model_parts.ADAPTERS,))
    assert jax.tree.structure(frozen) == jax.tree.structure(
        nnx.to_pure_dict(nnx.state(base, nnx.Param))
    )
    for a, b in zip(
        jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(base, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    adapters = trained["llm"]["layers"]
    q = adapters["attn"]["q"]["lora"]
    assert q["lora_a"].shape == (2, 64, 4) and q["lora_b"].shape == (
        2,
        4,
        64,
    )  # [L, D, r], [L, r, N*H]
    assert not np.any(q["lora_b"]) and np.std(q["lora_a"]) > 0
    assert set(adapters["mlp"]) == {"gate", "up", "down"}


def test_merge_equals_unmerged_and_decode_forms():
    cfg = dataclasses.replace(neva.tiny(), peft=ALL)
    model = _model(cfg)
    _randomize_b(model)
    want = np.asarray(model(IDS))
    assert np.abs(want - np.asarray(_model(neva.tiny())(IDS))).max() > 0.1
    plain = _model(neva.tiny(), seed=5)
    state = nnx.state(plain, nnx.Param)
    merged = lora.merge_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ALL)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(plain, state)
    np.testing.assert_allclose(np.asarray(plain(IDS)), want, rtol=0, atol=1e-5)
    # prefill through the decode forms: merged+fused, unmerged per layer, stacked
    for layers in (model.llm.unstack_layers(), model.llm.unstack_layers(fused=False), None):
        _, h = model.prefill(model.llm.init_cache(2, 16), IDS, layers=layers)
        np.testing.assert_allclose(np.asarray(model.llm.logits(h)), want, rtol=0, atol=1e-5)


def test_dropout_only_with_a_key_and_each_layer_its_own_mask():
    cfg = dataclasses.replace(neva.tiny(), peft=dataclasses.replace(ALL, dropout=0.5))
    model = _model(cfg)
    _randomize_b(model)
    plain = np.asarray(model(IDS))  # no key: no dropout (evaluation, generation)
    graphdef, state = nnx.split(model)

    def with_key(seed):
        m = nnx.merge(graphdef, state)
        lora.set_dropout_keys(m, jax.random.key(seed))
        keys = [a.dropout_key[...] for _, a in lora.adapters(m)]
        return np.asarray(m(IDS)), keys

    a, keys = with_key(0)
    b, _ = with_key(0)
    c, _ = with_key(1)
    np.testing.assert_array_equal(a, b)  # same key, same masks
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    data = [jax.random.key_data(k) for k in keys]
    assert data[0].shape[0] == 2 and not np.array_equal(data[0][0], data[0][1])  # per layer
    assert not np.array_equal(data[0], data[1])  # per adapter


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_mask_rate_scale_and_independent_halves(rate):
    """`lora.dropout`: drop probability round(rate 2^16) / 2^16, kept values scaled by
    1 / (1 - rate), and the two 16-bit draws of one word independent (the low halves
    give the first D/2 features' masks, the high halves the rest)."""
    x = jnp.ones((1024, 1030), jnp.float32)  # an odd half: 515 words per row
    y = np.asarray(lora.dropout(x, jax.random.key(3), rate))
    dropped = y == 0
    assert set(np.unique(y)) == {0.0, np.float32(1 / (1 - rate))}
    p = round(rate * 2**16) / 2**16
    n = dropped.size
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    low, high = dropped[:, :515], dropped[:, 515:]  # the two halves of the same words
    both = (low & high).mean()
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / low.size)
    other = np.asarray(lora.dropout(x, jax.random.key(4), rate)) == 0
    assert (other != dropped).any()


@pytest.mark.parametrize("shape", [(4, 24, 70), (3, 5), (7,), (1, 1)])
def test_random_words_are_jax_random_bits(shape):
    """`lora.random_words` (the unrolled threefry of the dropout masks) gives exactly
    `jax.random.bits`' words, also for per-layer keys under vmap (the scanned layers)."""
    for seed in (0, 42, 2**31 + 5):
        key = jax.random.key(seed)
        want = np.asarray(jax.random.bits(key, shape, jnp.uint32))
        got = np.asarray(jax.jit(lora.random_words, static_argnums=1)(key, shape))
        np.testing.assert_array_equal(got, want)
    keys = jax.random.split(jax.random.key(1), 3)
    got = jax.vmap(lambda k: lora.random_words(k, shape))(keys)
    want = jax.vmap(lambda k: jax.random.bits(k, shape, jnp.uint32))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_adapters_shard_like_their_kernels():
    mesh = sharding.make_mesh(2, 2, 2)
    cfg = dataclasses.replace(neva.tiny(), peft=ALL)
    _, state = sharding.abstract_sharded(lambda: Neva(cfg, rngs=nnx.Rngs(0)), mesh)
    layers = nnx.to_pure_dict(state)["llm"]["layers"]
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    q, o, down = (
        layers["attn"]["q"]["lora"],
        layers["attn"]["o"]["lora"],
        layers["mlp"]["down"]["lora"],
    )
    assert spec(q["lora_a"]) == (None, "fsdp", None) and spec(q["lora_b"]) == (None, None, "tensor")
    assert spec(o["lora_a"]) == (None, "tensor", None) and spec(o["lora_b"]) == (None, None, "fsdp")
    assert spec(down["lora_a"]) == (None, "tensor", None)
