"""The LLaMA decoder: parity with transformers, causality, KV cache, packing, bf16.

Axis letters: B batch, T length, D width, V vocab.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from neva_jax import platform
from neva_jax.convert import hf_llama
from neva_jax.model import llama
from neva_jax.model.attention import select_implementation
from neva_jax.sharding import unsharded

B, T, V = 2, 12, 64


def _hf_model(tied: bool, seed: int, rope: dict | None = None) -> transformers.LlamaForCausalLM:
    """A tiny random LlamaForCausalLM with GQA (4 heads, 2 kv heads), fp32."""
    theta = 10000.0 if not tied else 500.0
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters=rope or {"rope_theta": theta, "rope_type": "default"},
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, and weights large enough to matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _load(cfg: llama.LlamaConfig, params: dict) -> tuple[nnx.GraphDef, nnx.State]:
    model = unsharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions=None, segment_ids=None):
    return nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(graphdef, per_layer, state, ids, cache, positions, segment_ids):
    model = nnx.merge(graphdef, state)
    layers = model.unstack_layers() if per_layer else None
    cache, h = model.prefill(
        cache, ids, positions=positions, segment_ids=segment_ids, layers=layers
    )
    return model.logits(h), cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(graphdef, per_layer, state, ids, cache):
    model = nnx.merge(graphdef, state)
    layers = model.unstack_layers() if per_layer else None
    cache, h = model.decode(cache, ids, layers=layers)  # positions from the cache
    return model.logits(h), cache


def _convert(hf_model: transformers.LlamaForCausalLM) -> tuple[llama.LlamaConfig, dict]:
    cfg = hf_llama.from_hf_config(hf_model.config.to_dict(), attention_impl="xla")
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    return cfg, hf_llama.hf_to_params(tensors, cfg)


@pytest.fixture(scope="module")
def untied():
    hf_model = _hf_model(tied=False, seed=0)
    cfg, params = _convert(hf_model)
    return hf_model, cfg, params, _load(cfg, params)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)


def _torch_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_config_mapping(untied):
    hf_model, cfg, _, _ = untied
    assert (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size) == (4, 2, 8)
    assert not cfg.share_embeddings_and_output_weights and cfg.layernorm_epsilon == 1e-5
    old_style = {**hf_model.config.to_dict(), "rope_theta": 123.0}
    del old_style["rope_parameters"]
    assert hf_llama.from_hf_config(old_style).rope_theta == 123.0
    with pytest.raises(ValueError, match="rope_type"):
        hf_llama.from_hf_config({**old_style, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    back = hf_llama.to_hf_config(cfg)
    assert back["num_key_value_heads"] == 2 and back["rope_parameters"]["rope_theta"] == 10000.0


def test_parity_untied_gqa(untied, ids):
    hf_model, _, _, (graphdef, state) = untied
    ours = np.asarray(_forward(graphdef, state, ids))
    diff = np.abs(ours - _torch_logits(hf_model, ids)).max()
    print(f"\nLlamaForCausalLM parity (untied, GQA 4/2): max abs diff {diff:.2e}")
    assert ours.dtype == np.float32 and ours.shape == (B, T, V)
    assert diff <= 1e-4


def test_parity_tied(ids):
    hf_model = _hf_model(tied=True, seed=1)
    cfg, params = _convert(hf_model)
    assert cfg.share_embeddings_and_output_weights and "lm_head" not in params
    graphdef, state = _load(cfg, params)
    diff = np.abs(np.asarray(_forward(graphdef, state, ids)) - _torch_logits(hf_model, ids)).max()
    print(f"\nLlamaForCausalLM parity (tied, rope theta 500): max abs diff {diff:.2e}")
    assert diff <= 1e-4


# Llama 3.1's scaling on head dim 8 (wavelengths 6.3, 63, 628, 6283), original context
# 32, factors 0.5 / 4: one frequency kept (< 8), one smoothed (8..64), two divided (> 64).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 0.5,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_parity_llama3_rope_scaling(untied, ids):
    """rope_type llama3 (LLaVA-NeXT-style Llama-3.1 LLMs): imported from transformers 5
    `rope_parameters` (and transformers 4 `rope_scaling`), exported back, logits equal."""
    hf_model = _hf_model(tied=False, seed=0, rope=LLAMA3_ROPE)
    cfg, params = _convert(hf_model)
    assert cfg.rope_type == "llama3" and cfg.rope_scaling == (8.0, 0.5, 4.0, 32)
    ours = np.asarray(_forward(*_load(cfg, params), ids))
    diff = np.abs(ours - _torch_logits(hf_model, ids)).max()
    plain = np.abs(ours - np.asarray(_forward(*untied[3], ids))).max()  # same weights, no scaling
    print(
        f"\nLlamaForCausalLM parity (rope_type llama3): max abs diff {diff:.2e} "
        f"(vs unscaled RoPE {plain:.2e})"
    )
    assert diff <= 1e-4 and plain > 1e-2
    back = hf_llama.to_hf_config(cfg)
    assert back["rope_parameters"] == LLAMA3_ROPE
    assert hf_llama.from_hf_config(transformers.LlamaConfig(**back).to_dict()) == cfg
    old_style = {**hf_model.config.to_dict(), "rope_theta": 10000.0}
    old_style["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    del old_style["rope_parameters"]
    assert hf_llama.from_hf_config(old_style) == cfg


def _megatron_rope(t: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """t [S, B, N, H] through NeMo 1's RotaryEmbedding(rotary_dim) and apply_rotary_pos_emb
    (megatron/position_embedding/rotary_position_embedding.py), transcribed."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    seq = torch.arange(t.shape[0]).type_as(inv_freq)
    freqs = torch.einsum("i , j -> i j", seq, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [S, 1, 1, rot]
    rot_dim = emb.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = t.reshape(*t.shape[:-1], 2, -1).unbind(dim=-2)  # _rotate_half
    t = (t * emb.cos()) + (torch.cat((-x2, x1), dim=-1) * emb.sin())
    return torch.cat((t, t_pass), dim=-1)


def test_partial_rotary_matches_megatron():
    """rotary_percentage 0.5 (NeMo): the attention layer equals one computed with Megatron's
    definition (rotary dim = int(kv_channels x 0.5), the rest of each head unrotated)."""
    from neva_jax.model.attention import Attention

    D, N, H, S, base = 32, 2, 16, 10, 10000.0
    attn = unsharded(
        lambda: Attention(
            D,
            N,
            N,
            H,
            rope_theta=base,
            rotary_percentage=0.5,
            rngs=nnx.Rngs(3),
            kernel_init=nnx.initializers.normal(0.3),
        )
    )
    assert attn.rotary_dim == 8
    x = np.random.default_rng(0).normal(size=(1, S, D)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda m, x: m(x)[1])(attn, x))[0]

    def kernel(p):
        return torch.tensor(np.array(p.kernel[...]))

    xt = torch.from_numpy(x[0])  # [S, D]
    q, k, v = (
        torch.einsum("sd,dnh->snh", xt, kernel(p))[:, None] for p in (attn.q, attn.k, attn.v)
    )
    q, k = _megatron_rope(q, 8, base)[:, 0], _megatron_rope(k, 8, base)[:, 0]  # [S, N, H]
    scores = torch.einsum("snh,tnh->nst", q, k) / H**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), -torch.inf)
    ctx = torch.einsum("nst,tnh->snh", scores.softmax(-1), v[:, 0])
    want = torch.einsum("snh,nhd->sd", ctx, kernel(attn.o)).numpy()
    full = _megatron_rope(torch.einsum("sd,dnh->snh", xt, kernel(attn.q))[:, None], 16, base)
    diff = np.abs(ours - want).max()
    print(f"\npartial rotary (0.5) vs Megatron's definition: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert not torch.allclose(full[:, 0], q)  # rotating all 16 features would differ


def test_export_round_trip_and_strict_keys(untied):
    hf_model, cfg, params, _ = untied
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    back = hf_llama.params_to_hf(params, cfg)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_llama.hf_to_params(missing, cfg)
    with pytest.raises(KeyError, match=r"model\.extra"):
        hf_llama.hf_to_params({**tensors, "model.extra": np.zeros(1)}, cfg)


def test_causality(untied, ids):
    """d logits[:, t0] / d embeds[:, t > t0] is exactly zero, with and without segment ids."""
    _, _, _, (graphdef, state) = untied
    t0 = 4
    embeds = nnx.merge(graphdef, state).embed(jnp.asarray(ids))

    @jax.jit
    def grads(embeds, segment_ids):
        def f(e):
            model = nnx.merge(graphdef, state)
            return model(embeds=e, segment_ids=segment_ids)[:, t0].sum()

        return jax.grad(f)(embeds)

    for segment_ids in (None, jnp.ones((B, T), jnp.int32)):
        g = np.asarray(grads(embeds, segment_ids))
        assert np.all(g[:, t0 + 1 :] == 0.0)
        assert np.all(np.abs(g[:, : t0 + 1]).sum(-1) > 0)


@pytest.mark.parametrize("form", ["stacked", "per_layer"])
def test_kv_cache_matches_full_recompute(untied, form):
    """Prefill (left padded, two prompt lengths) + greedy decode == recomputing everything.

    With the weights sliced from the stacked layers in each call, and with per-layer
    modules sliced once (`unstack_layers`, the CPU decode form of `generate`)."""
    _, _, _, (graphdef, state) = untied
    n_prompt, n_new, lengths = 8, 4, (8, 5)
    rng = np.random.default_rng(1)
    prompt = np.zeros((B, n_prompt), np.int32)
    segment_ids = np.zeros((B, n_prompt), np.int32)
    positions = np.zeros((B, n_prompt), np.int32)
    for b, n in enumerate(lengths):
        prompt[b, n_prompt - n :] = rng.integers(0, V, n)
        segment_ids[b, n_prompt - n :] = 1
        positions[b, n_prompt - n :] = np.arange(n)
    model = nnx.merge(graphdef, state)
    per_layer = form == "per_layer"
    cache = model.init_cache(B, n_prompt + n_new)
    logits, cache = _prefill(graphdef, per_layer, state, prompt, cache, positions, segment_ids)
    step_logits = [np.asarray(logits)]
    tokens = [prompt]
    for _ in range(n_new):
        next_ids = np.asarray(jnp.argmax(step_logits[-1][:, -1:], -1)).astype(np.int32)
        tokens.append(next_ids)
        logits, cache = _decode(graphdef, per_layer, state, next_ids, cache)
        step_logits.append(np.asarray(logits))
    cached = np.concatenate(step_logits, axis=1)[:, :-1]  # logits for every fed token but the last
    fed = np.concatenate(tokens, axis=1)  # [B, 12]
    assert np.asarray(cache.lengths).tolist() == [n_prompt + n_new] * B

    # Reference: each row alone, unpadded (trailing filler is invisible to causal attention).
    alone = np.zeros((B, T), np.int32)
    for b, n in enumerate(lengths):
        alone[b, : n + n_new] = fed[b, n_prompt - n :]
    ref = np.asarray(_forward(graphdef, state, alone))
    diff = 0.0
    for b, n in enumerate(lengths):
        ours_b = cached[b, n_prompt - n :]
        diff = max(diff, np.abs(ours_b - ref[b, : n + n_new - 1]).max())
    print(f"\nKV cache prefill+decode vs full recompute: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert np.all(np.isfinite(cached))  # padding rows stay finite


def test_insert_into_slots_then_decode_rows_of_different_lengths(untied):
    """The serving pattern: each prompt prefilled alone into a one-row cache, inserted
    into a slot of a shared cache (rows at different lengths, no padding between
    them), then decode steps advance every slot at once; a freed slot is ignored.
    Every step's logits equal each sequence recomputed alone."""
    _, _, _, (graphdef, state) = untied
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(3)
    prompts = {2: rng.integers(0, V, 7), 0: rng.integers(0, V, 3)}  # slot -> prompt
    n_new, slots, S = 4, 3, 16

    @jax.jit
    def prefill_one(state, ids, segment_ids):
        m = nnx.merge(graphdef, state)
        cache, h = m.prefill(m.init_cache(1, 8), ids, segment_ids=segment_ids)
        return cache, m.logits(h)

    @jax.jit
    def insert(big, prefix, slot):
        return big.insert(prefix, slot)

    @jax.jit
    def step(state, cache, ids):
        cache, h = nnx.merge(graphdef, state).decode(cache, ids)
        return cache, nnx.merge(graphdef, state).logits(h)[:, 0]

    big = model.init_cache(slots, S)
    ones = np.ones((1, 8), np.int32)
    big = insert(big, prefill_one(state, ones, ones)[0], 1)  # a request that then leaves
    big = big.free(1)
    fed, got = {}, {}
    for slot, p in prompts.items():
        ids, seg = np.zeros((1, 8), np.int32), np.zeros((1, 8), np.int32)
        ids[0, : len(p)], seg[0, : len(p)] = p, 1  # right padded: pads have segment 0
        prefix, logits = prefill_one(state, ids, seg)
        big = insert(big, prefix, slot)
        # The first token each slot decodes: the prompt's greedy continuation.
        fed[slot], got[slot] = [*p, int(np.asarray(logits)[0, len(p) - 1].argmax())], []
    assert np.asarray(big.lengths).tolist() == [3, 0, 7]
    for _ in range(n_new):
        ids = np.zeros((slots, 1), np.int32)
        for slot in prompts:
            ids[slot, 0] = fed[slot][-1]
        big, logits = step(state, big, ids)
        for slot in prompts:
            got[slot].append(np.asarray(logits[slot]))
            fed[slot].append(int(np.asarray(logits[slot]).argmax()))
    worst = 0.0
    for slot, p in prompts.items():
        seq = np.asarray(fed[slot][:-1])[None]  # prompt + the tokens fed back
        ref = np.asarray(_forward(graphdef, state, seq))[0, len(p) :]
        worst = max(worst, np.abs(np.stack(got[slot]) - ref).max())
    print(f"\nslots at different lengths vs recompute: max abs diff {worst:.2e}")
    assert worst <= 1e-5
    assert np.asarray(big.lengths).tolist()[::2] == [3 + n_new, 7 + n_new]


def test_packing_equals_separate(untied):
    """Two samples packed in one row (+ a padded row) == each sample alone."""
    _, _, _, (graphdef, state) = untied
    rng = np.random.default_rng(2)
    a, b, c = (rng.integers(0, V, n).astype(np.int32) for n in (5, 7, 8))
    ids = np.zeros((B, T), np.int32)
    ids[0] = np.concatenate([a, b])
    ids[1, :8] = c
    segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 8 + [0] * 4], np.int32)
    positions = np.array([list(range(5)) + list(range(7)), list(range(8)) + [0] * 4], np.int32)
    packed = np.asarray(_forward(graphdef, state, ids, positions, segment_ids))
    alone = np.zeros((2 * B, T), np.int32).reshape(2, B, T)
    alone[0, 0, :5], alone[0, 1, :7], alone[1, 0, :8] = a, b, c
    ref0, ref1 = (np.asarray(_forward(graphdef, state, x)) for x in alone)
    diffs = [
        np.abs(packed[0, :5] - ref0[0, :5]).max(),
        np.abs(packed[0, 5:] - ref0[1, :7]).max(),
        np.abs(packed[1, :8] - ref1[0, :8]).max(),
    ]
    print(f"\npacked vs alone: max abs diff {max(diffs):.2e}")
    assert max(diffs) <= 1e-5
    assert np.all(np.isfinite(packed))


