"""NeMo import: the NeMo-written fixtures against transformers, tensor/pipeline-parallel,
legacy, O2, gzip and zarr layouts built by NeMo's rules, NeVA media-token rows,
placement on a mesh, and bad input."""

import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

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
from neva_jax.convert.nemo_dist import DistCheckpoint
from neva_jax.convert.nemo_import import import_nemo
from neva_jax.convert.nemo_io import Source

FIXTURES = Path(__file__).parent / "nemo_fixtures"
V = 128  # the fixtures' vocabulary
HF_SOURCE = {"nemo2": "tiny_llama_hf", "nemo2_bf16": "tiny_llama_hf_bf16", "nemo1": "tiny_llama_hf"}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, V, size=(2, 12))


@pytest.fixture(scope="module")
def hf_models():
    """{hf folder: transformers LLaMA in fp32} (bf16 weights are upcast exactly)."""
    return {
        name: transformers.LlamaForCausalLM.from_pretrained(
            FIXTURES / name, dtype=torch.float32
        ).eval()
        for name in ("tiny_llama_hf", "tiny_llama_hf_bf16")
    }


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.fixture(scope="module")
def reference(hf_models, ids):
    """{hf folder: transformers fp32 logits of `ids`}."""
    return {name: _hf_logits(model, ids) for name, model in hf_models.items()}


def _greedy(step, prompt: np.ndarray, n: int = 6) -> np.ndarray:
    """n greedy tokens after `prompt`, decoded in one fixed-length buffer (causal: the
    empty slots after a position never change its logits), so ours compiles once."""
    b, t = prompt.shape
    buf = np.zeros((b, t + n), prompt.dtype)
    buf[:, :t] = prompt
    for i in range(t, t + n):
        buf[:, i] = step(buf)[:, i - 1].argmax(-1)
    return buf[:, t:]


def _flat(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model.llm, nnx.Param)))


@pytest.mark.parametrize("case", list(HF_SOURCE))
def test_fixture_logits_and_greedy_tokens_match_transformers(
    nemo_imported, hf_models, reference, ids, llm_logits, case
):
    hf_dir = HF_SOURCE[case]
    model = nemo_imported[case].model
    diff = float(np.abs(llm_logits(model, ids) - reference[hf_dir]).max())
    print(f"{case}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    prompt = ids[:, :6]  # + 6 new tokens: the shape of `ids`, compiled already
    ours = _greedy(lambda x: llm_logits(model, x), prompt)
    theirs = _greedy(lambda x: _hf_logits(hf_models[hf_dir], x), prompt)
    np.testing.assert_array_equal(ours, theirs)


def test_bf16_checkpoint_keeps_its_weights_bit_exact(clip_dir, nemo_imported):
    """bf16 stored weights import into bf16 parameters without any rounding (the bound is
    0 on the weights): upcast, they are exactly the fp32-parameter import of the same
    checkpoint, whose logits match transformers within 1e-4 (test above)."""
    model = import_nemo(
        FIXTURES / "nemo2_llama_ckpt_bf16", vision=clip_dir, param_dtype="bfloat16"
    ).model
    hf = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "tiny_llama_hf_bf16")
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    ours = np.asarray(model.llm.layers.attn.q.kernel[...])[1]
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.astype(np.float32).reshape(64, 64), q.T)
    fp32 = _flat(nemo_imported["nemo2_bf16"].model)
    bf16 = _flat(model)
    assert bf16.keys() == fp32.keys()
    for key, value in bf16.items():
        value = np.asarray(value)
        assert value.dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(value.astype(np.float32), np.asarray(fp32[key]), key)


