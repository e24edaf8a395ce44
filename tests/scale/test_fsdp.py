"""FSDP: fsdp x tensor meshes train exactly like data parallelism, and each device holds
the parameter and optimizer bytes that the memory plan predicts (tiny config, stage 2)."""

import zlib

import jax
import numpy as np
import pytest

from neva_jax import sharding
from neva_jax.data import pipeline
from neva_jax.data.tokenize import load_tokenizer
from neva_jax.model import parts as model_parts
from neva_jax.run_config import model_for_tokenizer
from neva_jax.train import build, plan
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import step as step_lib

MESHES = {"data8": (8, 1, 1), "fsdp4_tensor2": (1, 4, 2), "fsdp8": (1, 8, 1)}
STEPS = 3


def per_device_bytes(tree) -> int:
    """Bytes that device 0 holds of `tree`'s arrays, read from the arrays' own shards."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))


def _initial_value(path, leaf) -> np.ndarray:
    """Random N(0, 0.02) weights, unit norm scales, zero biases, optimizer state and counters
    (numpy: no RNG program to compile)."""
    name = jax.tree_util.keystr(path)
    if "opt_state" in name or "bias" in name or not np.issubdtype(leaf.dtype, np.floating):
        return np.zeros(leaf.shape, leaf.dtype)
    if "scale" in name:
        return np.ones(leaf.shape, leaf.dtype)
    seed = zlib.crc32(name.encode())
    return (np.random.default_rng(seed).normal(size=leaf.shape) * 0.02).astype(leaf.dtype)


def _run(cfg, ncfg, tx, mesh, initial, local_batches):
    """STEPS training steps on `mesh` from a host copy of the initial state."""
    parts = cfg.trained_parts
    graphdef, _, shards = build.abstract_train_state(ncfg, parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    fn = step_lib.make_train_step(
        graphdef,
        tx,
        opt_lib.learning_rate_schedule(cfg.train),
        trained_parts=parts,
        logits_fraction=cfg.train.logits_fraction,
    )
    step = step_lib.jit_train_step(fn, shards, batch_sh, build.replicated(mesh))
    with jax.set_mesh(mesh):
        state = jax.device_put(initial, shards)
        losses = []
        for local in local_batches:
            batch = {k: jax.device_put(local[k], batch_sh[k]) for k in pipeline.BATCH_KEYS}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    params = model_parts.merge_dicts(state.params, state.frozen)
    measured = {part: per_device_bytes(tree) for part, tree in params.items()}
    measured["optimizer"] = per_device_bytes(state.opt_state)
    return losses, measured


@pytest.fixture(scope="module")
def runs(tiny_config):
    cfg = tiny_config("stage2", **{"train.steps": 6})
    assert cfg.trained_parts == ("projector", "llm")
    tok = load_tokenizer(cfg.data.tokenizer)
    ncfg = model_for_tokenizer(cfg, tok.image_token_id, tok.vocab_size)
    data_cfg = cfg.data.with_model(
        image_size=ncfg.vision.image_size,
        num_image_slots=ncfg.num_image_tokens,
        use_im_start_end=False,
    )
    it = pipeline.make_train_iterator(data_cfg, tokenizer=tok)
    local_batches = [next(it) for _ in range(STEPS)]
    it.close()
    tx = opt_lib.make_optimizer(cfg.train)
    # One initial state in host memory, copied onto every mesh.
    _, abstract, _ = build.abstract_train_state(
        ncfg, cfg.trained_parts, tx, sharding.make_mesh(*MESHES["data8"])
    )
    initial = jax.tree_util.tree_map_with_path(_initial_value, abstract)
    am = plan.abstract_model(ncfg)
    out = {}
    for name, shape in MESHES.items():
        mesh = sharding.make_mesh(*shape)
        losses, measured = _run(cfg, ncfg, tx, mesh, initial, local_batches)
        sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
        predicted = plan.param_bytes_per_device(am, sizes)
        predicted.update(plan.state_bytes(am, cfg.trained_parts, tx, sizes))
        out[name] = (losses, measured, predicted)
    return out


def test_fsdp_and_tensor_meshes_match_data_parallel_losses(runs):
    ref, _, _ = runs["data8"]
    assert all(np.isfinite(ref)) and ref[-1] < ref[0], ref
    for name, (losses, _, _) in runs.items():
        np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5, err_msg=name)


def test_per_device_bytes_shrink_as_the_plan_predicts(runs):
    for name, (_, measured, predicted) in runs.items():
        for part in ("llm", "vision", "projector", "optimizer"):
            assert measured[part] == predicted[part], (name, part, measured, predicted)
        params = measured["llm"] + measured["vision"] + measured["projector"]
        assert params == predicted["parameters"], name
        assert measured["llm"] + measured["projector"] == predicted["gradients"], name
    data8, fsdp8 = runs["data8"][1], runs["fsdp8"][1]
    # Everything but the norm scales and biases (replicated) splits 8 ways.
    for part in ("llm", "optimizer"):
        assert data8[part] / 8 <= fsdp8[part] < data8[part] / 6, (part, data8, fsdp8)
