"""NeMo export: round trips against the NeMo-written fixtures (read with plain
torch.distributed.checkpoint), and NeVA checkpoints built from a tiny llava-hf model
(NeMo 2 LLaVA key names and its `mcore_mlp` projector form, NeMo 1 NeVA, a stage-1
projector-only checkpoint completed by --llm as a NeMo LLM or a Hugging Face folder)."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
import yaml
from flax import nnx
from torch.distributed.checkpoint import FileSystemReader

from neva_jax.convert import checkpoint, hf
from neva_jax.convert.__main__ import main
from neva_jax.convert.nemo_dist import MetadataUnpickler
from neva_jax.convert.nemo_import import import_nemo
from neva_jax.convert.nemo_io import NemoError
from neva_jax.convert.nemo_tokenizer import sentencepiece_tokenizer
from neva_jax.convert.nemo_write import WHOLE, write_dist

FIXTURES = Path(__file__).parent / "nemo_fixtures"
SP_MODEL = "tiny_sp.model"


class _NemoMetadataReader(FileSystemReader):
    """FileSystemReader for NeMo's own `.metadata` (a pickled Megatron subclass)."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            return MetadataUnpickler(f).load()


def _dcp_read(folder: Path, reader_cls=FileSystemReader) -> dict:
    """Every tensor of a dist checkpoint, read by torch.distributed.checkpoint alone."""
    reader = reader_cls(str(folder))
    md = reader.read_metadata()
    state = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in md.state_dict_metadata.items()
        if hasattr(m, "size")
    }
    dcp.load(state, storage_reader=reader_cls(str(folder)), no_dist=True)
    return state


def _untar(path: Path, dest: Path) -> Path:
    with tarfile.open(path) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.mark.parametrize(
    "case,src,folder,dtype",
    [
        ("nemo2", "nemo2_llama_ckpt", "weights", None),
        ("nemo2_bf16", "nemo2_llama_ckpt_bf16", "weights", "bfloat16"),
        ("nemo1", "tiny_llama_nemo1.nemo", "model_weights", None),
    ],
)
def test_export_round_trip_equals_the_nemo_written_fixture(
    nemo_model_dirs, nemo_imported, llm_logits, clip_dir, tmp_path, case, src, folder, dtype
):
    fmt = "nemo1" if case == "nemo1" else "nemo2"
    out = tmp_path / ("out.nemo" if fmt == "nemo1" else "out")
    if fmt == "nemo1":
        fixture_weights = _untar(FIXTURES / src, tmp_path / "fixture") / folder
    else:
        fixture_weights = FIXTURES / src / folder
    args = ["export-nemo", str(nemo_model_dirs[case]), str(out), "--llm-only", "--format", fmt]
    assert main(args + (["--dtype", dtype] if dtype else [])) == 0
    exported = (_untar(out, tmp_path / "exported") if fmt == "nemo1" else out) / folder
    theirs = _dcp_read(fixture_weights, _NemoMetadataReader)
    ours = _dcp_read(exported)  # our .metadata is torch's own Metadata: plain reader
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    md_theirs = _NemoMetadataReader(str(fixture_weights)).read_metadata().state_dict_metadata
    md_ours = FileSystemReader(str(exported)).read_metadata().state_dict_metadata
    assert md_ours.keys() == md_theirs.keys()  # `_extra_state` byte entries included
    for key, m in md_theirs.items():
        if hasattr(m, "chunks"):
            assert [(c.offsets, c.sizes) for c in md_ours[key].chunks] == [
                (c.offsets, c.sizes) for c in m.chunks
            ], key
    assert torch.load(exported / "common.pt", weights_only=True) is not None
    metadata = [json.loads((f / "metadata.json").read_text()) for f in (exported, fixture_weights)]
    assert metadata[0] == metadata[1]

    # The export imports back to the same model: identical logits (bf16 weights of a bf16
    # checkpoint go out and come back unrounded).
    ids = np.random.default_rng(1).integers(3, 128, size=(2, 12))
    again = import_nemo(out, vision=clip_dir).model
    first = nemo_imported[case].model
    assert float(np.abs(llm_logits(first, ids) - llm_logits(again, ids)).max()) == 0


# ---------------------------------------------------------------------------- NeVA


