"""Vocabulary rows past the tokenizer (imports pad 32002 ids to 32064 rows, llava-hf):
with 64 padded rows the loss, its gradients and greedy tokens equal the unpadded model's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neva_jax.eval import generate as gen_lib
from neva_jax.model import neva
from neva_jax.model import parts as model_parts
from neva_jax.sharding import unsharded
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

N, PAD = 448, 64  # the tokenizer's ids, padded rows
IMAGE_ID, EOS_ID = N - 1, 2
P = 16  # image slots of the tiny tower
PARTS = ("projector", "llm")


def _models():
    """(unpadded model, the same with 64 extra rows): equal on the first N rows, the
    padded rows large enough to win every argmax if they were not masked."""
    small_cfg = neva.tiny(
        llm=dataclasses.replace(neva.tiny().llm, vocab_size=N), image_token_id=IMAGE_ID
    )
    big_cfg = dataclasses.replace(
        small_cfg,
        llm=dataclasses.replace(small_cfg.llm, vocab_size=N + PAD),
        tokenizer_vocab_size=N,
    )
    small = unsharded(lambda: neva.Neva(small_cfg, rngs=nnx.Rngs(0)))
    big = unsharded(lambda: neva.Neva(big_cfg, rngs=nnx.Rngs(1)))
    params = nnx.to_pure_dict(nnx.state(small, nnx.Param))
    rng = np.random.default_rng(0)
    embed = params["llm"]["embed"]["embedding"]
    head = params["llm"]["lm_head"]["kernel"]
    grown = dict(params)
    grown["llm"] = {
        **params["llm"],
        "embed": {"embedding": jnp.concatenate([embed, rng.normal(size=(PAD, 64))], axis=0)},
        "lm_head": {"kernel": jnp.concatenate([head, 50.0 * rng.normal(size=(64, PAD))], axis=1)},
    }
    state = nnx.state(big, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grown))
    nnx.update(big, state)
    return small, big


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.fixture(scope="module")
def batch(make_batch_of):
    """2 rows of 40 tokens: BOS, 16 image slots, text; the text after the image trained."""
    rng = np.random.default_rng(1)
    B, T = 2, 40
    ids = rng.integers(5, N - 1, (B, T)).astype(np.int32)
    ids[:, 1 : 1 + P] = IMAGE_ID
    mask = np.zeros((B, T), np.float32)
    mask[:, 1 + P : T - 1] = 1.0
    return make_batch_of(ids, mask, rng.normal(size=(B, 1, 32, 32, 3)).astype(np.float32))


def _loss_and_grads(model, batch, vocab_in_use):
    graphdef, state = state_lib.create(model, PARTS, optax.sgd(0.0))

    @jax.jit
    def run(params):
        def loss(params):
            m = model_parts.merge_model(graphdef, params, state.frozen, state.other)
            s, n, _ = step_lib.token_loss_sums(m, batch, 0.5, vocab_in_use=vocab_in_use)
            return s / n

        return jax.value_and_grad(loss)(params)

    return run(state.params)


def test_loss_and_gradients_equal_the_unpadded_model(models, batch):
    small, big = models
    want, g_small = _loss_and_grads(small, batch, 0)
    got, g_big = _loss_and_grads(big, batch, N)
    unmasked, _ = _loss_and_grads(big, batch, 0)
    print(
        f"padded-vocab loss {float(got):.7f}, unpadded {float(want):.7f}, "
        f"|diff| {abs(float(got) - float(want)):.1e}"
    )
    assert abs(float(got) - float(want)) <= 1e-6
    assert abs(float(unmasked) - float(want)) > 1.0  # the padded rows would matter
    head_big = g_big["llm"]["lm_head"]["kernel"]
    assert float(jnp.max(jnp.abs(head_big[:, N:]))) == 0.0  # no gradient into padding
    np.testing.assert_allclose(head_big[:, :N], g_small["llm"]["lm_head"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(
        g_big["projector"]["linear_1"]["kernel"],
        g_small["projector"]["linear_1"]["kernel"],
        atol=1e-6,
    )


def test_greedy_tokens_equal_the_unpadded_model(models, batch):
    small, big = models
    prompts = [batch["input_ids"][b, :20].tolist() for b in range(2)]
    kw = dict(max_new_tokens=12, eos_ids=[EOS_ID], pad_id=0)
    images = batch["images"]
    want = gen_lib.generate_tokens(small, prompts, images, **kw).token_ids
    got = gen_lib.generate_tokens(big, prompts, images, **kw).token_ids
    print(f"greedy: {got} vs unpadded {want}")
    assert got == want and all(len(row) == 12 for row in want)
    # Unmasked, the padded rows would be chosen.
    logits = big(jnp.asarray(np.array(prompts, np.int32)), jnp.asarray(images))
    assert int(jnp.argmax(logits[0, -1])) >= N
