"""NeMo import: the NeMo-written fixtures against transformers, tensor-parallel / legacy /
O2 / gzip / zarr layouts built by NeMo's rules, placement on a mesh, and bad input."""

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
import yaml
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec

from neva_jax import sharding
from neva_jax.convert import checkpoint
from neva_jax.convert.__main__ import main
from neva_jax.convert.nemo_import import import_nemo
from neva_jax.convert.nemo_io import DistCheckpoint, Source

FIXTURES = Path(__file__).parent / "nemo_fixtures"
V = 128  # the fixtures' vocabulary
CASES = {  # name: (NeMo checkpoint, Hugging Face source)
    "nemo2": ("nemo2_llama_ckpt", "tiny_llama_hf"),
    "nemo2_bf16": ("nemo2_llama_ckpt_bf16", "tiny_llama_hf_bf16"),
    "nemo1": ("tiny_llama_nemo1.nemo", "tiny_llama_hf"),
}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, V, size=(2, 12))


@pytest.fixture(scope="module")
def reference(ids):
    """{hf folder: transformers fp32 logits} (bf16 weights are upcast exactly)."""
    out = {}
    for hf_dir in ("tiny_llama_hf", "tiny_llama_hf_bf16"):
        model = transformers.LlamaForCausalLM.from_pretrained(
            FIXTURES / hf_dir, dtype=torch.float32
        )
        with torch.no_grad():
            out[hf_dir] = model.eval()(torch.from_numpy(ids)).logits.numpy()
    return out


@jax.jit
def _llm_logits(graphdef, state, x):
    return nnx.merge(graphdef, state).llm(x)


def _logits(model, ids) -> np.ndarray:
    return np.asarray(_llm_logits(*nnx.split(model), jnp.asarray(ids)))[..., :V]


def _greedy(step, ids: np.ndarray, n: int = 6) -> np.ndarray:
    for _ in range(n):
        ids = np.concatenate([ids, step(ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids[:, -n:]


def _flat(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model.llm, nnx.Param)))


@pytest.fixture(scope="module")
def imported(clip_dir):
    return {name: import_nemo(FIXTURES / src, vision=clip_dir) for name, (src, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_fixture_logits_and_greedy_tokens_match_transformers(imported, reference, ids, case):
    hf_dir = CASES[case][1]
    model = imported[case].model
    diff = float(np.abs(_logits(model, ids) - reference[hf_dir]).max())
    print(f"{case}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    hf_model = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / hf_dir, dtype=torch.float32)

    def hf_step(x):
        with torch.no_grad():
            return hf_model.eval()(torch.from_numpy(x)).logits.numpy()

    ours = _greedy(lambda x: _logits(model, x), ids[:, :6])
    theirs = _greedy(hf_step, ids[:, :6])
    np.testing.assert_array_equal(ours, theirs)


def test_bf16_checkpoint_keeps_its_weights_bit_exact(clip_dir, reference, ids):
    """bf16 stored weights import into bf16 parameters without any rounding (the bound is
    0 on the weights); computed in fp32 the logits then match transformers within 1e-4."""
    model = import_nemo(
        FIXTURES / "nemo2_llama_ckpt_bf16", vision=clip_dir, param_dtype="bfloat16"
    ).model
    hf = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "tiny_llama_hf_bf16")
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    ours = np.asarray(model.llm.layers.attn.q.kernel[...])[1]
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.astype(np.float32).reshape(64, 64), q.T)
    model32 = nnx.merge(*nnx.split(model))
    state = jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model32))
    nnx.update(model32, state)
    diff = float(
        np.abs(
            np.asarray(_llm_logits(*nnx.split(model32), jnp.asarray(ids)))[..., :V]
            - reference["tiny_llama_hf_bf16"]
        ).max()
    )
    assert diff <= 1e-4


