"""KV-cache generation: parity with `transformers`, cache vs recompute, meshes, text API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from neva_jax import sharding
from neva_jax.convert import checkpoint, hf
from neva_jax.eval import generate as gen_lib
from neva_jax.eval.sampling import SamplingParams
from neva_jax.model.neva import mask_padded_vocab

P = 16  # image slots of the tiny tower (32 px, 8 px patches)
IMAGE_ID, PAD_ID, EOS_ID = 4, 3, 2  # the synthetic tokenizer's <image>, <pad>, </s>


@pytest.fixture(scope="module")
def batch():
    """Two prompts of different lengths with one image each, and the pixels."""
    rng = np.random.default_rng(0)
    prompts = [
        [1, *[IMAGE_ID] * P, *rng.integers(5, 480, 3).tolist()],
        [1, *[IMAGE_ID] * P, *rng.integers(5, 480, 11).tolist()],
    ]
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)  # channels-last
    return prompts, pixels


def test_bucketing():
    lengths = (1, 16, 17, 25, 33, 49, 65, 256, 257, 288, 600, 1025)
    assert [gen_lib.bucket_prompt_length(n) for n in lengths] == [
        16, 16, 24, 32, 48, 64, 96, 256, 320, 320, 640, 1280,
    ]  # fmt: skip
    assert [gen_lib.bucket_new_tokens(n) for n in (1, 8, 9, 32, 33)] == [8, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def greedy(imported, batch):
    """32 greedy tokens for the two prompts."""
    prompts, pixels = batch
    kw = dict(max_new_tokens=32, eos_ids=[EOS_ID], pad_id=PAD_ID)
    return gen_lib.generate_tokens(imported.model, prompts, pixels[:, None], **kw)


def test_greedy_matches_transformers(llava_dir, batch, greedy, imported):
    """Against transformers restricted to the tokenizer's 480 ids (`suppress_tokens`): the
    32 rows past it pad the vocabulary and are never generated (neva.mask_padded_vocab)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    prompts, pixels = batch
    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    n = len(AutoTokenizer.from_pretrained(llava_dir))
    assert imported.config.tokenizer_vocab_size == n == 480
    L = max(map(len, prompts))
    ids = torch.full((2, L), PAD_ID)
    mask = torch.zeros((2, L), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as our generator does
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    with torch.no_grad():
        want = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            suppress_tokens=list(range(n, 512)),
        )[:, L:].tolist()
    for row, w in zip(greedy.token_ids, want, strict=True):
        w = w[: w.index(EOS_ID) + 1] if EOS_ID in w else w
        assert row == w
        assert len(row) == 32 and len(set(row)) > 8  # a real, varied continuation


@pytest.mark.parametrize("per_layer", [True, False], ids=["per_layer", "stacked"])
def test_cache_equals_recompute(imported_std_init, batch, per_layer):
    """Every step's logits equal a full forward pass over prompt + tokens so far.

    At transformers' default init (std 0.02): the differences are fp32
    summation-order noise, which grows with the activations (about 2e-7 here,
    1e-5 with the 10x-init model of the other tests). Both decode forms, each its
    own compiled program.
    """
    model = imported_std_init.model
    prompts, pixels = batch
    compiled = gen_lib._generate_jit._cache_size()
    out = gen_lib.generate_tokens(
        model,
        prompts,
        pixels[:, None],
        max_new_tokens=20,
        eos_ids=[EOS_ID],
        return_logits=True,
        per_layer_weights=per_layer,
    )
    assert gen_lib._generate_jit._cache_size() == compiled + 1  # this form was compiled
    seqs = [p + ids for p, ids in zip(prompts, out.token_ids, strict=True)]
    L = max(map(len, seqs))
    ids = np.full((2, L), PAD_ID, np.int32)
    seg = np.zeros((2, L), np.int32)
    pos = np.zeros((2, L), np.int32)
    for b, s in enumerate(seqs):  # one batched pass, left padded
        ids[b, L - len(s) :], seg[b, L - len(s) :], pos[b, L - len(s) :] = s, 1, np.arange(len(s))
    full = jax.jit(lambda *a: model(a[0], a[1], segment_ids=a[2], positions=a[3]))
    logits = full(ids, pixels[:, None], seg, pos)
    # Generation sees the tokenizer's 480 ids: the padded rows' logits are masked.
    logits = np.asarray(mask_padded_vocab(logits, model.config.tokenizer_vocab_size))
    worst = 0.0
    for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        n = len(out.token_ids[b])
        first = L - len(s) + len(p) - 1  # predicts the first new token
        worst = max(worst, np.abs(logits[b, first : first + n] - out.logits[b, :n]).max())
    assert worst <= 1e-5
    # The log-probs are those of the raw logits.
    lp = jax.nn.log_softmax(out.logits[1, 3])[out.token_ids[1][3]]
    np.testing.assert_allclose(out.logprobs[1][3], lp, atol=1e-6)


