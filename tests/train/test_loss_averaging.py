"""`train.loss_normalization`: HF Trainer's / NeMo's mean of per-micro-batch, per-device
token means (`micro_batch`) against a hand computation, and the global token mean."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from neva_jax import sharding
from neva_jax.model import parts as model_parts
from neva_jax.train import build
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

B = 8  # 2 devices x 2 micro-batches x 2 rows
PARTS = ("projector", "llm")


def _capture_grads() -> optax.GradientTransformation:
    """An 'optimizer' whose state is the last gradient it was given (and no update)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


@pytest.fixture
def setup(standin, make_batch):
    b = make_batch(3, B)
    # Device 1 (rows 4..7), micro-batch 1 (rows 5, 7): no trained token.
    b["loss_mask"][[5, 7]] = 0.0
    b["loss_mask"][0, 3:9] = 1.0  # rows of very different token counts (at most 8)
    # A packed row: two samples (the weights follow the loss mask, not the segments).
    b["segment_ids"][2, 6:] = 2
    b["positions"][2, 6:] = np.arange(b["positions"].shape[1] - 6)
    graphdef, state = state_lib.create(standin(), PARTS, _capture_grads())
    return graphdef, state, b


def _group_mean_loss(graphdef, state, b, rows):
    """One HF micro-batch on one device: CE averaged over its trained tokens (a zero
    sum over max(count, 1) when it has none, as NeMo's loss_func)."""

    def loss(params):
        model = model_parts.merge_model(graphdef, params, state.frozen, state.other)
        sub = {k: jnp.asarray(v[rows]) for k, v in b.items()}
        h = model.hidden_states(sub["input_ids"], sub["images"])
        ce = optax.softmax_cross_entropy_with_integer_labels(model.llm.logits(h), sub["targets"])
        mask = sub["loss_mask"]
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return jax.value_and_grad(loss)(state.params)


def _step(graphdef, state, b, normalization, logits_fraction=1.0):
    """The train step on a 2-device data axis with 2 accumulation micro-batches."""
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    fn = step_lib.make_train_step(
        graphdef,
        _capture_grads(),
        optax.constant_schedule(0.0),
        trained_parts=PARTS,
        grad_accum_steps=2,
        loss_normalization=normalization,
        batch_shards=2,
        logits_fraction=logits_fraction,
    )
    rep = NamedSharding(mesh, PartitionSpec())
    batch_sh = build.batch_shardings(mesh, tuple(b))
    state_sh = jax.tree.map(lambda _: rep, state)
    with jax.set_mesh(mesh):
        new_state, metrics = step_lib.jit_train_step(fn, state_sh, batch_sh, rep)(
            jax.device_put(jax.device_get(state), state_sh),
            {k: jax.device_put(v, batch_sh[k]) for k, v in b.items()},
        )
    return float(metrics["loss"]), new_state.opt_state


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("logits_fraction", [1.0, 0.5])  # 0.5: logits at 8 of 12 positions
def test_micro_batch_is_the_mean_of_per_device_per_micro_batch_means(setup, logits_fraction):
    graphdef, state, b = setup
    # HF Trainer / DDP: device d holds rows [4d, 4d + 4); micro-batch a of that device
    # takes its rows r with r % 2 == a. Loss and gradient: the mean over the 4 groups.
    groups = [[r for r in range(4 * d, 4 * d + 4) if r % 2 == a] for d in (0, 1) for a in (0, 1)]
    assert groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    results = [_group_mean_loss(graphdef, state, b, rows) for rows in groups]
    want_loss = np.mean([float(v) for v, _ in results])
    want_grads = jax.tree.map(lambda *g: sum(g) / len(g), *[g for _, g in results])
    assert float(results[3][0]) == 0.0  # the empty micro-batch: 0, and it counts in the 4

    loss, grads = _step(graphdef, state, b, "micro_batch", logits_fraction)
    print(
        f"micro_batch: |loss - hand| = {abs(loss - want_loss):.2e}, "
        f"max |grad - hand| = {_max_diff(grads, want_grads):.2e}"
    )
    assert abs(loss - want_loss) <= 1e-6
    assert _max_diff(grads, want_grads) <= 1e-6


def test_global_tokens_is_one_token_mean_and_differs(setup):
    graphdef, state, b = setup
    every_row = list(range(B))
    count = float(np.sum(b["loss_mask"]))
    want_loss, want_grads = _group_mean_loss(graphdef, state, b, every_row)
    loss, grads = _step(graphdef, state, b, "global_tokens")
    assert count > 1 and abs(loss - float(want_loss)) <= 1e-6
    assert _max_diff(grads, want_grads) <= 1e-6
    micro, _ = _step(graphdef, state, b, "micro_batch")
    assert abs(micro - loss) > 1e-3  # the two averages really differ on this batch


def test_weights_follow_the_row_layout():
    mask = np.ones((8, 3), np.float32)
    mask[5] = 0.0
    w = np.asarray(step_lib.loss_weights(jnp.asarray(mask), "micro_batch", 2, 2))
    # Group (device 1, micro-batch 1) = rows 5, 7: 3 tokens, each weighs 1 / (3 x 4).
    np.testing.assert_allclose(w[7], 1 / 12)
    np.testing.assert_allclose(w[0], 1 / 24)
    assert float(w.sum()) == pytest.approx(4 / 4)
    np.testing.assert_allclose(
        np.asarray(step_lib.loss_weights(jnp.asarray(mask), "global_tokens")), mask / mask.sum()
    )
