"""LoRA against Hugging Face PEFT: import, logits, one AdamW step, export, generation.

A PEFT adapter (random non-zero A and B) on the tiny llava-hf model at transformers'
default init, for LLaVA's targets (every linear of the LLM but lm_head, the projector
trained fully) and NeMo's default (`attention_qkv`), imported with `import-hf --adapter`.
(At the 10x init of `llava_std_dir` the logits reach ~7 and two fp32 forms of the same
model, e.g. PEFT's unmerged and merged ones in torch, already differ by ~8e-6.)
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from neva_jax import platform
from neva_jax.convert import __main__ as convert_cli
from neva_jax.convert import checkpoint, hf, hf_export, hf_peft
from neva_jax.eval import generate as gen_lib
from neva_jax.model import lora
from neva_jax.model.neva import Neva
from neva_jax.run_config import TrainSection
from neva_jax.train import optimizer as opt_lib
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

P, IMAGE_ID, PAD_ID, EOS_ID = 16, 4, 3, 2
LM_ONLY = r".*language_model.*\.({})"
TARGETS = {  # name -> (LoraConfig kwargs, the PEFT module names)
    "llava": (dict(r=8, lora_alpha=16), lora.HF_NAMES.values()),
    "nemo_qkv": (dict(r=4, lora_alpha=4), ("q_proj", "k_proj", "v_proj")),
}
LR, PROJECTOR_LR = 1e-3, 2e-4


def _inputs():
    rng = np.random.default_rng(0)
    ids = np.array(
        [[1, *[IMAGE_ID] * P, 10, 20, 30, 40, 50], [1, *[IMAGE_ID] * P, 60, 70, 80, 90, 100]]
    )
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    return ids, pixels


def _torch_images(pixels):
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module", params=sorted(TARGETS))
def adapter(request, llava_std_dir, tmp_path_factory):
    """(name, PEFT model, adapter folder, imported neva-jax model)."""
    import peft
    from transformers import LlavaForConditionalGeneration

    kwargs, names = TARGETS[request.param]
    torch.manual_seed(1)
    base = LlavaForConditionalGeneration.from_pretrained(llava_std_dir).eval()
    config = peft.LoraConfig(
        target_modules=LM_ONLY.format("|".join(names)),
        modules_to_save=["multi_modal_projector"],
        lora_dropout=0.0,
        **kwargs,
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init: make the adapters do something
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp(f"peft_{request.param}")
    model.save_pretrained(out)
    # This backend's run-time choices, as `checkpoint.load_model` makes them.
    imported = hf.import_llava(llava_std_dir, adapter=out, **platform.resolve_runtime())
    return request.param, model, out, imported


def _logits(model, ids, pixels):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)[:, None]))


def test_import_config_and_logits_match_peft(adapter):
    name, peft_model, _, imported = adapter
    kwargs, names = TARGETS[name]
    cfg = imported.config.peft
    assert cfg.enabled and cfg.rank == kwargs["r"] and cfg.scale == kwargs["lora_alpha"] / cfg.rank
    assert {lora.HF_NAMES[p] for p in cfg.projections} == set(names)
    ids, pixels = _inputs()
    with torch.no_grad():
        want = peft_model(input_ids=torch.from_numpy(ids), pixel_values=_torch_images(pixels))
    got = _logits(imported.model, ids, pixels)
    np.testing.assert_allclose(got, want.logits.numpy(), rtol=0, atol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=torch.from_numpy(ids), pixel_values=_torch_images(pixels))
    assert np.abs(got - base.logits.numpy()).max() > 1e-2  # the adapters matter


def _batch(ids, pixels, labels):
    """Our batch (docs/CONTRACTS.md) for transformers' `labels` (-100 = not trained)."""
    B, T = ids.shape
    mask = np.zeros((B, T), np.float32)
    mask[:, :-1] = labels[:, 1:] != -100
    return {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "targets": jnp.asarray(np.concatenate([ids[:, 1:], np.zeros((B, 1), int)], 1), jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        "images": jnp.asarray(pixels)[:, None],
    }


def test_one_adamw_step_matches_peft(adapter, llava_std_dir):
    """Same weights and batch, one AdamW step: the adapters, and the projector at its
    own learning rate (a torch parameter group / `train.projector_lr`)."""
    import peft
    from transformers import LlavaForConditionalGeneration

    _, _, folder, _ = adapter
    # As the trainer builds it on this backend (CPU: row-major weight gradients).
    imported = hf.import_llava(llava_std_dir, adapter=folder, **platform.resolve_runtime())
    assert imported.config.llm.row_major_weight_grads
    ids, pixels = _inputs()
    labels = ids.copy()
    labels[:, : 1 + P] = -100  # the text after the image trains
    base = LlavaForConditionalGeneration.from_pretrained(llava_std_dir)
    theirs = peft.PeftModel.from_pretrained(base, folder, is_trainable=True).train()
    named = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "multi_modal_projector" not in n], "lr": LR},
        {"params": [p for n, p in named if "multi_modal_projector" in n], "lr": PROJECTOR_LR},
    ]
    torch_opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    out = theirs(
        input_ids=torch.from_numpy(ids),
        pixel_values=_torch_images(pixels),
        labels=torch.from_numpy(labels),
    )
    out.loss.backward()
    torch_opt.step()
    after = {n: p.detach().numpy() for n, p in named}

    train = TrainSection(lr=LR, projector_lr=PROJECTOR_LR, warmup_steps=0, steps=100, grad_clip=0.0)
    tx = opt_lib.make_optimizer(train)
    parts = ("projector", lora.ADAPTER)
    graphdef, state = state_lib.create(imported.model, parts, tx)
    step = jax.jit(
        step_lib.make_train_step(
            graphdef, tx, opt_lib.learning_rate_schedule(train), trained_parts=parts
        )
    )
    new, metrics = step(state, _batch(ids, pixels, labels))
    np.testing.assert_allclose(float(metrics["loss"]), float(out.loss.detach()), rtol=0, atol=1e-5)
    assert float(metrics["learning_rate"]) == pytest.approx(LR)

    layers = new.params["llm"]["layers"]
    cfg = imported.config
    compared = 0
    for key, value in hf_peft.adapter_tensors(new.params, cfg):
        theirs_key = key.replace(hf_peft.PEFT_PREFIX, "base_model.model.").replace(
            ".weight", ".default.weight"
        )
        np.testing.assert_allclose(value, after[theirs_key], rtol=0, atol=1e-5, err_msg=key)
        compared += 1
    assert compared == 2 * cfg.llm.num_layers * len(cfg.peft.projections)
    assert set(layers) <= {"attn", "mlp"}  # only adapters train in the LLM
    for i in (1, 2):
        kernel = np.asarray(new.params["projector"][f"linear_{i}"]["kernel"])
        w = after[
            f"base_model.model.model.multi_modal_projector.modules_to_save.default.linear_{i}.weight"
        ]
        np.testing.assert_allclose(kernel, w.T, rtol=0, atol=1e-5)
        before = np.asarray(state.params["projector"][f"linear_{i}"]["kernel"])
        # the first Adam step moves each weight by about its group's lr
        assert np.median(np.abs(kernel - before)) == pytest.approx(PROJECTOR_LR, rel=0.05)