def test_last_layer_at_queries_equals_all_positions(untied):
    """The train step's capacity path: the last layer computed only at some positions of
    packed rows gives those positions' hidden states and the same gradients."""
    _, _, _, (graphdef, state) = untied
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 8 + [0] * 4], np.int32)
    positions = np.array([list(range(5)) + list(range(7)), list(range(8)) + [0] * 4], np.int32)
    queries = np.array([[1, 4, 5, 11], [0, 3, 7, 7]], np.int32)
    kw = dict(positions=positions, segment_ids=segment_ids)

    def via_all(state):
        h = nnx.merge(graphdef, state).hidden_states(ids, **kw)
        return jnp.take_along_axis(h, queries[:, :, None], axis=1)

    def via_queries(state):
        model = nnx.merge(graphdef, state)
        pre = model.hidden_states(ids, stop_before_last=True, **kw)
        return model.last_layer(pre, queries=queries, **kw)

    want, got = (np.asarray(jax.jit(f)(state)) for f in (via_all, via_queries))
    assert got.shape == (B, 4, 32) and np.abs(got - want).max() <= 1e-5
    loss = lambda f: jax.jit(jax.grad(lambda s: jnp.sum(jnp.sin(f(s)))))  # noqa: E731
    g_all, g_q = loss(via_all)(state), loss(via_queries)(state)
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_all, g_q)))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_all))
    print(
        f"\nlast layer at queries: values {np.abs(got - want).max():.1e}, grads {diff:.1e} of {scale:.1e}"
    )
    assert diff <= 1e-6 * scale  # fp32 rounding of matmuls over 4 rows instead of 12


