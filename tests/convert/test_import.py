"""Hugging Face import: llava-hf parity with transformers, both key layouts, sharded
indexes, LLaMA + CLIP folders with a fresh projector, the CLI and its errors.

Axis letters: B batch, T length, M images per row, P image tokens, V vocab.
"""

import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from neva_jax import sharding
from neva_jax.convert import checkpoint, hf
from neva_jax.convert.__main__ import main

IMAGE, PATCH = 30, 6  # 25 patches per image
CORPUS = [
    "the cat sat on the mat",
    "a red square is left of a blue circle",
    "what colour is the shape",
    "there are two green triangles in the image",
] * 4


def _tokenizer(folder, *, llava: bool) -> transformers.PreTrainedTokenizerFast:
    """A tiny BPE tokenizer (48 tokens); llava-hf style adds <image> and <pad> after them."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=48, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if llava:
        fast.add_tokens(["<image>"], special_tokens=True)
        fast.add_special_tokens({"pad_token": "<pad>"})
    fast.save_pretrained(folder)
    return fast


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough to matter (std 0.1), norm scales near 1, random biases."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_scale else 0.1 * torch.randn_like(p))


def _vision_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
    )


def _text_config(vocab: int) -> transformers.LlamaConfig:
    """GQA: 4 query heads sharing 2 kv heads."""
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


LLAVA_CASES = {  # name: (projector_hidden_act, strategy, feature layer, projector bias)
    "mlp2x_gelu": ("gelu", "default", -2, True),
    "linear": ("linear", "full", -1, False),
}


def _batch(P: int, image_id: int, rng: np.random.Generator):
    """Row 0: one image; row 1: two images; row 2: text only. HF pixels [3, C, H, W]."""
    T = 2 * P + 10
    ids = rng.integers(3, 40, size=(3, T))
    ids[0, 4 : 4 + P] = image_id
    ids[1, 1 : 1 + P] = ids[1, 3 + P : 3 + 2 * P] = image_id
    pixels = rng.normal(size=(3, 3, IMAGE, IMAGE)).astype(np.float32)
    images = np.zeros((3, 2, IMAGE, IMAGE, 3), np.float32)  # ours: [B, M, H, W, C]
    images[0, 0], images[1, 0], images[1, 1] = pixels.transpose(0, 2, 3, 1)
    return ids, pixels, images


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """{case: (folder, ids, images, reference logits)} for tiny random llava-hf models."""
    out = {}
    for name, (act, strategy, layer, bias) in LLAVA_CASES.items():
        folder = tmp_path_factory.mktemp(f"llava_{name}")
        tok = _tokenizer(folder, llava=True)
        image_id = tok.convert_tokens_to_ids("<image>")
        config = transformers.LlavaConfig(
            vision_config=_vision_config(),
            text_config=_text_config(64),
            image_token_index=image_id,
            projector_hidden_act=act,
            vision_feature_select_strategy=strategy,
            vision_feature_layer=layer,
            multimodal_projector_bias=bias,
        )
        model = transformers.LlavaForConditionalGeneration(config).eval()
        _randomize(model, 0)
        model.save_pretrained(folder)
        transformers.CLIPImageProcessor(
            size={"shortest_edge": IMAGE}, crop_size=IMAGE
        ).save_pretrained(folder)
        P = 25 + (strategy == "full")
        ids, pixels, images = _batch(P, image_id, np.random.default_rng(1))
        with torch.no_grad():
            ref = model(
                input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)
            ).logits.numpy()
        out[name] = (folder, ids, images, ref)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, images):
    return nnx.merge(graphdef, state)(ids, images)


def _logits(model, ids, images) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(images)))


def _flat_params(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_logits_match_transformers(llava, case):
    folder, ids, images, ref = llava[case]
    imported = hf.import_llava(folder)
    assert imported.config.projector == case
    ours = _logits(imported.model, ids, images)
    diffs = np.abs(ours - ref).max(axis=(1, 2))
    print(
        f"llava {case}: max abs diff per row (1 image, 2 images, text) {diffs}, |logits| <= {np.abs(ref).max():.1f}"
    )
    assert diffs.max() <= 1e-4


def _write_shards(folder, tensors: dict, n: int = 2) -> None:
    """Saves `tensors` as n safetensors files plus model.safetensors.index.json."""
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        safetensors.numpy.save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return dst


def test_key_layouts_and_sharded_index_give_the_same_model(llava, tmp_path):
    folder = llava["mlp2x_gelu"][0]
    expected = _flat_params(hf.import_llava(folder).model)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    renames = {
        "newer": [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ],
        "older": [("vision_tower.", "vision_tower.vision_model.")],
    }
    for layout, pairs in renames.items():
        variant = _copy_without_weights(folder, tmp_path / layout)
        renamed = {}
        for key, value in tensors.items():
            for old, new in pairs:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            renamed[key] = value
        _write_shards(variant, renamed)
        got = _flat_params(hf.import_llava(variant).model)
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(
                np.asarray(got[path]), np.asarray(value), err_msg=f"{layout} {path}"
            )


def test_cli_import_then_load_model(llava, tmp_path):
    folder, ids, images, ref = llava["mlp2x_gelu"]
    out = tmp_path / "imported"
    assert main(["import-hf", str(folder), str(out)]) == 0
    model, info = checkpoint.load_model(out)
    assert info.kind == "model_folder" and info.config.image_token_id == int(ids[0, 4])
    assert info.preprocessor_config["crop_size"] == {"height": IMAGE, "width": IMAGE}
    tok = transformers.AutoTokenizer.from_pretrained(str(info.tokenizer_path))
    assert tok.convert_tokens_to_ids("<image>") == info.config.image_token_id
    assert info.config.tokenizer_vocab_size == len(tok)  # round-trips in model_config.json
    diff = float(np.abs(_logits(model, ids, images) - ref).max())
    print(f"llava via import-hf + load_model: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_llava_folder_loads_directly_onto_a_mesh(llava):
    """Parameters are placed shard by shard onto a 4x2 (data x tensor) mesh as they load."""
    folder, ids, images, ref = llava["mlp2x_gelu"]
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    model, info = checkpoint.load_model(folder, mesh=mesh)
    assert info.kind == "llava_hf" and info.tokenizer_path == folder
    specs = [
        (model.llm.layers.mlp.up.kernel, PartitionSpec(None, "fsdp", "tensor")),
        (model.llm.embed.embedding, PartitionSpec("tensor", "fsdp")),
        (model.vision.layers.attn.o.kernel, PartitionSpec(None, "tensor", None, "fsdp")),
        (model.projector.linear_2.kernel, PartitionSpec("tensor", "fsdp")),
    ]
    for param, spec in specs:
        assert param[...].sharding.spec == spec
    rows = NamedSharding(mesh, PartitionSpec("data"))
    batch = [np.concatenate([x, x[:1]]) for x in (ids, images)]  # 4 rows over data=4
    with jax.set_mesh(mesh):
        out = _forward(*nnx.split(model), *(jax.device_put(x, rows) for x in batch))
    diff = float(np.abs(np.asarray(out)[:3] - ref).max())
    print(f"llava loaded onto a 4x2 mesh: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_llm_and_clip_folders_give_a_stage1_start(tmp_path):
    llm_dir, clip_dir, out = tmp_path / "llama", tmp_path / "clip", tmp_path / "out"
    V0 = len(_tokenizer(llm_dir, llava=False))
    llm = transformers.LlamaForCausalLM(_text_config(V0)).eval()
    _randomize(llm, 1)
    llm.save_pretrained(llm_dir)
    vision = transformers.CLIPVisionModel(_vision_config()).eval()
    _randomize(vision, 2)
    vision.save_pretrained(clip_dir)
    argv = [
        "import-hf",
        "--llm",
        str(llm_dir),
        "--vision",
        str(clip_dir),
        "--projector",
        "linear",
        str(out),
    ]
    assert main(argv) == 0
    model, info = checkpoint.load_model(out)
    cfg = info.config
    tok = transformers.AutoTokenizer.from_pretrained(str(info.tokenizer_path))
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id == V0
    assert tok.pad_token == "<pad>" and cfg.llm.vocab_size == 64  # V0 + 2, padded to 64
    assert cfg.tokenizer_vocab_size == len(tok) == V0 + 2  # rows past it: masked padding
    assert (cfg.projector, cfg.vision.vision_select_layer, cfg.vision.class_token_length) == (
        "linear",
        -2,
        1,
    )
    params = _flat_params(model)
    hf_embed = llm.model.embed_tokens.weight.detach().numpy()
    embed = np.asarray(params[("llm", "embed", "embedding")])
    np.testing.assert_array_equal(embed[:V0], hf_embed)
    np.testing.assert_allclose(
        embed[V0:], np.broadcast_to(hf_embed.astype(np.float64).mean(0), (64 - V0, 32)), rtol=1e-6
    )
    head = np.asarray(params[("llm", "lm_head", "kernel")])
    np.testing.assert_array_equal(head[:, :V0], llm.lm_head.weight.detach().numpy().T)
    q0 = vision.encoder.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(params[("vision", "layers", "attn", "q", "kernel")])[1].reshape(24, 24), q0.T
    )
    patch = vision.embeddings.patch_embedding.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(params[("vision", "patch_embed", "kernel")]), patch.transpose(2, 3, 1, 0)
    )
    projector = {p for p in params if p[0] == "projector"}
    assert projector == {("projector", "linear_1", "kernel"), ("projector", "linear_1", "bias")}
    assert (
        np.abs(np.asarray(params[("projector", "linear_1", "kernel")])).min() > 0
    )  # freshly initialised
    ids = np.random.default_rng(3).integers(3, V0, size=(2, 12))
    with torch.no_grad():
        ref = llm(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(
        jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)(
            *nnx.split(model), jnp.asarray(ids)
        )
    )
    diff = float(np.abs(ours[..., :V0] - ref).max())
    print(f"LLaMA + CLIP import, text logits: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_tensor_is_a_one_line_error(llava, tmp_path):
    folder = llava["linear"][0]
    broken = _copy_without_weights(folder, tmp_path / "broken")
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, str(broken / "model.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "neva_jax.convert", "import-hf", str(broken), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "'language_model.model.layers.1.mlp.up_proj.weight'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_other_import_errors(llava, tmp_path, capsys):
    folder = llava["mlp2x_gelu"][0]
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    extra = _copy_without_weights(folder, tmp_path / "extra")
    safetensors.numpy.save_file(
        {**tensors, "language_model.model.layers.0.extra": np.zeros(2, np.float32)},
        str(extra / "model.safetensors"),
    )
    assert "unexpected tensor 'language_model.model.layers.0.extra'" in _error(
        ["import-hf", str(extra), str(tmp_path / "o1")], capsys
    )

    wrong = _copy_without_weights(folder, tmp_path / "wrong")
    shutil.copy(folder / "model.safetensors", wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (wrong / "config.json").write_text(json.dumps(config))
    assert "gate_proj.weight' has shape (64, 32)" in _error(
        ["import-hf", str(wrong), str(tmp_path / "o2")], capsys
    )

    # An interrupted download: the file ends inside a tensor (it was a reshape error).
    cut = _copy_without_weights(folder, tmp_path / "cut")
    whole = (folder / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[: len(whole) - 100])
    message = _error(["import-hf", str(cut), str(tmp_path / "o6")], capsys)
    assert f"{cut / 'model.safetensors'}: truncated or damaged (tensor " in message
    (cut / "model.safetensors").write_bytes(whole[:4])
    message = _error(["import-hf", str(cut), str(tmp_path / "o7")], capsys)
    assert "model.safetensors: truncated or not a safetensors file (4 bytes)" in message

    pickled = _copy_without_weights(folder, tmp_path / "pickled")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pickled / "pytorch_model.bin")
    message = _error(["import-hf", str(pickled), str(tmp_path / "o3")], capsys)
    assert "pytorch_model.bin" in message and "safe_serialization=True" in message

    assert "--vision" in _error(["import-hf", "--llm", str(folder), str(tmp_path / "o4")], capsys)
    # Flags of the --llm/--vision form are not silently ignored in the SRC OUT form.
    message = _error(
        ["import-hf", str(folder), str(tmp_path / "o5"), "--projector", "linear"], capsys
    )
    assert "import-hf --projector: only with --llm/--vision" in message


def test_help_explains_both_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["import-hf", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert (
        "import-hf SRC OUT" in text
        and "--llm LLAMA_DIR --vision CLIP_DIR" in text
        and "mlp2x_gelu" in text
    )