def test_merged_and_adapter_only_exports(adapter, llava_std_dir, tmp_path):
    """export-hf merges (reloads in transformers equal our unmerged forward within 1e-5);
    --adapter-only writes PEFT's layout, which PEFT loads onto the base: same logits;
    export-nemo merges too (imported back: the same logits)."""
    import peft
    from transformers import LlavaForConditionalGeneration

    _, _, folder, imported = adapter
    model_dir = tmp_path / "model"
    checkpoint.save_model(model_dir, imported.model, tokenizer=imported.tokenizer)
    ids, pixels = _inputs()
    ours = _logits(imported.model, ids, pixels)
    inputs = dict(input_ids=torch.from_numpy(ids), pixel_values=_torch_images(pixels))

    merged = tmp_path / "merged"
    hf_export.export_hf(model_dir, merged)
    with torch.no_grad():
        got = LlavaForConditionalGeneration.from_pretrained(merged).eval()(**inputs).logits
    np.testing.assert_allclose(got.numpy(), ours, rtol=0, atol=1e-5)

    only = tmp_path / "adapter"
    assert convert_cli.main(["export-hf", str(model_dir), str(only), "--adapter-only"]) == 0
    base = LlavaForConditionalGeneration.from_pretrained(llava_std_dir).eval()
    reloaded = peft.PeftModel.from_pretrained(base, only).eval()
    with torch.no_grad():
        got = reloaded(**inputs).logits
    np.testing.assert_allclose(got.numpy(), ours, rtol=0, atol=1e-5)
    from safetensors.numpy import load_file

    written = load_file(str(only / hf_peft.ADAPTER_WEIGHTS))
    original = load_file(str(folder / hf_peft.ADAPTER_WEIGHTS))
    assert sorted(written) == sorted(original)  # PEFT's own key names

    # NeMo's NeVA has no adapters: export-nemo folds them in, as export-hf does.
    from neva_jax.convert.nemo_import import import_nemo

    nemo = tmp_path / "nemo2"
    assert convert_cli.main(["export-nemo", str(model_dir), str(nemo)]) == 0
    back = import_nemo(nemo).model
    n = back.config.tokenizer_vocab_size  # the tokenizer's ids; NeMo pads the rest with 0
    assert 0 < n < ours.shape[-1]
    np.testing.assert_allclose(_logits(back, ids, pixels)[..., :n], ours[..., :n], atol=1e-5)