def test_unrolled_remat_and_bf16(untied, ids):
    """The same stacked params run unrolled + remat, and in bf16 compute with fp32 params."""
    _, cfg, params, (graphdef, state) = untied
    ref = np.asarray(_forward(graphdef, state, ids))
    unrolled = _load(dataclasses.replace(cfg, scan_layers=False, remat_policy="full"), params)
    assert np.abs(np.asarray(_forward(*unrolled, ids)) - ref).max() <= 1e-5

    g16, s16 = _load(dataclasses.replace(cfg, dtype="bfloat16"), params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16))
    out16 = np.asarray(_forward(g16, s16, ids))
    assert out16.dtype == np.float32 and np.all(np.isfinite(out16))
    rel = np.abs(out16 - ref).max() / np.abs(ref).max()
    print(f"\nbf16 compute vs fp32: max abs diff / max |logit| = {rel:.3f}")
    assert rel < 0.1  # bf16 keeps ~3 significant digits: a sanity bound, not a parity test


def test_remat_selective_gradients(untied, ids):
    _, cfg, params, (graphdef, state) = untied

    def grad_fn(graphdef):
        @jax.jit
        def g(state):
            return jax.grad(lambda s: nnx.merge(graphdef, s)(ids).mean())(state)

        return g

    base = grad_fn(graphdef)(state)
    g_sel, s_sel = _load(dataclasses.replace(cfg, remat_policy="selective"), params)
    sel = grad_fn(g_sel)(s_sel)
    diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), base, sel)))
    assert diff <= 1e-6