def test_prepared_decode_layers_equal_slicing_per_call(imported, batch, greedy):
    """Per-layer decode weights made once (q/k/v and gate/up fused) and held across
    calls give the same tokens as the other forms; a second call compiles nothing."""
    prompts, pixels = batch
    layers = gen_lib.prepare_decode_layers(imported.model)
    assert len(layers) == imported.model.config.llm.num_layers
    kw = dict(max_new_tokens=32, eos_ids=[EOS_ID], pad_id=PAD_ID, decode_layers=layers)
    out = gen_lib.generate_tokens(imported.model, prompts, pixels[:, None], **kw)
    assert out.token_ids == greedy.token_ids
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)
    size = gen_lib._generate_jit._cache_size()
    again = gen_lib.generate_tokens(imported.model, prompts[::-1], pixels[::-1, None], **kw)
    assert again.token_ids == greedy.token_ids[::-1]
    assert gen_lib._generate_jit._cache_size() == size


def test_sampling_is_seeded_and_does_not_recompile(imported, batch, greedy):
    prompts, pixels = batch
    size = gen_lib._generate_jit._cache_size()  # greedy, 32 tokens: compiled
    kw = dict(eos_ids=[EOS_ID], pad_id=PAD_ID)
    s = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=7)
    a = gen_lib.generate_tokens(
        imported.model, prompts, pixels[:, None], max_new_tokens=20, sampling=s, **kw
    )
    b = gen_lib.generate_tokens(
        imported.model, prompts, pixels[:, None], max_new_tokens=20, sampling=s, **kw
    )
    assert a.token_ids == b.token_ids
    assert a.token_ids != [r[:20] for r in greedy.token_ids]
    # Other knobs, another length in the same bucket, another seed: same program.
    s2 = SamplingParams(temperature=1.5, top_k=0, top_p=0.5, seed=8)
    c = gen_lib.generate_tokens(
        imported.model, prompts, pixels[:, None], max_new_tokens=27, sampling=s2, **kw
    )
    assert gen_lib._generate_jit._cache_size() == size
    assert [len(r) for r in c.token_ids] == [27, 27] or c.finished != [False, False]
    assert c.token_ids != a.token_ids


def test_checkpoint_from_8_devices_generates_identically_on_1(llava_dir, batch, tmp_path):
    prompts, pixels = batch
    mesh8 = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    model8 = hf.import_llava(llava_dir, mesh=mesh8).model
    assert len(model8.llm.lm_head.kernel[...].sharding.device_set) == 8
    checkpoint.save_model(tmp_path / "ckpt", model8)
    mesh1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model1, _ = checkpoint.load_model(tmp_path / "ckpt", mesh1)
    kw = dict(max_new_tokens=16, eos_ids=[EOS_ID], pad_id=PAD_ID)
    out8 = gen_lib.generate_tokens(model8, prompts, pixels[:, None], **kw)
    out1 = gen_lib.generate_tokens(model1, prompts, pixels[:, None], **kw)
    assert out8.token_ids == out1.token_ids
    np.testing.assert_allclose(out8.logprobs, out1.logprobs, atol=1e-5)


def test_generator_renders_template_and_cuts_at_stop(llava_dir, imported):
    from PIL import Image

    from neva_jax.data.conversation import get_template
    from neva_jax.data.tokenize import load_tokenizer

    tok = load_tokenizer(llava_dir, control_tokens=("</s>",))
    g = gen_lib.Generator(imported.model, tok, get_template("vicuna_v1"))
    prompt, ids = g.prompt_ids("What colour are the shapes?", has_image=True)
    assert prompt.endswith("USER: <image>\nWhat colour are the shapes? ASSISTANT:")
    assert ids[0] == 1 and ids.count(IMAGE_ID) == P
    image = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
    [c] = g.generate(["What colour are the shapes?"], [image], max_new_tokens=8)
    assert c.text == tok.hf.decode(c.token_ids, skip_special_tokens=True).strip()
    # A stop string cuts the text and the tokens that produced it.
    word = c.text.split()[1] if len(c.text.split()) > 1 else c.text[-1]
    [d] = g.generate(["What colour are the shapes?"], [image], max_new_tokens=8, stop=[word])
    assert word not in d.text and d.finished and len(d.token_ids) <= len(c.token_ids)
    assert jnp.all(jnp.asarray(d.token_ids) == jnp.asarray(c.token_ids[: len(d.token_ids)]))
    # A plain string is one stop string, not a set of characters.
    [e] = g.generate(["What colour are the shapes?"], [image], max_new_tokens=8, stop=word)
    assert e.text == d.text
    # Raw uint8 pixels are an image like the PIL one; preprocessed floats pass through.
    pixels = np.asarray(image)
    [f] = g.generate(["What colour are the shapes?"], [pixels], max_new_tokens=8)
    assert f.token_ids == c.token_ids
    [h] = g.generate(["What colour are the shapes?"], [g.preprocess(image)], max_new_tokens=8)
    assert h.token_ids == c.token_ids
    # Inputs that used to answer something else, or fail deep inside.
    bad = [
        ((["q"], [np.zeros((5, 5, 3), np.float32)]), ValueError, "an image array of float32"),
        (("q", [None]), TypeError, "a list of strings, got one str"),
        ((["q"], image), TypeError, "images: a list"),
        (([], []), ValueError, "no questions"),
    ]
    for args, kind, message in bad:
        with pytest.raises(kind, match=message):
            g.generate(*args, max_new_tokens=4)
    with pytest.raises(TypeError, match="max_new_tokens: an integer"):
        g.generate(["q"], [None], max_new_tokens=2.5)
    with pytest.raises(ValueError, match="has no 'text'"):
        g.answer_questions([{"question_id": 1, "question": "q"}])
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        gen_lib.SamplingParams(temperature=float("nan"))
