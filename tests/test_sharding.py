"""Mesh, logical rules and born-sharded models on 8 simulated CPU devices."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neva_jax import sharding
from neva_jax.model import llama

CFG = llama.tiny(vocab_size=64, hidden_size=32, ffn_hidden_size=64, attention_impl="xla")
B, T = 8, 12


def _constructor(cfg=CFG):
    return lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    return sharding.make_mesh(data=4, fsdp=1, tensor=2)


@pytest.fixture(scope="module")
def sharded_model(mesh):
    return sharding.create_sharded(_constructor(), mesh)


def _spec(x) -> P:
    return x[...].sharding.spec


def test_make_mesh():
    mesh = sharding.make_mesh(data=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert one.size == 1
    with pytest.raises(ValueError, match=r"mesh\.tensor"):
        sharding.make_mesh(data=3, tensor=2)


def test_parameter_shardings(sharded_model, mesh):
    m = sharded_model
    assert _spec(m.embed.embedding) == P("tensor", "fsdp")  # vocab over tensor
    assert _spec(m.layers.attn.q.kernel) == P(None, "fsdp", "tensor", None)  # column parallel
    assert _spec(m.layers.attn.k.kernel) == P(None, "fsdp", "tensor", None)
    assert _spec(m.layers.attn.o.kernel) == P(None, "tensor", None, "fsdp")  # row parallel
    assert _spec(m.layers.mlp.gate.kernel) == P(None, "fsdp", "tensor")
    assert _spec(m.layers.mlp.down.kernel) == P(None, "tensor", "fsdp")
    assert _spec(m.lm_head.kernel) == P("fsdp", "tensor")
    assert _spec(m.final_norm.scale) == P(None)
    q = m.layers.attn.q.kernel[...]
    assert q.shape == (2, 32, 4, 8)
    # Really split: each device holds half of the heads.
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 8)}
    for x in jax.tree.leaves(nnx.state(m)):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh


def test_every_logical_axis_has_a_rule():
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(_constructor(dataclasses.replace(CFG, bias=True)))
    names = {
        n
        for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
        for n in v.get_metadata()["out_sharding"]
    }
    assert names <= dict(sharding.LOGICAL_RULES).keys()
    with pytest.raises(KeyError, match="LOGICAL_RULES"):
        sharding.logical_to_spec(("nonexistent",))


def test_abstract_sharded_allocates_nothing(mesh):
    _, abstract = sharding.abstract_sharded(_constructor(), mesh)
    q = abstract["layers"]["attn"]["q"]["kernel"]
    q = q.get_value()
    assert isinstance(q, jax.ShapeDtypeStruct) and q.sharding.spec == P(
        None, "fsdp", "tensor", None
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions, segment_ids):
    return nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids)


def test_sharded_forward_matches_single_device(sharded_model, mesh):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[:, -3:] = 0  # right padding
    segment_ids[1, :5] = 2  # one packed row
    positions = np.where(segment_ids > 0, np.arange(T), 0).astype(np.int32)
    positions[1, 5:9] = np.arange(4)

    single = sharding.unsharded(_constructor())
    ref = np.asarray(_forward(*nnx.split(single), ids, positions, segment_ids))

    graphdef, state = nnx.split(sharded_model)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    args = [jax.device_put(x, batch_sharding) for x in (ids, positions, segment_ids)]
    with sharding.use_mesh(mesh):
        out = _forward(graphdef, state, *args)
    # Batch split over data (4), vocab over tensor (2), as the activation rules say.
    assert out.sharding.shard_shape(out.shape) == (B // 4, T, CFG.vocab_size // 2)
    diff = np.abs(np.asarray(out) - ref).max()
    print(f"\n4x2 (data x tensor) mesh vs single device: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_constrain_is_identity_without_mesh():
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("act_batch", "act_length", "act_embed")) is x