def test_weight_gradient_forms_agree(untied, ids):
    """The CPU weight-gradient form (`row_major_weight_grads`, layers.contract: every
    Dense and the untied LM head) and the form XLA picks (the GPU choice): same logits,
    same gradients, both run here."""
    _, cfg, params, _ = untied
    forms = {}
    for row_major in (False, True):
        graphdef, state = _load(dataclasses.replace(cfg, row_major_weight_grads=row_major), params)

        @jax.jit
        def value_and_grad(state, graphdef=graphdef):
            return jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(ids).std())(state)

        forms[row_major] = value_and_grad(state)
    (v_xla, g_xla), (v_cpu, g_cpu) = forms[False], forms[True]
    assert abs(float(v_xla) - float(v_cpu)) <= 1e-6
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_xla))
    diff = max(
        jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), g_xla, g_cpu))
    )
    assert diff <= 1e-5 * scale and scale > 0


def test_attention_impl_choice():
    assert select_implementation("xla", jnp.bfloat16, 128) == "xla"
    assert select_implementation("cudnn", jnp.float32, 128) == "cudnn"
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    here = platform.resolve_runtime(attention_impl="auto")["attention_impl"]
    assert select_implementation(here, jnp.bfloat16, 128) == expected
    # Both sides of the backend choice, whatever this backend is.
    gpu = platform.resolve_runtime("gpu")["attention_impl"]
    cpu = platform.resolve_runtime("cpu")["attention_impl"]
    assert select_implementation(gpu, jnp.bfloat16, 128) == "cudnn"
    assert select_implementation(gpu, jnp.bfloat16, 128, q_len=1, kv_len=9, has_mask=True) == "xla"
    assert select_implementation(cpu, jnp.bfloat16, 128) == "xla"
    assert select_implementation("auto", jnp.float32, 128) == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        llama.tiny(attention_impl="flash")


