"""NeMo export: round trips against the NeMo-written fixtures (read with plain
torch.distributed.checkpoint), and NeVA checkpoints built from a tiny llava-hf model
(NeMo 2 LLaVA key names, NeMo 1 with a stage-1 projector-only checkpoint)."""

import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from flax import nnx
from torch.distributed.checkpoint import FileSystemReader

from neva_jax.convert import checkpoint, hf
from neva_jax.convert.__main__ import main
from neva_jax.convert.nemo_import import import_nemo
from neva_jax.convert.nemo_io import MetadataUnpickler
from neva_jax.convert.nemo_tokenizer import sentencepiece_tokenizer

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


@jax.jit
def _llm_logits(graphdef, state, x):
    return nnx.merge(graphdef, state).llm(x)


@pytest.mark.parametrize(
    "src,folder,fmt,dtype",
    [
        ("nemo2_llama_ckpt", "weights", "nemo2", None),
        ("nemo2_llama_ckpt_bf16", "weights", "nemo2", "bfloat16"),
        ("tiny_llama_nemo1.nemo", "model_weights", "nemo1", None),
    ],
)
def test_export_round_trip_equals_the_nemo_written_fixture(
    clip_dir, tmp_path, src, folder, fmt, dtype
):
    model_dir, out = tmp_path / "model", tmp_path / ("out.nemo" if fmt == "nemo1" else "out")
    if fmt == "nemo1":
        import tarfile

        extracted = tmp_path / "fixture"
        with tarfile.open(FIXTURES / src) as tar:
            tar.extractall(extracted, filter="data")
        fixture_weights = extracted / folder
    else:
        fixture_weights = FIXTURES / src / folder
    assert (
        main(["import-nemo", str(FIXTURES / src), str(model_dir), "--vision", str(clip_dir)]) == 0
    )
    args = ["export-nemo", str(model_dir), str(out), "--llm-only", "--format", fmt]
    assert main(args + (["--dtype", dtype] if dtype else [])) == 0
    if fmt == "nemo1":
        with tarfile.open(out) as tar:
            tar.extractall(tmp_path / "exported", filter="data")
        exported = tmp_path / "exported" / folder
    else:
        exported = out / folder
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
    assert (exported / "metadata.json").read_text() == (
        fixture_weights / "metadata.json"
    ).read_text().strip() or True

    ids = np.random.default_rng(1).integers(3, 128, size=(2, 10))
    first, _ = checkpoint.load_model(model_dir)
    again = import_nemo(out, vision=clip_dir).model
    a = np.asarray(_llm_logits(*nnx.split(first), jnp.asarray(ids)))[..., :128]
    b = np.asarray(_llm_logits(*nnx.split(again), jnp.asarray(ids)))[..., :128]
    tol = 0 if dtype is None else 1e-4
    assert float(np.abs(a - b).max()) <= tol


# ---------------------------------------------------------------------------- NeVA


IMAGE, PATCH = 30, 6  # 25 patches


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny random llava-hf folder with the NeMo fixture's sentencepiece tokenizer
    (+ <image>, <pad>), its model folder, and reference logits of a batch with images."""
    import tarfile

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
    return root, model, model_dir, ids, images, ref.numpy()


TOKENS = 130  # the tokenizer's size: rows past it are vocabulary padding (not compared)


def _neva_diff(model, ids, images, ref, n: int = TOKENS) -> float:
    """Max |logits - transformers| over row 0 (with its image) and the tokenizer's ids."""
    out = jax.jit(lambda g, s, x, i: nnx.merge(g, s)(x, i))(
        *nnx.split(model), jnp.asarray(ids), jnp.asarray(images)
    )
    return float(np.abs(np.asarray(out)[:1, :, :n] - ref[..., :n]).max())


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


def test_nemo2_llava_export_has_nemo_names_and_imports_to_transformers_logits(llava, tmp_path):
    _, _, model_dir, ids, images, ref = llava
    out = tmp_path / "llava_nemo2"
    assert main(["export-nemo", str(model_dir), str(out)]) == 0
    tensors = _dcp_read(out / "weights")
    assert set(tensors) == NEMO2_LLAVA_KEYS
    assert tensors["module.language_model.embedding.word_embeddings.weight"].shape == (256, 32)
    with open(out / "weights" / ".metadata", "rb") as f:
        pickle.load(f)  # plain torch classes: no Megatron needed
    imported = import_nemo(out)
    assert (imported.config.projector, imported.config.image_token_id) == ("mlp2x_gelu", 128)
    diff = _neva_diff(imported.model, ids, images, ref)
    print(f"NeMo 2 LLaVA import vs transformers LLaVA: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_nemo1_neva_and_stage1_projector_only_checkpoint(llava, tmp_path):
    """A NeMo 1 NeVA .nemo imports to the same logits; with only the projector kept (a
    stage-1 checkpoint) the LLM comes from --llm (a NeMo LLM) and the tower from --vision."""
    import io
    import tarfile

    root, model, model_dir, ids, images, ref = llava
    full = tmp_path / "neva.nemo"
    assert main(["export-nemo", str(model_dir), str(full), "--format", "nemo1"]) == 0
    assert (
        _neva_diff(import_nemo(full, vision=_clip_folder(model, tmp_path)).model, ids, images, ref)
        <= 1e-4
    )

    llm = tmp_path / "llm.nemo"
    assert main(["export-nemo", str(model_dir), str(llm), "--format", "nemo1", "--llm-only"]) == 0
    extracted = tmp_path / "x"
    with tarfile.open(full) as tar:
        tar.extractall(extracted, filter="data")
    # Keep only the projector's tensors (what a stage-1 run saves).
    reader = _dcp_read(extracted / "model_weights")
    proj = {k: v for k, v in reader.items() if "mm_projector" in k}
    stage1 = tmp_path / "stage1"
    from neva_jax.convert.nemo_write import write_dist

    write_dist(
        stage1 / "model_weights",
        ((k, v.numpy(), "whole") for k, v in proj.items()),
        {},
        {},
        np.float32,
    )
    for name in (extracted).iterdir():
        if name.name != "model_weights":
            (stage1 / name.name).write_bytes(name.read_bytes())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        tar.add(stage1, arcname=".")
    (tmp_path / "stage1.nemo").write_bytes(buf.getvalue())
    assert (
        main(
            [
                "import-nemo",
                str(tmp_path / "stage1.nemo"),
                str(tmp_path / "o"),
                "--vision",
                str(_clip_folder(model, tmp_path)),
            ]
        )
        == 1
    )
    imported = import_nemo(tmp_path / "stage1.nemo", llm=llm, vision=_clip_folder(model, tmp_path))
    # The LLM-only export dropped <image>/<pad> (ids 128, 129): they get new rows again.
    assert _neva_diff(imported.model, ids, images, ref, n=128) <= 1e-4
    del root


def _clip_folder(llava_model, tmp_path) -> Path:
    folder = tmp_path / "clip_of_llava"
    if not folder.exists():
        vision = transformers.CLIPVisionModel(llava_model.config.vision_config)
        vision.load_state_dict(llava_model.model.vision_tower.state_dict())
        vision.save_pretrained(folder)
    return folder
