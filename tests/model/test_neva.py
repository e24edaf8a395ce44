"""The Neva wrapper: image-slot scatter, invariants, sharding, presets and config JSON.

Axis letters: B batch, T length, M images per row, P image tokens, D width, V vocab.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec

from neva_jax import sharding
from neva_jax.convert import hf
from neva_jax.model import neva
from neva_jax.model.projector import Projector

CFG = neva.tiny()
P = CFG.num_image_tokens  # 16
IMG = CFG.image_token_id
T = 2 * P + 12
START = 5  # first image slot of row 0


def _ids(rng: np.random.Generator, B: int = 4) -> np.ndarray:
    """Row 0: one image at START; row 1: two images; other rows: text only."""
    ids = rng.integers(1, IMG, size=(B, T)).astype(np.int32)
    ids[0, START : START + P] = IMG
    ids[1, 2 : 2 + P] = IMG
    ids[1, 4 + P : 4 + 2 * P] = IMG
    return ids


def _images(rng: np.random.Generator, B: int = 4) -> np.ndarray:
    s = CFG.vision.image_size
    images = rng.normal(size=(B, 2, s, s, 3)).astype(np.float32)
    images[0, 1] = 0  # row 0 has one image
    images[2:] = 0  # text-only rows
    return images


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, images):
    return nnx.merge(graphdef, state)(ids, images)


def _random_params(cfg: neva.NevaConfig, seed: int = 0) -> dict:
    """Random numpy parameters of decent size (norm scales near 1), keyed by path.

    Filling an abstract model from numpy avoids compiling dozens of random
    initialisers, the slowest part of building a model on CPU.
    """
    _, abstract = hf.abstract_neva(cfg, None)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(abstract)).items():
        scale = (
            1 + 0.2 * rng.normal(size=leaf.shape)
            if "norm" in "/".join(path) and path[-1] == "scale"
            else 0.1 * rng.normal(size=leaf.shape)
        )
        out[path] = scale.astype(np.float32)
    return out


def _model_from(params: dict, mesh=None) -> neva.Neva:
    """A Neva(CFG) holding `params`, placed as the logical rules say when `mesh` is given."""
    graphdef, abstract = hf.abstract_neva(CFG, mesh)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
    placed = {p: jax.device_put(params[p], leaf.sharding) for p, leaf in flat.items()}
    nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(placed))
    return nnx.merge(graphdef, abstract)


@pytest.fixture(scope="module")
def params():
    return _random_params(CFG)


@pytest.fixture(scope="module")
def model(params):
    return _model_from(params)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return _ids(rng), _images(rng)


@pytest.fixture(scope="module")
def logits(model, batch):
    return np.asarray(_forward(*nnx.split(model), *map(jnp.asarray, batch)))


def test_scatter_follows_the_contract():
    rng = np.random.default_rng(1)
    B, M, D = 3, 2, 4
    mask = np.zeros((B, T), bool)
    mask[0, 3 : 3 + P] = True  # one image
    mask[1, 1 : 1 + P] = mask[1, 2 + P : 2 + 2 * P] = True  # two images, split by a token
    embeds = rng.normal(size=(B, T, D)).astype(np.float32)
    feats = rng.normal(size=(B, M * P, D)).astype(np.float32)
    out = np.asarray(
        neva.scatter_image_features(jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(feats))
    )
    expected = embeds.copy()
    for b in range(B):
        expected[b, mask[b]] = feats[b, : mask[b].sum()]  # j-th slot <- feature j
    np.testing.assert_array_equal(out, expected)


def test_image_features_reach_only_later_positions(model, batch, logits):
    ids, images = batch
    changed = images.copy()
    changed[0, 0] = np.random.default_rng(2).normal(size=changed[0, 0].shape)
    other = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(changed)))
    diff = np.abs(other[0] - logits[0]).max(axis=-1)  # [T]
    print(
        f"image change: before slots {diff[:START].max():.1e}, after {diff[START + P :].min():.1e}"
    )
    assert diff[:START].max() == 0.0  # causal: earlier text never sees the image
    assert diff[START + P :].min() > 1e-4  # every later text position does
    np.testing.assert_array_equal(other[1:], logits[1:])  # other rows untouched


def test_text_rows_ignore_images(model, batch, logits):
    ids, images = batch
    other = images.copy()
    other[2:] = np.random.default_rng(3).normal(size=other[2:].shape)  # rows without slots
    out = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(other)))
    np.testing.assert_array_equal(out, logits)


def test_second_image_lands_in_second_slot_run(model, batch, logits):
    ids, images = batch
    changed = images.copy()
    changed[1, 1] += 1.0
    other = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(changed)))
    diff = np.abs(other[1] - logits[1]).max(axis=-1)
    assert diff[: 4 + P].max() == 0.0  # up to the second image's first slot
    assert diff[4 + P :].min() > 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _variants(graphdef, state, ids, images):
    """Logits via hidden_states, via a KV-cache prefill, and without images."""
    model = nnx.merge(graphdef, state)
    via_hidden = model.llm.logits(model.hidden_states(ids, images))
    cache = model.llm.init_cache(ids.shape[0], ids.shape[1] + 4)
    cache, h = model.prefill(cache, ids, images)
    return via_hidden, model.llm.logits(h), cache.lengths, model(ids)


def test_hidden_states_cache_and_no_images_agree_with_call(model, batch, logits):
    ids, images = batch
    via_hidden, via_cache, lengths, no_images = _variants(
        *nnx.split(model), jnp.asarray(ids), jnp.asarray(images)
    )
    np.testing.assert_allclose(np.asarray(via_hidden), logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(via_cache), logits, rtol=0, atol=1e-5)
    assert np.asarray(lengths).tolist() == [T] * ids.shape[0]
    # Text-only rows need no images at all (the decode path passes images=None).
    np.testing.assert_allclose(np.asarray(no_images)[2:], logits[2:], rtol=0, atol=1e-5)


def test_stop_gradient_cuts_the_vision_tower(model, batch):
    ids, images = map(jnp.asarray, batch)
    graphdef, vision_state, rest = nnx.split(model, nnx.PathContains("vision"), ...)

    def grad_size(stop: bool) -> jax.Array:
        def loss(vision_state):
            m = nnx.merge(graphdef, vision_state, rest)
            return jnp.mean(m(ids, images, stop_vision_gradient=stop) ** 2)

        return sum(jnp.abs(g).sum() for g in jax.tree.leaves(jax.grad(loss)(vision_state)))

    stopped, flowing = jax.jit(lambda: (grad_size(True), grad_size(False)))()
    assert float(stopped) == 0.0 and float(flowing) > 0.0


def test_sharded_forward_matches_single_device(params, batch, logits):
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    sharded = _model_from(params, mesh)
    specs = {
        "llm/layers/attn/q/kernel": PartitionSpec(None, "fsdp", "tensor", None),
        "vision/layers/attn/q/kernel": PartitionSpec(None, "fsdp", "tensor", None),
        "vision/layers/mlp/down/kernel": PartitionSpec(None, "tensor", "fsdp"),
        "projector/linear_1/kernel": PartitionSpec("fsdp", "tensor"),
        "projector/linear_2/kernel": PartitionSpec("tensor", "fsdp"),
    }
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(sharded))}
    for path, spec in specs.items():
        assert flat[path][...].sharding.spec == spec, path
    data = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = _forward(*nnx.split(sharded), *(jax.device_put(x, data) for x in batch))
    diff = float(np.abs(np.asarray(out) - logits).max())
    print(f"Neva 4x2 mesh vs single device: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_presets_and_config_json_round_trip():
    for name, preset in neva.PRESETS.items():
        cfg = preset()
        text = json.dumps(neva.config_to_dict(cfg))
        assert neva.config_from_dict(json.loads(text)) == cfg, name
    seed = neva.llama2_7b_chat()
    assert (seed.projector, seed.num_image_tokens, seed.llm.encoder_seq_length) == (
        "linear",
        256,
        4096,
    )
    assert (seed.llm.num_layers, seed.llm.hidden_size, seed.llm.ffn_hidden_size) == (
        32,
        4096,
        11008,
    )
    big = neva.llama2_13b_chat()
    assert (big.llm.num_layers, big.llm.hidden_size, big.llm.num_attention_heads) == (40, 5120, 40)
    v15 = neva.llava_v15_7b()
    assert (v15.projector, v15.num_image_tokens, v15.image_token_id) == ("mlp2x_gelu", 576, 32000)
    assert neva.llava_v15_13b().llm.ffn_hidden_size == 13824
    bf16 = neva.with_runtime(v15, dtype="bfloat16", scan_layers=False)
    assert (bf16.llm.dtype, bf16.vision.dtype, bf16.vision.scan_layers) == (
        "bfloat16",
        "bfloat16",
        False,
    )
    bad = {**neva.config_to_dict(CFG), "projektor": "linear"}
    with pytest.raises(ValueError, match="projektor"):
        neva.config_from_dict(bad)
    with pytest.raises(ValueError, match="image_token_id"):
        dataclasses.replace(CFG, image_token_id=CFG.llm.vocab_size)


def test_projector_kinds():
    x = jnp.ones((2, 3, 8))
    for kind, depth in (("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)):
        proj = sharding.unsharded(lambda kind=kind: Projector(kind, 8, 6, rngs=nnx.Rngs(0)))
        names = {p[0] for p, _ in nnx.to_flat_state(nnx.state(proj))}
        assert names == {f"linear_{i + 1}" for i in range(depth)}
        assert proj(x).shape == (2, 3, 6)
    mlp = sharding.unsharded(lambda: Projector("mlp2x_gelu", 8, 6, rngs=nnx.Rngs(0)))
    h = jax.nn.gelu(mlp.linear_1(x), approximate=False)  # exact erf GELU between the layers
    np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(mlp.linear_2(h)), rtol=1e-6)
    identity = sharding.unsharded(lambda: Projector("identity", 8, 8, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(identity(x)), np.asarray(x))
    for bad in ("mlp1x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ValueError, match="projector"):
            sharding.unsharded(lambda bad=bad: Projector(bad, 8, 6, rngs=nnx.Rngs(0)))