def test_presets_and_nemo_knobs():
    c7, c13 = llama.llama2_7b_chat(), llama.llama2_13b_chat()
    assert (c7.num_layers, c7.hidden_size, c7.ffn_hidden_size, c7.num_attention_heads) == (
        32,
        4096,
        11008,
        32,
    )
    assert (c13.num_layers, c13.hidden_size, c13.ffn_hidden_size, c13.num_attention_heads) == (
        40,
        5120,
        13824,
        40,
    )
    assert llama.vicuna_7b() == c7 and llama.vicuna_13b() == c13
    assert (c7.vocab_size, c7.encoder_seq_length, c7.rope_theta, c7.layernorm_epsilon) == (
        32000,
        4096,
        10000.0,
        1e-5,
    )
    # An nvgpt-style decoder is a config: layernorm1p, squared-relu, biases, learned positions.
    cfg = llama.tiny(
        vocab_size=V,
        hidden_size=32,
        ffn_hidden_size=64,
        normalization="layernorm1p",
        activation="squared-relu",
        bias=True,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
        scan_layers=False,
    )
    model = unsharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    assert model.pos_embed is not None and model.layers.mlp.gate is None and model.lm_head is None
    assert model.layers.attn.q.bias.shape == (2, 4, 8)
    out = model(jnp.zeros((1, 4), jnp.int32))
    assert out.shape == (1, 4, V) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="normalization"):
        llama.tiny(normalization="batchnorm")


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_is_rotate_half_exactly(rotary_dim):
    """`apply_rope` (each half on its own, an angle's cosine and sine taken once, the
    tables kept out of XLA's fusions) against the textbook `x * cos + rotate_half(x) *
    sin` over [cos, cos] and [sin, sin]: bitwise equal op by op and compiled, the
    unrotated tail (NeMo's rotary_percentage < 1) passed through."""
    from neva_jax.model import rope as rope_lib

    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 9, 11, 300, 4095]])

    def textbook(x, positions):
        inv = jnp.asarray(rope_lib.rope_inv_freq(rotary_dim, 500.0))
        freqs = positions.astype(jnp.float32)[..., None] * inv
        angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
        xr, half = x[..., :rotary_dim], rotary_dim // 2
        rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
        rotated = xr * jnp.cos(angles) + rotated * jnp.sin(angles)
        return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)

    ours = functools.partial(rope_lib.apply_rope, theta=500.0, rotary_dim=rotary_dim)
    np.testing.assert_array_equal(np.asarray(ours(x, positions)), textbook(x, positions))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(ours)(x, positions)), jax.jit(textbook)(x, positions)
    )
