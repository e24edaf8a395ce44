"""The same 3 training steps on meshes 1x1, 8x1 and 4x2 (data x tensor) give the same losses
(LoRA stage 2, with dropout and the projector at its own lr: 1x1 and 4x2, and the same
trained parameters)."""

import jax
import numpy as np
import pytest

from neva_jax import sharding
from neva_jax.data import pipeline
from neva_jax.data.tokenize import load_tokenizer
from neva_jax.run_config import model_for_tokenizer
from neva_jax.train import build, loop
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import step as step_lib

MESHES = {"1x1": (1, 1, 1), "8x1": (8, 1, 1), "4x2": (4, 1, 2)}
LORA = {
    "model.peft.scheme": "lora",
    "model.peft.target_modules": ("all",),
    "model.peft.rank": 4,
    "model.peft.dropout": 0.1,
    "train.projector_lr": 1e-3,
}


def _losses(cfg, ncfg, mesh, local_batches, initial):
    """3 steps from `initial` (a host copy of the initial TrainState) placed on `mesh`."""
    tx = opt_lib.make_optimizer(cfg.train)
    graphdef, _, shards = build.abstract_train_state(ncfg, cfg.trained_parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    with jax.set_mesh(mesh):
        state = jax.device_put(initial, shards)
        fn = step_lib.make_train_step(
            graphdef,
            tx,
            opt_lib.learning_rate_schedule(cfg.train),
            trained_parts=cfg.trained_parts,
            logits_fraction=cfg.train.logits_fraction,
            dropout_seed=cfg.seed,
        )
        step = step_lib.jit_train_step(fn, shards, batch_sh, build.replicated(mesh))
        losses = []
        for local in local_batches:
            state, metrics = step(state, loop.global_batch(local, batch_sh))
            losses.append(float(metrics["loss"]))
    leaf = jax.tree.leaves(state.params["llm"])[0]
    return losses, leaf.sharding, jax.device_get(state.params)


@pytest.mark.parametrize(
    ("changes", "meshes"), [({}, tuple(MESHES)), (LORA, ("1x1", "4x2"))], ids=["full", "lora"]
)
def test_losses_match_across_meshes(tiny_config, changes, meshes):
    # the schedule of the other tests
    cfg = tiny_config("stage2", **{"train.steps": 6}, **changes)
    tok = load_tokenizer(cfg.data.tokenizer)
    data_cfg = cfg.data.with_model(image_size=32, num_image_slots=16, use_im_start_end=False)
    it = pipeline.make_train_iterator(data_cfg, tokenizer=tok)
    local_batches = [next(it) for _ in range(3)]
    it.close()
    # One random initialisation (on the full mesh), copied onto each mesh.
    ncfg = model_for_tokenizer(cfg, tok.image_token_id, tok.vocab_size)
    tx = opt_lib.make_optimizer(cfg.train)
    mesh8 = sharding.make_mesh(8, 1, 1)
    _, abstract8, shards8 = build.abstract_train_state(ncfg, cfg.trained_parts, tx, mesh8)
    with jax.set_mesh(mesh8):
        state = build.initial_state(cfg, ncfg, tx, mesh8, abstract8, shards8)
    initial = jax.device_get(state)
    results = {}
    for name in meshes:
        data, fsdp, tensor = MESHES[name]
        devices = jax.devices()[: data * fsdp * tensor]
        mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)
        results[name] = _losses(cfg, ncfg, mesh, local_batches, initial)
    ref, _, ref_params = results["1x1"]
    assert all(np.isfinite(ref)) and ref[-1] < ref[0]
    for name, (losses, leaf_sharding, params) in results.items():
        np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5, err_msg=name)
        assert len(leaf_sharding.device_set) == int(np.prod(MESHES[name]))
        if changes:
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