def test_cli_import_writes_a_model_folder_with_the_sentencepiece_tokenizer(
    nemo_model_dirs, nemo_imported
):
    import sentencepiece

    out = nemo_model_dirs["nemo1"]  # written by `import-nemo tiny_llama_nemo1.nemo`
    model, info = checkpoint.load_model(out)
    expected = _flat(nemo_imported["nemo1"].model)  # logits: the fixture test above
    for key, value in _flat(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[key]), key)
    tok = transformers.AutoTokenizer.from_pretrained(str(info.tokenizer_path))
    with tarfile.open(FIXTURES / "tiny_llama_nemo1.nemo") as tar:
        name = next(n for n in tar.getnames() if n.endswith("tiny_sp.model"))
        sp = sentencepiece.SentencePieceProcessor(model_proto=tar.extractfile(name).read())
    for text in ["abc fgh ij", "ba cab gif dea je", "hij  cd"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.convert_tokens_to_ids("<image>") == info.config.image_token_id == V
    assert (out / "tokenizer" / "tokenizer.model").exists()


# ---------------------------------------------------------------------------- tokenizer

SPECIAL = ["<extra_id_3>", "<image>"]


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    """{name: sentencepiece model file}: NeMo's artifact in the NeMo 1 fixture (BPE) and
    models trained here with the other options NeMo tokenizers use."""
    import sentencepiece

    root = tmp_path_factory.mktemp("sp")
    with tarfile.open(FIXTURES / "tiny_llama_nemo1.nemo") as tar:
        name = next(n for n in tar.getnames() if n.endswith("tiny_sp.model"))
        (root / "nemo_fixture.model").write_bytes(tar.extractfile(name).read())
    rng = np.random.default_rng(4)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(300)]
    words += ["Über", "naïve", "café", "2024", "snow", "☃", "x-ray"]
    corpus = [" ".join(rng.choice(words, 8)) for _ in range(400)] + ["tab\tand\nnew  lines"]
    (root / "corpus.txt").write_text("\n".join(corpus))
    options = {
        "unigram": dict(model_type="unigram", vocab_size=60),
        "bpe_byte_fallback": dict(model_type="bpe", vocab_size=300, byte_fallback=True),
        "bpe_no_dummy_prefix_keep_spaces": dict(
            model_type="bpe", vocab_size=60, add_dummy_prefix=False, remove_extra_whitespaces=False
        ),
    }
    for name, kw in options.items():
        sentencepiece.SentencePieceTrainer.train(
            input=str(root / "corpus.txt"),
            model_prefix=str(root / name),
            character_coverage=0.98,
            num_threads=1,
            minloglevel=2,
            **kw,
        )
    return {name: root / f"{name}.model" for name in ["nemo_fixture", *options]}


def _nemo_encode(sp, tok, text: str) -> list[int]:
    """NeMo's SentencePieceTokenizer with additional special tokens (legacy mode): the
    text is cut at each special token and every piece encoded by sentencepiece."""
    ids = []
    while hits := [(text.index(s), s) for s in SPECIAL if s in text]:
        at, special = min(hits)
        ids += [*sp.encode(text[:at]), tok.convert_tokens_to_ids(special)]
        text = text[at + len(special) :]
    return ids + sp.encode(text)


def test_flags_that_do_not_apply_are_refused(clip_dir, tmp_path, capsys):
    """--llm names the LLM of a stage-1 checkpoint; one that holds its own is refused,
    not silently ignored. A --tokenizer that is not a folder is named."""
    src = str(FIXTURES / "nemo2_llama_ckpt")
    out = str(tmp_path / "out")
    assert main(["import-nemo", src, out, "--vision", str(clip_dir), "--llm", src]) == 1
    assert "holds its own LLM weights; --llm is for a stage-1" in capsys.readouterr().err
    assert main(["import-nemo", src, out, "--tokenizer", str(tmp_path / "nope")]) == 1
    assert "--tokenizer " in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["nemo_fixture", "unigram", "bpe_byte_fallback", "bpe_no_dummy_prefix_keep_spaces"]
)
def test_sentencepiece_tokenizer_encodes_as_nemo_does(sp_models, name):
    """transformers' generic conversion of the model (what import-nemo uses) gives NeMo's
    ids on text with tabs, newlines, repeated spaces, characters outside the vocabulary,
    Unicode that sentencepiece normalizes, and NeMo's special tokens."""
    import sentencepiece

    from neva_jax.convert.nemo_tokenizer import sentencepiece_tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_models[name]))
    tok = sentencepiece_tokenizer(sp_models[name], SPECIAL)
    assert len(tok) == sp.get_piece_size() + 2
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL] == [len(tok) - 2, len(tok) - 1]
    rng = np.random.default_rng(5)
    alphabet = [*"abcdefghij ABCXYZ019.,!?äéü☃\t\n\u3000ＡＢ①", "  ", "alpha", " beta", *SPECIAL]
    texts = ["", " ", "  a  b  ", "\tTab\nnew line", "ab<image>cd <extra_id_3> ef"]
    texts += ["".join(rng.choice(alphabet, rng.integers(1, 25))) for _ in range(300)]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == _nemo_encode(sp, tok, text), text
    assert tok("abc").input_ids[0] == sp.bos_id() == tok.bos_token_id


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


def _tp_split(tensors: dict, tp: int, V_pad: int) -> list[dict]:
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
    return ranks