def test_cli_import_writes_a_model_folder_with_the_sentencepiece_tokenizer(
    clip_dir, tmp_path, ids, reference
):
    import sentencepiece

    out = tmp_path / "m"
    assert (
        main(
            [
                "import-nemo",
                str(FIXTURES / "tiny_llama_nemo1.nemo"),
                str(out),
                "--vision",
                str(clip_dir),
            ]
        )
        == 0
    )
    model, info = checkpoint.load_model(out)
    assert float(np.abs(_logits(model, ids) - reference["tiny_llama_hf"]).max()) <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(str(info.tokenizer_path))
    with tarfile.open(FIXTURES / "tiny_llama_nemo1.nemo") as tar:
        name = next(n for n in tar.getnames() if n.endswith("tiny_sp.model"))
        sp = sentencepiece.SentencePieceProcessor(model_proto=tar.extractfile(name).read())
    for text in ["abc fgh ij", "ba cab gif dea je", "hij  cd"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.convert_tokens_to_ids("<image>") == info.config.image_token_id == V
    assert (out / "tokenizer" / "tokenizer.model").exists()


# ---------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def nemo1_tensors():
    """The NeMo 1 fixture as {mcore key with layer number: fp32 array} plus its config."""
    with Source(FIXTURES / "tiny_llama_nemo1.nemo") as src:
        dist = DistCheckpoint(src, "model_weights")
        cfg = yaml.safe_load(src.read_bytes("model_config.yaml"))
        tok = next(n for n in src.list("") if n.endswith(".model"))
        sp = src.read_bytes(tok)
        out = {}
        for key in dist.tensors:
            value = dist.read(key)
            name = key.removeprefix("model.")
            if name.startswith("decoder.layers."):
                for i in range(value.shape[0]):
                    out[f"decoder.layers.{i}.{name[len('decoder.layers.') :]}"] = value[i]
            else:
                out[name] = value
    return out, cfg, tok, sp


def _write_nemo(
    path: Path, cfg: dict, tok: str, sp: bytes, files: dict[str, bytes], gz=False
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, blob in {
            "model_config.yaml": yaml.safe_dump(cfg).encode(),
            tok: sp,
            **files,
        }.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = gzip.compress(buf.getvalue()) if gz else buf.getvalue()
    path.write_bytes(data)
    return path


def _pt(sd: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, buf)
    return buf.getvalue()


def _tp_split(tensors: dict, tp: int, F: int, V_pad: int) -> list[dict]:
    """NeMo's rules (megatron_change_num_partitions): column-parallel on dim 0 (qkv whole
    groups; fc1 each rank's cat(gate_r, up_r); vocab padded then split), row-parallel on
    dim 1, norms replicated."""
    ranks = [{} for _ in range(tp)]
    for key, w in tensors.items():
        if key.endswith("linear_fc1.weight"):
            gate, up = np.split(w, 2)
            parts = [
                np.concatenate(p) for p in zip(np.split(gate, tp), np.split(up, tp), strict=True)
            ]
        elif key.endswith("linear_qkv.weight"):
            parts = np.split(w, tp)
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            parts = np.split(w, tp, axis=1)
        elif key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            padded = np.concatenate([w, np.full((V_pad - w.shape[0], w.shape[1]), 7.0, w.dtype)])
            parts = np.split(padded, tp)
        else:
            parts = [w] * tp
        for r in range(tp):
            ranks[r]["model." + key] = parts[r]
    del F
    return ranks


LEGACY = [
    ("decoder.layers.", "language_model.encoder.layers."),
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
    ("self_attention.linear_qkv.weight", "self_attention.query_key_value.weight"),
    ("self_attention.linear_proj.weight", "self_attention.dense.weight"),
    ("mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight"),
    ("mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight"),
    ("decoder.final_layernorm.", "language_model.encoder.final_layernorm."),
    ("embedding.word_embeddings.", "language_model.embedding.word_embeddings."),
    ("output_layer.", "language_model.output_layer."),
]


def _legacy(key: str) -> str:
    for old, new in LEGACY:
        key = key.replace(old, new)
    return key


def test_tp2_legacy_o2_gzip_and_zarr_layouts_import_to_the_same_model(
    nemo1_tensors, imported, clip_dir, tmp_path
):
    tensors, cfg, tok, sp = nemo1_tensors
    expected = _flat(imported["nemo1"].model)
    tp_cfg = {**cfg, "tensor_model_parallel_size": 2}
    ranks = _tp_split(tensors, 2, 128, 256)
    assert ranks[0]["model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 64)
    assert ranks[1]["model.embedding.word_embeddings.weight"].shape == (128, 64)  # padded 256 / 2
    files = {f"mp_rank_{r:02d}/model_weights.ckpt": _pt(sd) for r, sd in enumerate(ranks)}
    legacy = {"model." + _legacy(k): v for k, v in tensors.items()}
    o2 = {"model.module." + k: v for k, v in tensors.items()}
    zarr = _zarr_files(tensors)
    variants = {
        "tp2": _write_nemo(tmp_path / "tp2.nemo", tp_cfg, tok, sp, files),
        "tp2_gzip": _write_nemo(tmp_path / "tp2_gz.nemo", tp_cfg, tok, sp, files, gz=True),
        "legacy": _write_nemo(
            tmp_path / "legacy.nemo",
            {**cfg, "mcore_gpt": False},
            tok,
            sp,
            {"model_weights.ckpt": _pt(legacy)},
        ),
        "o2": _write_nemo(
            tmp_path / "o2.nemo",
            {**cfg, "megatron_amp_O2": True},
            tok,
            sp,
            {"model_weights.ckpt": _pt(o2)},
        ),
        "zarr": _write_nemo(tmp_path / "zarr.nemo", cfg, tok, sp, zarr),
    }
    for name, path in variants.items():
        got = _flat(import_nemo(path, vision=clip_dir).model)
        assert got.keys() == expected.keys(), name
        for k, v in expected.items():
            v = np.asarray(v)
            if name == "zarr" and k[1] in ("attn_norm", "mlp_norm"):  # stored bfloat16
                v = v.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{name} {k}")


def _zarr_files(tensors: dict) -> dict[str, bytes]:
    """A zarr-backend dist checkpoint (zarr v2 arrays, uncompressed, one chunk per layer;
    norms stored bfloat16 as Megatron names it)."""
    files = {
        "model_weights/metadata.json": json.dumps(
            {"sharded_backend": "zarr", "sharded_backend_version": 1}
        ).encode()
    }
    stacked: dict[str, list] = {}
    for key, v in tensors.items():
        if key.startswith("decoder.layers."):
            i, rest = key[len("decoder.layers.") :].split(".", 1)
            stacked.setdefault(f"decoder.layers.{rest}", []).append((int(i), v))
        else:
            stacked[key] = [(None, v)]
    for key, items in stacked.items():
        name = "model." + key
        bf16 = "layer_norm" in key
        if items[0][0] is None:
            arr, chunks = items[0][1], items[0][1].shape
        else:
            arr = np.stack([v for _, v in sorted(items, key=lambda t: t[0])])
            chunks = (1, *arr.shape[1:])
        dtype = "bfloat16" if bf16 else "<f4"
        arr = arr.astype(ml_dtypes.bfloat16 if bf16 else np.float32)
        meta = {
            "zarr_format": 2,
            "shape": list(arr.shape),
            "chunks": list(chunks),
            "dtype": dtype,
            "compressor": None,
            "fill_value": None,
            "order": "C",
            "filters": None,
        }
        files[f"model_weights/{name}/.zarray"] = json.dumps(meta).encode()
        for grid in np.ndindex(*[s // c for s, c in zip(arr.shape, chunks, strict=True)]):
            part = arr[tuple(slice(g * c, (g + 1) * c) for g, c in zip(grid, chunks, strict=True))]
            files[f"model_weights/{name}/{'.'.join(map(str, grid))}"] = part.tobytes()
    return files


def test_import_places_weights_on_a_mesh(clip_dir, reference, ids):
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    model = import_nemo(FIXTURES / "nemo2_llama_ckpt", vision=clip_dir, mesh=mesh).model
    assert model.llm.layers.mlp.up.kernel[...].sharding.spec == PartitionSpec(
        None, "fsdp", "tensor"
    )
    assert model.llm.embed.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    with jax.set_mesh(mesh):
        out = np.asarray(_llm_logits(*nnx.split(model), jnp.asarray(np.concatenate([ids, ids]))))
    assert float(np.abs(out[:2, :, :V] - reference["tiny_llama_hf"]).max()) <= 1e-4


# ---------------------------------------------------------------------------- bad input


def _cli_error(args: list[str], out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "neva_jax.convert", "import-nemo", *args, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert not out.exists()
    return lines[0]


def test_bad_input_gives_one_line_errors_and_writes_nothing(nemo1_tensors, clip_dir, tmp_path):
    tensors, cfg, tok, sp = nemo1_tensors
    data = (FIXTURES / "tiny_llama_nemo1.nemo").read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    vision = ["--vision", str(clip_dir)]
    assert "truncated" in _cli_error([str(tmp_path / "cut.nemo"), *vision], tmp_path / "o1")

    missing = {
        "model." + k: v for k, v in tensors.items() if k != "decoder.layers.1.mlp.linear_fc2.weight"
    }
    _write_nemo(tmp_path / "missing.nemo", cfg, tok, sp, {"model_weights.ckpt": _pt(missing)})
    msg = _cli_error([str(tmp_path / "missing.nemo"), *vision], tmp_path / "o2")
    assert "missing tensor 'decoder.layers.1.mlp.linear_fc2.weight'" in msg

    full = {"model." + k: v for k, v in tensors.items()}
    _write_nemo(
        tmp_path / "shape.nemo",
        {**cfg, "ffn_hidden_size": 96},
        tok,
        sp,
        {"model_weights.ckpt": _pt(full)},
    )
    msg = _cli_error([str(tmp_path / "shape.nemo"), *vision], tmp_path / "o3")
    assert "'model.decoder.layers.0.mlp.linear_fc1.weight' has shape (256, 64)" in msg
    assert "model_config.yaml implies (192, 64)" in msg

    pickled = io.BytesIO()
    torch.save({**{k: torch.from_numpy(v) for k, v in full.items()}, "x": Path("/")}, pickled)
    _write_nemo(tmp_path / "pickle.nemo", cfg, tok, sp, {"model_weights.ckpt": pickled.getvalue()})
    assert "--allow-pickle" in _cli_error([str(tmp_path / "pickle.nemo"), *vision], tmp_path / "o4")


def test_help_names_the_formats_and_the_pickle_risk(capsys):
    with pytest.raises(SystemExit):
        main(["import-nemo", "--help"])
    text = capsys.readouterr().out
    assert (
        "mp_rank_XX" in text and "--allow-pickle" in text and "can" in text and "run code" in text
    )