IMAGE, PATCH = 30, 6  # 25 patches
TOKENS = 130  # the tokenizer's size: rows past it are vocabulary padding (not compared)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny random llava-hf model with the NeMo fixture's sentencepiece tokenizer
    (+ <image>, <pad>), its model folder, a batch with an image and transformers' logits."""
    root = tmp_path_factory.mktemp("llava")
    with tarfile.open(FIXTURES / "tiny_llama_nemo1.nemo") as tar:
        name = next(n for n in tar.getnames() if n.endswith(SP_MODEL))
        (root / SP_MODEL).write_bytes(tar.extractfile(name).read())
    tok = sentencepiece_tokenizer(root / SP_MODEL)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 128
    tok.add_special_tokens({"pad_token": "<pad>"})  # 129
    hf_dir = root / "hf"
    tok.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes((root / SP_MODEL).read_bytes())
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE,
            patch_size=PATCH,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=192,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
        image_token_index=128,
        projector_hidden_act="gelu",
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)
    model_dir = root / "model"
    imported = hf.import_llava(hf_dir)
    checkpoint.save_model(model_dir, imported.model, tokenizer=imported.tokenizer)
    (model_dir / "tokenizer" / "tokenizer.model").write_bytes((root / SP_MODEL).read_bytes())
    clip = root / "clip"  # the tower alone, for imports of checkpoints that hold none
    vision = transformers.CLIPVisionModel(config.vision_config)
    vision.load_state_dict(model.model.vision_tower.state_dict())
    vision.save_pretrained(clip)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 120, size=(2, 35))
    ids[0, 2:27] = 128
    pixels = rng.normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids[:1]), pixel_values=torch.from_numpy(pixels[:1])
        ).logits
    images = np.zeros((2, 1, IMAGE, IMAGE, 3), np.float32)
    images[0, 0] = pixels[0].transpose(1, 2, 0)
    return dict(
        model=model, model_dir=model_dir, clip=clip, ids=ids, images=images, ref=ref.numpy()
    )


@jax.jit
def _neva_logits(graphdef, state, ids, images):
    return nnx.merge(graphdef, state)(ids, images)


def _neva_diff(model, llava: dict, n: int = TOKENS) -> float:
    """Max |logits - transformers| over row 0 (with its image) and the first n ids."""
    out = np.asarray(_neva_logits(*nnx.split(model), llava["ids"], llava["images"]))
    return float(np.abs(out[:1, :, :n] - llava["ref"][..., :n]).max())


NEMO2_LLAVA_KEYS = {
    "module.language_model.embedding.word_embeddings.weight",
    "module.language_model.decoder.layers.self_attention.linear_qkv.weight",
    "module.language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "module.language_model.decoder.layers.self_attention.linear_proj.weight",
    "module.language_model.decoder.layers.mlp.linear_fc1.weight",
    "module.language_model.decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "module.language_model.decoder.layers.mlp.linear_fc2.weight",
    "module.language_model.decoder.final_layernorm.weight",
    "module.language_model.output_layer.weight",
    "module.vision_projection.0.weight",
    "module.vision_projection.0.bias",
    "module.vision_projection.2.weight",
    "module.vision_projection.2.bias",
    "module.vision_model.vision_model.embeddings.patch_embedding.weight",
    "module.vision_model.vision_model.embeddings.class_embedding",
    "module.vision_model.vision_model.embeddings.position_embedding.weight",
    "module.vision_model.vision_model.pre_layrnorm.weight",
    "module.vision_model.vision_model.pre_layrnorm.bias",
    "module.vision_model.vision_model.post_layernorm.weight",
    "module.vision_model.vision_model.post_layernorm.bias",
} | {
    f"module.vision_model.vision_model.encoder.layers.{i}.{m}.{p}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
        "layer_norm1",
        "layer_norm2",
    )
    for p in ("weight", "bias")
}


@pytest.fixture(scope="module")
def nemo2_llava(llava, tmp_path_factory):
    """The llava model exported as a NeMo 2 LLaVA folder, and its tensors."""
    out = tmp_path_factory.mktemp("nemo2_llava") / "ckpt"
    assert main(["export-nemo", str(llava["model_dir"]), str(out)]) == 0
    return out, _dcp_read(out / "weights")