def _pp_split(tensors: dict, pp: int, num_layers: int) -> list[dict]:
    """NeMo's pipeline stages: stage p holds layers [p L/PP, (p+1) L/PP) numbered from 0,
    the embedding sits on the first stage, the final norm and output layer on the last."""
    per_stage = num_layers // pp
    stages = [{} for _ in range(pp)]
    for key, w in tensors.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", key)
        if m:
            i = int(m.group(1))
            stages[i // per_stage][f"decoder.layers.{i % per_stage}.{m.group(2)}"] = w
        elif key.startswith("embedding."):
            stages[0][key] = w
        else:
            stages[-1][key] = w
    return stages


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


def _layout_files(layout: str, tensors: dict, cfg: dict) -> tuple[dict, dict[str, bytes]]:
    """(model_config.yaml, weight files) of the NeMo 1 fixture re-written as `layout`."""
    if layout == "tp2_gzip":  # mp_rank_XX: TP=2, padded vocab, per-rank fc1
        ranks = _tp_split(tensors, 2, 256)
        assert ranks[0]["model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 64)
        assert ranks[1]["model.embedding.word_embeddings.weight"].shape == (128, 64)  # 256 / 2
        files = {f"mp_rank_{r:02d}/model_weights.ckpt": _pt(sd) for r, sd in enumerate(ranks)}
        return {**cfg, "tensor_model_parallel_size": 2}, files
    if layout == "tp2_pp2":  # tp_rank_XX_pp_rank_YYY: each stage split by the TP rules
        files = {}
        for p, stage in enumerate(_pp_split(tensors, 2, cfg["num_layers"])):
            assert sum(k.startswith("decoder.layers.0.") for k in stage) == 6
            for r, sd in enumerate(_tp_split(stage, 2, 256)):
                files[f"tp_rank_{r:02d}_pp_rank_{p:03d}/model_weights.ckpt"] = _pt(sd)
        return {
            **cfg,
            "tensor_model_parallel_size": 2,
            "pipeline_model_parallel_size": 2,
        }, files
    if layout == "legacy_o2":  # non-mcore names under the O2 `model.module.` prefix
        legacy = {"model.module." + _legacy(k): v for k, v in tensors.items()}
        assert "model.module.language_model.encoder.layers.1.mlp.dense_4h_to_h.weight" in legacy
        cfg = {**cfg, "mcore_gpt": False, "megatron_amp_O2": True}
        return cfg, {"model_weights.ckpt": _pt(legacy)}
    assert layout == "zarr"
    return cfg, _zarr_files(tensors)


@pytest.mark.parametrize("layout", ["tp2_gzip", "tp2_pp2", "legacy_o2", "zarr"])
def test_layouts_import_to_the_same_model(nemo1_tensors, nemo_imported, clip_dir, tmp_path, layout):
    tensors, cfg, tok, sp = nemo1_tensors
    expected = _flat(nemo_imported["nemo1"].model)
    layout_cfg, files = _layout_files(layout, tensors, cfg)
    path = _write_nemo(tmp_path / "x.nemo", layout_cfg, tok, sp, files, gz=layout == "tp2_gzip")
    got = _flat(import_nemo(path, vision=clip_dir).model)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        v = np.asarray(v)
        if layout == "zarr" and k[1] in ("attn_norm", "mlp_norm"):  # stored bfloat16
            v = v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{layout} {k}")


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


def test_neva_media_token_rows_become_image_and_im_start_end(
    nemo1_tensors, clip_dir, tmp_path, capsys
):
    """A NeMo 1 NeVA with `use_im_start_end` whose tokenizer appends NeMo's media tokens
    <extra_id_3/4/5>: <image>, <im_start>, <im_end> join the tokenizer and their
    embedding and output rows are copies of the media tokens' trained rows."""
    tensors, cfg, tok, sp = nemo1_tensors
    rng = np.random.default_rng(3)
    weights = dict(tensors)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded to 256
        weights[key] = np.concatenate([tensors[key], rng.normal(size=(128, 64))]).astype("f4")
    adapter = "embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."
    weights[adapter + "weight"] = rng.normal(size=(64, 24)).astype(np.float32)
    weights[adapter + "bias"] = rng.normal(size=(64,)).astype(np.float32)
    media = ["<extra_id_3>", "<extra_id_4>", "<extra_id_5>"]
    neva_cfg = {
        **cfg,
        "tokenizer": {**cfg["tokenizer"], "additional_special_tokens": media},
        "mm_cfg": {
            "llm": {"from_pretrained": None, "model_type": "llama_2"},
            "vision_encoder": {"from_pretrained": None, "from_hf": True, "hidden_size": 24},
            "mm_mlp_adapter_type": "linear",
            "use_im_start_end": True,
        },
    }
    files = {"model_weights.ckpt": _pt({"model." + k: v for k, v in weights.items()})}
    imported = import_nemo(
        _write_nemo(tmp_path / "neva.nemo", neva_cfg, tok, sp, files), vision=clip_dir
    )
    vocab = imported.tokenizer.get_vocab()
    assert [vocab[t] for t in media] == [128, 129, 130]
    new = [vocab[t] for t in ("<image>", "<im_start>", "<im_end>")]
    assert new == [131, 132, 133] and imported.config.image_token_id == 131
    assert imported.config.use_im_start_end and imported.config.projector == "linear"
    emb = np.asarray(imported.model.llm.embed.embedding[...])
    head = np.asarray(imported.model.llm.lm_head.kernel[...])
    stored_emb = weights["embedding.word_embeddings.weight"]
    stored_out = weights["output_layer.weight"]
    assert emb.shape == (192, 64)  # 135 tokens (<pad> too), rounded up to 64
    np.testing.assert_array_equal(emb[:131], stored_emb[:131])
    np.testing.assert_array_equal(emb[new], stored_emb[[128, 129, 130]])
    np.testing.assert_array_equal(head[:, new], stored_out[[128, 129, 130]].T)
    # <pad> and the rows past the tokenizer: the mean of the real rows, never NeMo's padding.
    mean = stored_emb[:131].astype(np.float64).mean(0).astype(np.float32)
    np.testing.assert_array_equal(emb[134:], np.broadcast_to(mean, (192 - 134, 64)))
    np.testing.assert_array_equal(
        np.asarray(imported.model.projector.linear_1.kernel[...]), weights[adapter + "weight"].T
    )
    # Exports that cannot hold <im_start>/<im_end> refuse it and leave nothing behind:
    # llava-hf (its refusal came after the weights were written, which stayed as
    # .OUT.partial) and NeMo 2 (which wrote the model without the option).
    folder = checkpoint.save_model(tmp_path / "model", imported.model, tokenizer=imported.tokenizer)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["export-hf", str(folder), str(tmp_path / "hf")]) == 1
    assert "use_im_start_end models have no llava-hf equivalent" in capsys.readouterr().err
    assert main(["export-nemo", str(folder), str(tmp_path / "nemo2")]) == 1
    assert "no NeMo 2 LLaVA equivalent; export with --format nemo1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_import_places_weights_on_a_mesh(clip_dir, nemo_imported):
    """Each parameter is built on its shards; gathered, it is exactly the unsharded
    import's (whose logits match transformers)."""
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    model = import_nemo(FIXTURES / "nemo2_llama_ckpt", vision=clip_dir, mesh=mesh).model
    up = model.llm.layers.mlp.up.kernel[...]
    assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in up.addressable_shards} == {(2, 64, 64)}  # F = 128 over 2
    assert model.llm.embed.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    expected = _flat(nemo_imported["nemo2"].model)
    got = _flat(model)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.sharding.mesh == mesh, key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[key]), key)