@pytest.mark.parametrize("adapter", ["llava"], indirect=True)
def test_import_cli_and_refusals(adapter, llava_std_dir, tmp_path):
    _, peft_model, folder, imported = adapter
    out = tmp_path / "imported"
    assert (
        convert_cli.main(["import-hf", str(llava_std_dir), str(out), "--adapter", str(folder)]) == 0
    )
    model, info = checkpoint.load_model(out)
    assert info.config.peft == imported.config.peft
    ids, pixels = _inputs()
    np.testing.assert_array_equal(_logits(model, ids, pixels), _logits(imported.model, ids, pixels))
    # a LoRA setting neva-jax cannot express is refused with its name
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / hf_peft.ADAPTER_CONFIG).write_text(
        (folder / hf_peft.ADAPTER_CONFIG)
        .read_text()
        .replace('"use_dora": false', '"use_dora": true')
    )
    (bad / hf_peft.ADAPTER_WEIGHTS).write_bytes((folder / hf_peft.ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(hf.HFImportError, match="use_dora"):
        hf.import_llava(llava_std_dir, adapter=bad)
    # LoRA variants whose tensors look like plain LoRA's (aLoRA acts only after its
    # invocation tokens) and an option set to 0 (which equals False) are refused too.
    base_config = json.loads((folder / hf_peft.ADAPTER_CONFIG).read_text())
    for name, value in (("alora_invocation_tokens", [30, 40]), ("layers_to_transform", 0)):
        (bad / hf_peft.ADAPTER_CONFIG).write_text(json.dumps({**base_config, name: value}))
        with pytest.raises(hf.HFImportError, match=re.escape(f"{name}={value!r} is not")):
            hf.import_llava(llava_std_dir, adapter=bad)
    # Values PEFT's own loader would choke on: one line naming the file and the value.
    no_rank = {k: v for k, v in base_config.items() if k != "r"}
    for config, expected in (
        (no_rank, "r=None"),
        ({**base_config, "lora_alpha": None}, "lora_alpha=None"),
    ):
        (bad / hf_peft.ADAPTER_CONFIG).write_text(json.dumps(config))
        with pytest.raises(hf.HFImportError, match=re.escape(f"adapter_config.json: {expected};")):
            hf.import_llava(llava_std_dir, adapter=bad)
    # A pickled adapter (adapter_model.bin) is refused with the conversion for an adapter,
    # and the conversion it prints makes the folder import.
    pickled = tmp_path / "pickled"
    peft_model.save_pretrained(pickled, safe_serialization=False)
    assert not (pickled / hf_peft.ADAPTER_WEIGHTS).exists()
    with pytest.raises(hf.HFImportError, match=re.escape("(adapter_model.bin)")) as e:
        hf.import_llava(llava_std_dir, adapter=pickled)
    exec(str(e.value).split("Convert once in Python (PEFT reads either file): ")[1])
    again = hf.import_llava(llava_std_dir, adapter=pickled, **platform.resolve_runtime())
    np.testing.assert_array_equal(_logits(again.model, ids, pixels), _logits(model, ids, pixels))
    # A plain list of module names also puts adapters on the vision tower's q/v: refused,
    # with the regex that keeps them on the language model.
    import peft
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(llava_std_dir)
    listed = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    listed.save_pretrained(tmp_path / "listed")
    with pytest.raises(hf.HFImportError, match=r"vision_tower.*has no place.*language_model"):
        hf.import_llava(llava_std_dir, adapter=tmp_path / "listed")
    # A regex that covers some layers only: refused by the option, not by a missing tensor.
    some = peft.LoraConfig(r=4, target_modules=r".*language_model.*layers\.1\.self_attn\.q_proj")
    base = LlavaForConditionalGeneration.from_pretrained(llava_std_dir)
    peft.get_peft_model(base, some).save_pretrained(tmp_path / "some")
    with pytest.raises(
        hf.HFImportError, match=r"q_proj has adapters on 1 of the \d+ layers \(layers 1;"
    ):
        hf.import_llava(llava_std_dir, adapter=tmp_path / "some")


@pytest.mark.parametrize("adapter", ["llava"], indirect=True)
def test_generation_unmerged_equals_merged(adapter):
    """Greedy tokens of the LoRA model: per-layer decode (adapters folded into the fused
    kernels), stacked decode (adapters run as they are) and the merged model agree."""
    _, _, _, imported = adapter
    rng = np.random.default_rng(0)
    prompts = [
        [1, *[IMAGE_ID] * P, *rng.integers(5, 480, 3).tolist()],
        [1, *[IMAGE_ID] * P, *rng.integers(5, 480, 9).tolist()],
    ]
    pixels = rng.normal(size=(2, 1, 32, 32, 3)).astype(np.float32)
    kw = dict(max_new_tokens=16, eos_ids=[EOS_ID], pad_id=PAD_ID)
    from flax import nnx

    cfg = imported.config
    plain_cfg = dataclasses.replace(cfg, peft=lora.PeftConfig())
    with nnx.use_eager_sharding(False):
        merged = nnx.eval_shape(lambda: Neva(plain_cfg, rngs=nnx.Rngs(0)))
    params = lora.merge_params(nnx.to_pure_dict(nnx.state(imported.model, nnx.Param)), cfg.peft)
    state = nnx.state(merged, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(merged, state)
    want = gen_lib.generate_tokens(merged, prompts, pixels, **kw).token_ids
    for per_layer in (True, False):
        got = gen_lib.generate_tokens(
            imported.model, prompts, pixels, per_layer_weights=per_layer, **kw
        )
        assert got.token_ids == want, per_layer
    assert any(len(t) > 4 for t in want)