def test_nemo2_llava_export_has_nemo_names_and_imports_to_transformers_logits(llava, nemo2_llava):
    out, tensors = nemo2_llava
    assert set(tensors) == NEMO2_LLAVA_KEYS
    assert tensors["module.language_model.embedding.word_embeddings.weight"].shape == (256, 32)
    with open(out / "weights" / ".metadata", "rb") as f:
        pickle.load(f)  # plain torch classes: no Megatron needed
    imported = import_nemo(out)
    assert (imported.config.projector, imported.config.image_token_id) == ("mlp2x_gelu", 128)
    diff = _neva_diff(imported.model, llava)
    print(f"NeMo 2 LLaVA import vs transformers LLaVA: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_nemo2_llava_mcore_mlp_projector(llava, nemo2_llava, tmp_path):
    """`projector_type: mcore_mlp` stores the projector as Megatron's MLP
    (`vision_projection.encoder.linear_fc{1,2}`): it imports as mlp2x_gelu; another
    activation is a one-line error."""
    src, tensors = nemo2_llava
    names = {
        "module.vision_projection.0.": "module.vision_projection.encoder.linear_fc1.",
        "module.vision_projection.2.": "module.vision_projection.encoder.linear_fc2.",
    }

    def rename(key: str) -> str:
        for old, new in names.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    dst = tmp_path / "mcore_mlp"
    write_dist(
        dst / "weights",
        ((rename(k), v.numpy(), WHOLE) for k, v in tensors.items()),
        {},
        {},
        np.float32,
    )
    assert "module.vision_projection.encoder.linear_fc2.bias" in _dcp_read(dst / "weights")
    context = dst / "context"
    context.mkdir()
    for path in (src / "context").rglob("*"):
        if path.is_file():
            (context / path.relative_to(src / "context")).parent.mkdir(parents=True, exist_ok=True)
            (context / path.relative_to(src / "context")).write_bytes(path.read_bytes())
    cfg = yaml.safe_load((context / "model.yaml").read_text())
    cfg["config"]["vision_projection_config"]["projector_type"] = "mcore_mlp"
    (context / "model.yaml").write_text(yaml.safe_dump(cfg))
    imported = import_nemo(dst)
    assert imported.config.projector == "mlp2x_gelu"
    np.testing.assert_array_equal(
        np.asarray(imported.model.projector.linear_2.kernel[...]),
        tensors["module.vision_projection.2.weight"].numpy().T,
    )
    assert _neva_diff(imported.model, llava) <= 1e-4
    cfg["config"]["vision_projection_config"]["activation_func"] = {
        "_target_": "megatron.core.activations.quick_gelu",
        "_call_": False,
    }
    (context / "model.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(NemoError, match="mcore_mlp projector with activation_func="):
        import_nemo(dst)


@pytest.fixture(scope="module")
def nemo1_neva(llava, tmp_path_factory):
    """NeMo 1 exports of the llava model: the NeVA .nemo, an LLM-only .nemo, and a stage-1
    .nemo holding the projector alone (what a stage-1 run saves)."""
    root = tmp_path_factory.mktemp("nemo1_neva")
    model_dir = str(llava["model_dir"])
    full, llm = root / "neva.nemo", root / "llm.nemo"
    assert main(["export-nemo", model_dir, str(full), "--format", "nemo1"]) == 0
    assert main(["export-nemo", model_dir, str(llm), "--format", "nemo1", "--llm-only"]) == 0
    extracted = _untar(full, root / "x")
    proj = {k: v for k, v in _dcp_read(extracted / "model_weights").items() if "mm_projector" in k}
    stage1 = root / "stage1"
    write_dist(
        stage1 / "model_weights",
        ((k, v.numpy(), WHOLE) for k, v in proj.items()),
        {},
        {},
        np.float32,
    )
    for path in extracted.iterdir():
        if path.name != "model_weights":
            (stage1 / path.name).write_bytes(path.read_bytes())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        tar.add(stage1, arcname=".")
    (root / "stage1.nemo").write_bytes(buf.getvalue())
    return dict(full=full, llm=llm, stage1=root / "stage1.nemo", root=root)


def test_nemo1_neva_imports_to_transformers_logits(llava, nemo1_neva):
    assert _neva_diff(import_nemo(nemo1_neva["full"], vision=llava["clip"]).model, llava) <= 1e-4


def test_stage1_checkpoint_takes_its_llm_from_a_nemo_checkpoint(llava, nemo1_neva, capsys):
    stage1, out = nemo1_neva["stage1"], nemo1_neva["root"] / "o"
    assert main(["import-nemo", str(stage1), str(out), "--vision", str(llava["clip"])]) == 1
    assert "pass --llm" in capsys.readouterr().err
    imported = import_nemo(stage1, llm=nemo1_neva["llm"], vision=llava["clip"])
    # The LLM-only export dropped <image>/<pad> (ids 128, 129): they get new rows again.
    assert _neva_diff(imported.model, llava, n=128) <= 1e-4


def test_stage1_checkpoint_takes_its_llm_from_a_hugging_face_llama_folder(
    llava, nemo1_neva, tmp_path
):
    """--llm as a Hugging Face LLaMA folder: its weights, the checkpoint's tokenizer and
    projector; every row of the tokenizer (<image> and <pad> included) is the folder's."""
    model = llava["model"]
    llama = transformers.LlamaForCausalLM(model.config.text_config)
    llama.model.load_state_dict(model.model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    llama.save_pretrained(tmp_path / "llama")
    imported = import_nemo(nemo1_neva["stage1"], llm=tmp_path / "llama", vision=llava["clip"])
    assert imported.config.image_token_id == 128 and imported.config.llm.vocab_size == 192
    assert _neva_diff(imported.model, llava) <= 1e-4


def test_rope_scaling_does_not_export_to_nemo():
    """NeMo's configs have no place for Llama 3.1's RoPE scaling: refused, not dropped."""
    from neva_jax.convert import nemo_config
    from neva_jax.convert.nemo_io import NemoError
    from neva_jax.model import llama

    cfg = llama.tiny(rope_type="llama3")
    for export in (
        nemo_config.llm_to_nemo1,
        lambda c: nemo_config.llm_to_nemo2(c, vocab_size=512, dtype="float32"),
    ):
        with pytest.raises(NemoError, match="rope_type='llama3': RoPE scaling does not export"):
            export(cfg)


@pytest.mark.parametrize(
    "template,conv,model_type",
    [
        ("vicuna_v1", "v1", "v1"),
        ("llava_llama_2", "llama_2", "llama_2"),
        ("nvgpt", "nvgpt", "nvgpt"),
        ("plain", "plain", "llama_2"),
        (None, None, "llama_2"),
    ],
)
def test_nemo1_config_names_the_trained_template(llava, template, conv, model_type):
    """A training checkpoint's data.template becomes NeMo 1's data.conv_template and
    mm_cfg.llm.model_type (NeMo selects its prompt format with them)."""
    from neva_jax.convert.nemo_export import _nemo1_config

    _, info = checkpoint.load_model(llava["model_dir"])
    out = _nemo1_config(info.config, 64, "float32", False, "tok.model", [], template)
    assert out["mm_cfg"]["llm"]["model_type"] == model_type
    assert out.get("data", {}).get("conv_template") == conv


def test_nemo1_conversation_round_trips_through_the_model_folder(llava, tmp_path, capsys):
    """A model folder's template and image aspect mode become NeMo 1's data.conv_template,
    mm_cfg.llm.model_type and data.image_aspect_ratio; import-nemo writes them back into
    the new folder's conversation.json. An unresolved `${...}` conv_template falls back
    to the model type (NeMo's default), a name we have no template for gives none, and
    the import flags win."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(llava["model_dir"], folder)
    conversation = {"template": "llava_llama_2", "image_aspect_ratio": "pad"}
    (folder / "conversation.json").write_text(json.dumps(conversation))
    nemo = tmp_path / "neva.nemo"
    assert main(["export-nemo", str(folder), str(nemo), "--format", "nemo1"]) == 0
    extracted = _untar(nemo, tmp_path / "x")
    cfg = yaml.safe_load((extracted / "model_config.yaml").read_text())
    assert cfg["data"] == {"conv_template": "llama_2", "image_aspect_ratio": "pad"}
    assert cfg["mm_cfg"]["llm"]["model_type"] == "llama_2"

    back = tmp_path / "back"
    assert main(["import-nemo", str(nemo), str(back), "--vision", str(llava["clip"])]) == 0
    assert "template llava_llama_2, images pad (" in capsys.readouterr().out
    assert json.loads((back / "conversation.json").read_text()) == conversation
    _, info = checkpoint.load_model(back)
    assert (info.template, info.image_aspect_ratio) == ("llava_llama_2", "pad")

    flags = ["--template", "vicuna_v1", "--image-aspect", "square"]
    out = tmp_path / "flags"
    assert main(["import-nemo", str(nemo), str(out), "--vision", str(llava["clip"]), *flags]) == 0
    want = {"template": "vicuna_v1", "image_aspect_ratio": "square"}
    assert json.loads((out / "conversation.json").read_text()) == want

    for conv, model_type, template in [
        ("${model.mm_cfg.llm.model_type}", "nvgpt", "nvgpt"),
        (None, "v1", "vicuna_v1"),
        ("plain", "llama_2", "plain"),
        ("yi_34b", "llama_2", None),
    ]:
        cfg["data"] = {"image_aspect_ratio": "anyres"}  # not a NeMo NeVA 1 mode we know
        if conv is not None:
            cfg["data"]["conv_template"] = conv
        cfg["mm_cfg"]["llm"]["model_type"] = model_type
        (extracted / "model_config.yaml").write_text(yaml.safe_dump(cfg))
        imported = import_nemo(extracted, vision=llava["clip"])
        assert (imported.template, imported.image_aspect_ratio) == (template, None), conv
