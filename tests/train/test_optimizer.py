"""Stage freezing, the optimizer and the pure step, on a small stand-in model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neva_jax.model import parts as model_parts
from neva_jax.run_config import TrainSection
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

TRAIN = TrainSection(steps=20, lr=1e-2, warmup_steps=2, min_lr=1e-3, weight_decay=0.1)


def _run(standin, make_batch, parts, n_steps=3, nan_steps=(), nan_batch=None, **kw):
    tx = opt_lib.make_optimizer(TRAIN)
    graphdef, state = state_lib.create(standin(), parts, tx)
    init = jax.tree.map(np.asarray, state.checkpoint_tree()["params"])
    schedule = opt_lib.learning_rate_schedule(TRAIN)
    fn = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, trained_parts=parts, **kw))
    losses, metrics = [], None
    for i in range(n_steps):
        batch = make_batch(i)
        state, metrics = fn(state, nan_batch(batch) if i in nan_steps else batch)
        losses.append(float(metrics["loss"]))
    return init, state, losses, metrics


def _same(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_stage1_trains_projector_only(standin, make_batch):
    init, state, losses, _ = _run(standin, make_batch, ("projector",))
    final = state.checkpoint_tree()["params"]
    assert _same(init["llm"], final["llm"]) and _same(init["vision"], final["vision"])
    assert not _same(init["projector"], final["projector"])
    proj = opt_lib.largest_leaf(init["projector"])
    sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
    assert sizes and max(sizes) <= proj
    assert set(state.params) == {"projector"}
    assert losses[-1] < losses[0]


def test_stage2_trains_projector_and_llm(standin, make_batch):
    init, state, _, _ = _run(standin, make_batch, ("projector", "llm"))
    final = state.checkpoint_tree()["params"]
    assert _same(init["vision"], final["vision"])
    assert not _same(init["llm"], final["llm"])
    assert not _same(init["projector"], final["projector"])


def test_decay_mask_excludes_norms_and_biases(standin, make_batch):
    _, params, frozen, _ = model_parts.split_model(standin(), ("projector", "llm", "vision"))
    mask = opt_lib.decay_mask(params)
    assert mask["projector"]["kernel"] and not mask["projector"]["bias"]
    assert not mask["llm"]["final_norm"]["scale"]
    assert mask["llm"]["embed"]["embedding"] and mask["llm"]["lm_head"]["kernel"]
    assert frozen == {}


def test_projector_lr_is_the_projectors_adamw_learning_rate(standin, make_batch):
    """`train.projector_lr` (LLaVA's mm_projector_lr) in full fine-tuning: the first
    AdamW step moves a weight by at most its lr (Adam's first update is lr * g / (|g| +
    eps)), reached where the gradient is clearly non-zero: projector_lr for the
    projector, lr for the LLM; one state per parameter."""
    train = TrainSection(steps=20, lr=1e-2, projector_lr=1e-3, warmup_steps=0, grad_clip=0.0)
    tx = opt_lib.make_optimizer(train)
    parts = ("projector", "llm")
    graphdef, state = state_lib.create(standin(), parts, tx)
    step = jax.jit(
        step_lib.make_train_step(
            graphdef, tx, opt_lib.learning_rate_schedule(train), trained_parts=parts
        )
    )
    new, _ = step(state, make_batch(0))
    moved = jax.tree.map(
        lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))), new.params, state.params
    )
    assert all(np.isclose(m, 1e-3, rtol=1e-3) for m in jax.tree.leaves(moved["projector"]))
    assert all(np.isclose(m, 1e-2, rtol=1e-3) for m in jax.tree.leaves(moved["llm"]))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))
    # the schedule keeps its shape: warmup then cosine, scaled to the group's peak
    s, p = opt_lib.learning_rate_schedule(train), opt_lib.learning_rate_schedule(train, 1e-3)
    assert [float(p(i)) for i in (0, 7, 19)] == pytest.approx(
        [float(s(i)) / 10 for i in (0, 7, 19)]
    )


def test_schedule_warmup_then_cosine_to_min_lr():
    s = opt_lib.learning_rate_schedule(TRAIN)
    assert float(s(0)) == 0.0
    assert float(s(2)) == pytest.approx(TRAIN.lr)
    assert float(s(TRAIN.steps)) == pytest.approx(TRAIN.min_lr)
    assert float(s(10)) < TRAIN.lr


def test_warmup_rounds_up_and_the_schedule_is_transformers():
    """transformers' `get_warmup_steps` (ceil(steps x ratio)) and its cosine schedule."""
    import torch
    import transformers

    assert TrainSection(steps=2181, warmup_ratio=0.03).warmup == 66  # floor gave 65
    assert TrainSection(steps=100, warmup_ratio=0.03).warmup == 3
    train = TrainSection(steps=37, lr=2e-5, warmup_ratio=0.03, min_lr=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    hf = transformers.get_cosine_schedule_with_warmup(opt, train.warmup, train.steps)
    ours = opt_lib.learning_rate_schedule(train)
    for step in range(train.steps):
        assert float(ours(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12)
        opt.step()
        hf.step()


def test_nan_step_is_skipped_and_counted(standin, make_batch, nan_batch):
    init, state, _, m = _run(
        standin, make_batch, ("projector",), n_steps=2, nan_steps=(0, 1), nan_batch=nan_batch
    )
    assert int(state.nonfinite_count) == 2 and int(state.nonfinite_streak) == 2
    assert not bool(m["finite"])
    assert _same(init, state.checkpoint_tree()["params"])
    # The Adam step count did not move either.
    counts = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert all(int(c) == 0 for c in counts)


def test_streak_resets_after_finite_step(standin, make_batch, nan_batch):
    _, state, _, _ = _run(
        standin, make_batch, ("projector",), n_steps=3, nan_steps=(1,), nan_batch=nan_batch
    )
    assert int(state.nonfinite_count) == 1 and int(state.nonfinite_streak) == 0


@pytest.mark.parametrize("kw", [{"grad_accum_steps": 2}, {"logits_fraction": 0.4}])
def test_accumulation_and_logit_capacity_match_plain_step(standin, make_batch, kw):
    _, ref, ref_losses, _ = _run(standin, make_batch, ("projector", "llm"), n_steps=2)
    _, got, losses, _ = _run(standin, make_batch, ("projector", "llm"), n_steps=2, **kw)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_capacity_overflow_falls_back_to_all_positions(standin, make_batch):
    graphdef, state = state_lib.create(standin(), ("projector",), optax.sgd(0.0))
    b = make_batch(3)
    b["loss_mask"][0] = 1.0  # row 0: every position trained, more than the capacity

    @jax.jit
    def sums(state, batch):
        model = model_parts.merge_model(graphdef, state.params, state.frozen, state.other)
        full = step_lib.token_loss_sums(model, batch, 1.0)
        small = step_lib.token_loss_sums(model, batch, 0.1)
        return jnp.stack(full), jnp.stack(small)

    full, small = sums(state, b)
    np.testing.assert_allclose(small, full, rtol=1e-6)


@pytest.mark.parametrize("projector_lr", [0.0, 1e-3])
def test_optimizer_is_optax_adamw_and_keeps_its_state_on_a_nan_step(
    standin, make_batch, nan_batch, projector_lr
):
    """`make_optimizer`'s own clipping (one scale, the step's norm) and `scale_by_adam`
    (moments behind an optimization barrier, kept by the optimizer itself on a
    non-finite step) against the same chain built from `optax.clip_by_global_norm` and
    `optax.adamw`: the same state tree, and parameters, moments and counts after four
    clipped steps (the third one NaN) within float32 rounding of each other."""
    train = dataclasses.replace(TRAIN, projector_lr=projector_lr, grad_clip=0.5)

    def reference() -> optax.GradientTransformation:
        def adamw(peak=None):
            return optax.adamw(
                opt_lib.learning_rate_schedule(train, peak),
                b1=train.adam_b1,
                b2=train.adam_b2,
                eps=train.adam_eps,
                weight_decay=train.weight_decay,
                mask=opt_lib.decay_mask,
            )

        inner = adamw()
        if projector_lr:
            groups = {"default": adamw(), "projector": adamw(projector_lr)}
            inner = optax.multi_transform(groups, opt_lib.lr_labels)
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), inner)

    parts = ("projector", "llm")
    states = []
    for tx in (opt_lib.make_optimizer(train), reference()):
        graphdef, state = state_lib.create(standin(), parts, tx)
        fn = jax.jit(
            step_lib.make_train_step(
                graphdef, tx, opt_lib.learning_rate_schedule(train), trained_parts=parts
            )
        )
        for i in range(4):
            state, metrics = fn(state, nan_batch(make_batch(i)) if i == 2 else make_batch(i))
            assert bool(metrics["finite"]) == (i != 2)
        states.append(state)
    ours, ref = states
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(ours.opt_state)[0]]
    assert paths == [p for p, _ in jax.tree_util.tree_flatten_with_path(ref.opt_state)[0]]
    assert [int(c) for c in jax.tree.leaves(ours.opt_state) if np.ndim(c) == 0] == [3] * len(
        [c for c in jax.tree.leaves(ref.opt_state) if np.ndim(c) == 0]
    )
    for a, b in zip(
        jax.tree.leaves((ours.params, ours.opt_state)),
        jax.tree.leaves((ref.params, ref.opt_state)),
        strict=True,
    ):
        # One rounding of the clipped gradient, amplified where a moment's terms cancel:
        # an error relative to the leaf's scale, not to each element.
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-6, atol=1e-6 * np.abs(b).max())