# ---------------------------------------------------------------------------- bad input


def test_truncated_tar_exits_1_with_one_line_and_writes_nothing(clip_dir, tmp_path):
    """The command-line contract, in a real process: exit status 1, one line on stderr,
    nothing written to OUT (the other bad inputs run `main` in process)."""
    data = (FIXTURES / "tiny_llama_nemo1.nemo").read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "neva_jax.convert",
            "import-nemo",
            str(tmp_path / "cut.nemo"),
            str(out),
            "--vision",
            str(clip_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "truncated" in lines[0]
    assert not out.exists()


def _bad_checkpoint(kind: str, tensors: dict, cfg: dict) -> tuple[dict, bytes]:
    full = {"model." + k: v for k, v in tensors.items()}
    if kind == "missing_tensor":
        del full["model.decoder.layers.1.mlp.linear_fc2.weight"]
        return cfg, _pt(full)
    if kind == "shape_mismatch":
        return {**cfg, "ffn_hidden_size": 96}, _pt(full)
    pickled = io.BytesIO()  # a state dict holding a non-tensor object
    torch.save({**{k: torch.from_numpy(v) for k, v in full.items()}, "x": Path("/")}, pickled)
    return cfg, pickled.getvalue()


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing_tensor", "missing tensor 'decoder.layers.1.mlp.linear_fc2.weight'"),
        (
            "shape_mismatch",
            "'model.decoder.layers.0.mlp.linear_fc1.weight' has shape (256, 64), "
            "model_config.yaml implies (192, 64)",
        ),
        ("pickled_objects", "rerun with --allow-pickle"),
    ],
)
def test_bad_input_gives_one_line_errors_and_writes_nothing(
    nemo1_tensors, clip_dir, tmp_path, capsys, kind, message
):
    tensors, cfg, tok, sp = nemo1_tensors
    bad_cfg, blob = _bad_checkpoint(kind, tensors, cfg)
    src = _write_nemo(tmp_path / "bad.nemo", bad_cfg, tok, sp, {"model_weights.ckpt": blob})
    out = tmp_path / "out"
    assert main(["import-nemo", str(src), str(out), "--vision", str(clip_dir)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_help_names_the_formats_and_the_pickle_risk(capsys):
    with pytest.raises(SystemExit):
        main(["import-nemo", "--help"])
    text = capsys.readouterr().out
    assert (
        "mp_rank_XX" in text and "--allow-pickle" in text and "can" in text and "run code" in text
    )
