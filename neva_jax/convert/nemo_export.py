"""Export a neva-jax model to NeMo: a NeMo 2 checkpoint folder or a NeMo 1 `.nemo` file.

`export_nemo(ckpt, out, fmt="nemo2"|"nemo1", llm_only=False)` writes what NeMo itself
writes (tensor layouts: convert/nemo_write.py):
- nemo2, NeVA: `context/` (io.json, model.yaml for `vlm.LlavaModel`, nemo_tokenizer/)
  + `weights/` with `module.language_model.*`, `module.vision_model.vision_model.*`
  (Hugging Face CLIP names), `module.vision_projection.{0,2}.*`.
- nemo2, `llm_only`: `llm.LlamaModel` with `module.*` keys.
- nemo1: an uncompressed tar with `model_config.yaml` (MegatronNevaModel with `mm_cfg`, or
  MegatronGPTModel), the sentencepiece tokenizer artifact and `model_weights/` (`model.`
  keys; NeVA's projector under `embedding.word_embeddings.adapter_layer.
  mm_projector_adapter.mm_projector`, the tower under `...vision_encoder`).
With `llm_only`, the `<image>`/`<pad>`/`<im_start>`/`<im_end>` tokens that an import
appended to the tokenizer are dropped again. The vocabulary is padded to a multiple of
128 (`make_vocab_size_divisible_by`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from neva_jax.convert import nemo_config, nemo_write
from neva_jax.convert.nemo_context import Call, PyRef, to_fiddle_json, to_yaml_dict
from neva_jax.convert.nemo_io import NemoError, require_torch
from neva_jax.convert.weights import check_tokenizer_folder
from neva_jax.model import lora
from neva_jax.model.neva import NevaConfig
from neva_jax.model.projector import projector_depth

FORMATS = ("nemo2", "nemo1")
APPENDED_TOKENS = ("<image>", "<pad>", "<im_start>", "<im_end>")
VOCAB_DIVISOR = 128
CLIP_NAMES = {  # (image size, width, layers, heads, patch) -> Hugging Face name
    (336, 1024, 24, 16, 14): "openai/clip-vit-large-patch14-336",
    (224, 1024, 24, 16, 14): "openai/clip-vit-large-patch14",
}
NEMO2_COMMON = {
    "epoch": 0,
    "global_step": 0,
    "state_dict": {},
    "optimizer_states": [],
    "lr_schedulers": [],
    "content_metadata": {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": "dp_reshardable",
    },
}


def _trim_tokenizer(folder: Path, keep: int) -> None:
    """Drops added tokens with ids >= `keep` from a saved fast tokenizer folder."""
    tok_json = folder / "tokenizer.json"
    data = json.loads(tok_json.read_text())
    dropped = {t["content"] for t in data.get("added_tokens", []) if t["id"] >= keep}
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < keep]
    tok_json.write_text(json.dumps(data, ensure_ascii=False))
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    decoder = cfg.get("added_tokens_decoder", {})
    cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < keep}
    for key in ("pad_token", "image_token"):
        if cfg.get(key) in dropped:
            cfg.pop(key)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(cfg.get(key), list):
            cfg[key] = [t for t in cfg[key] if t not in dropped]
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    special = folder / "special_tokens_map.json"
    if special.exists():
        sm = json.loads(special.read_text())
        sm = {k: v for k, v in sm.items() if not (isinstance(v, str) and v in dropped)}
        special.write_text(json.dumps(sm, indent=2))


def _base_vocab(tok: Any) -> int:
    """Tokenizer size without the tokens an import appended (`APPENDED_TOKENS` at the end)."""
    n = len(tok)
    vocab = tok.get_vocab()
    ids = sorted(vocab[t] for t in APPENDED_TOKENS if t in vocab)
    while ids and ids[-1] == n - 1:
        ids.pop()
        n -= 1
    return n


def _vision_name(cfg: NevaConfig, context: tuple[Path, Path] | None) -> str:
    """A name NeMo loads the tower's config from: a known CLIP, else a CLIP config folder
    written to `context[0]` that will live at `context[1]`."""
    v = cfg.vision
    key = (v.image_size, v.hidden_size, v.num_layers, v.num_attention_heads, v.patch_dim)
    if key in CLIP_NAMES:
        return CLIP_NAMES[key]
    if context is None:
        raise NemoError(
            f"the vision tower {key} is not a known CLIP; NeMo 1 needs a name it can load"
        )
    from neva_jax.convert.hf_export import vision_hf_config

    folder = context[0] / "vision_model"
    folder.mkdir(parents=True, exist_ok=True)
    hf = {**vision_hf_config(v), "architectures": ["CLIPVisionModel"]}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return str(context[1] / "vision_model")


def _nemo2_config(
    cfg: NevaConfig, vocab: int, dtype: str, llm_only: bool, context: tuple[Path, Path]
) -> Call:
    llm = Call(
        "nemo.collections.llm.gpt.model.llama.LlamaConfig",
        {
            k: PyRef(v["_target_"]) if isinstance(v, dict) else v
            for k, v in nemo_config.llm_to_nemo2(cfg.llm, vocab_size=vocab, dtype=dtype).items()
        },
    )
    tokenizer = Call(
        "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
        {"pretrained_model_name": "nemo_tokenizer"},
    )
    if llm_only:
        return Call(
            "nemo.collections.llm.gpt.model.llama.LlamaModel",
            {"config": llm, "tokenizer": tokenizer},
        )
    depth = projector_depth(cfg.projector)
    if depth not in (1, 2):
        raise NemoError(f"projector {cfg.projector!r} has no NeMo 2 LLaVA equivalent")
    if cfg.use_im_start_end:
        raise NemoError(
            "use_im_start_end=True (NeMo 1's <im_start>/<im_end> around the image) has no "
            "NeMo 2 LLaVA equivalent; export with --format nemo1 (or --llm-only)"
        )
    D, E = cfg.llm.hidden_size, cfg.vision.hidden_size
    llava = Call(
        "nemo.collections.vlm.neva.model.llava.LlavaConfig",
        {
            "language_transformer_config": llm,
            "vision_transformer_config": Call(
                "nemo.collections.vlm.vision.base.HFCLIPVisionConfig",
                {"pretrained_model_name_or_path": _vision_name(cfg, context), "hidden_size": E},
            ),
            "vision_projection_config": Call(
                "nemo.collections.vlm.vision.base.MultimodalProjectorConfig",
                {
                    "projector_type": f"mlp{depth}x_gelu",
                    "input_size": E,
                    "hidden_size": D,
                    "ffn_hidden_size": D,
                    "bias": cfg.projector_bias,
                },
            ),
            "vision_feature_layer": cfg.vision.vision_select_layer,
            "drop_vision_class_token": bool(cfg.vision.class_token_length),
        },
    )
    return Call(
        "nemo.collections.vlm.neva.model.llava.LlavaModel",
        {"config": llava, "tokenizer": tokenizer},
    )


def _nemo1_config(
    cfg: NevaConfig,
    vocab: int,
    dtype: str,
    llm_only: bool,
    tok_file: str,
    extra: list[str],
    template: str | None = None,
    image_aspect_ratio: str | None = None,
) -> dict:
    """NeMo 1 `model_config.yaml`. `template`: the conversation template the weights
    were trained with (a training checkpoint's `data.template`, a model folder's
    `conversation.json`), written as NeMo's `data.conv_template` and
    `mm_cfg.llm.model_type`; unknown: model_type llama_2. `image_aspect_ratio` is
    written as `data.image_aspect_ratio` when NeMo has it (square, pad)."""
    out = nemo_config.llm_to_nemo1(cfg.llm)
    out["precision"] = {"float32": 32, "bfloat16": "bf16", "float16": 16}[dtype]
    out["override_vocab_size"] = None
    out["tokenizer"] = {
        "library": "sentencepiece",
        "type": None,
        "model": f"nemo:{tok_file}",
        "vocab_file": None,
        "merge_file": None,
        "delimiter": None,
        # Tokens past the sentencepiece vocabulary (e.g. <image>, <pad>), appended in order.
        "sentencepiece_legacy": bool(extra),
        "additional_special_tokens": extra or None,
    }
    del vocab
    if llm_only:
        out["target"] = (
            "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
        )
        return out
    v = cfg.vision
    out["target"] = (
        "nemo.collections.multimodal.models.multimodal_llm.neva.neva_model.MegatronNevaModel"
    )
    model_type, data = nemo_config.conversation_to_nemo1(template, image_aspect_ratio)
    if data:
        out["data"] = data
    out["mm_cfg"] = {
        "llm": {"from_pretrained": None, "freeze": False, "model_type": model_type},
        "vision_encoder": {
            "from_pretrained": _vision_name(cfg, None)
            if (v.image_size, v.hidden_size, v.num_layers, v.num_attention_heads, v.patch_dim)
            in CLIP_NAMES
            else None,
            "from_hf": True,
            "patch_dim": v.patch_dim,
            "crop_size": [v.image_size, v.image_size],
            "hidden_size": v.hidden_size,
            "vision_select_layer": v.vision_select_layer,
            "class_token_length": 1,
            "vision_select_feature": "patch" if v.class_token_length else "cls_patch",
            "freeze": False,
        },
        "mm_mlp_adapter_type": cfg.projector,
        "use_im_start_end": cfg.use_im_start_end,
    }
    return out


def export_nemo(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    fmt: str = "nemo2",
    llm_only: bool = False,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Writes the model at `ckpt_path` (anything `load_model` reads) as a NeMo checkpoint."""
    import transformers
    from flax import nnx

    from neva_jax.convert import checkpoint

    require_torch()
    if fmt not in FORMATS:
        raise NemoError(f"--format {fmt}: use one of {FORMATS}")
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output path")
    if fmt == "nemo2" and out.suffix == ".nemo":
        raise NemoError(
            f"{out}: a NeMo 2 checkpoint is a folder and .nemo names NeMo 1's tar; pass "
            "--format nemo1 for a .nemo, or name the NeMo 2 folder without .nemo"
        )
    check_tokenizer_folder(tokenizer)
    model, info = checkpoint.load_model(ckpt_path)
    cfg: NevaConfig = info.config
    tok_path = Path(tokenizer or info.tokenizer_path or "")
    if not tok_path.is_dir():
        raise NemoError(f"{ckpt_path}: the checkpoint has no tokenizer; pass --tokenizer DIR")
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_path))
    dtype = dtype or cfg.llm.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise NemoError(f"--dtype {dtype}: use float32, bfloat16 or float16")
    vocab = _base_vocab(tok) if llm_only else len(tok)
    padded = -(-vocab // VOCAB_DIVISOR) * VOCAB_DIVISOR
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if cfg.peft.enabled:  # NeMo's NeVA holds plain weights: fold the LoRA adapters in
        params = lora.merge_params(params, cfg.peft)
    np_dtype = (
        np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    )
    out.parent.mkdir(parents=True, exist_ok=True)  # as import-hf and export-hf do
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "nemo2":
            _write_nemo2(tmp, params, cfg, tok, vocab, padded, dtype, np_dtype, llm_only, out)
        else:
            _write_nemo1(
                tmp,
                params,
                cfg,
                tok_path,
                vocab,
                padded,
                dtype,
                np_dtype,
                llm_only,
                info.template,
                info.image_aspect_ratio,
            )
        if out.exists():
            out.rmdir()
        if fmt == "nemo2":
            tmp.rename(out)
        else:
            with tarfile.open(tmp.with_suffix(".tar"), "w:") as tar:
                tar.add(tmp, arcname=".")
            tmp.with_suffix(".tar").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.with_suffix(".tar").unlink(missing_ok=True)
    return out


def _tensors(params: Any, cfg: NevaConfig, vocab: int, padded: int, llm_only: bool, fmt: str):
    from neva_jax.convert.nemo_write import llm_tensors, projector_tensors, vision_tensors

    llm_prefix = "language_model." if fmt == "nemo2" and not llm_only else ""
    for k, v, how in llm_tensors(params["llm"], cfg.llm, vocab=vocab, padded_vocab=padded):
        yield llm_prefix + k, v, how
    if llm_only:
        return
    depth, bias = projector_depth(cfg.projector), cfg.projector_bias
    if fmt == "nemo2":
        yield from vision_tensors(params["vision"], cfg.vision, "vision_model.vision_model.")
        yield from projector_tensors(
            params["projector"], depth, bias, "vision_projection.", sequential=True
        )
    else:
        emb = "embedding.word_embeddings."
        yield from vision_tensors(
            params["vision"], cfg.vision, emb + "vision_encoder.vision_model."
        )
        yield from projector_tensors(
            params["projector"],
            depth,
            bias,
            emb + "adapter_layer.mm_projector_adapter.mm_projector.",
            sequential=False,
        )


def _prefixed(prefix: str, items: Any) -> Any:
    for k, v, how in items:
        yield prefix + k, v, how


def _write_nemo2(
    tmp: Path,
    params: Any,
    cfg: NevaConfig,
    tok: Any,
    vocab: int,
    padded: int,
    dtype: str,
    np_dtype: Any,
    llm_only: bool,
    final: Path,
) -> None:
    context = tmp / "context"
    (context / "artifacts").mkdir(parents=True)
    tok.save_pretrained(str(context / "nemo_tokenizer"))
    if llm_only:
        _trim_tokenizer(context / "nemo_tokenizer", vocab)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (context / "artifacts" / "generation_config.json").write_text(json.dumps(ids, indent=2))
    model = _nemo2_config(cfg, vocab, dtype, llm_only, (context, final / "context"))
    trainer = Call("nemo.lightning.pytorch.trainer.Trainer", {"accelerator": "cpu", "devices": 1})
    root = Call(
        "nemo.lightning.io.pl.TrainerContext", {"model": model, "trainer": trainer, "extra": {}}
    )
    (context / "io.json").write_text(to_fiddle_json(root))
    (context / "model.yaml").write_text(yaml.safe_dump(to_yaml_dict(model), sort_keys=False))
    prefix = "module." + ("" if llm_only else "language_model.")
    objects = nemo_write.extra_states(prefix, cfg.llm.num_layers)
    tensors = _prefixed("module.", _tensors(params, cfg, vocab, padded, llm_only, "nemo2"))
    nemo_write.write_dist(tmp / "weights", tensors, objects, NEMO2_COMMON, np_dtype)


def _write_nemo1(
    tmp: Path,
    params: Any,
    cfg: NevaConfig,
    tok_path: Path,
    vocab: int,
    padded: int,
    dtype: str,
    np_dtype: Any,
    llm_only: bool,
    template: str | None = None,
    image_aspect_ratio: str | None = None,
) -> None:
    sp = tok_path / "tokenizer.model"
    if not sp.exists():
        raise NemoError(
            f"{tok_path}: --format nemo1 needs the sentencepiece tokenizer.model; use --format nemo2"
        )
    import sentencepiece
    import transformers

    tok_file = f"{uuid.uuid4().hex}_tokenizer.model"
    shutil.copy(sp, tmp / tok_file)
    base = sentencepiece.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_path))
    added = tok.added_tokens_decoder
    extra = [str(added[i]) for i in range(base, vocab)]
    config = _nemo1_config(
        cfg, vocab, dtype, llm_only, tok_file, extra, template, image_aspect_ratio
    )
    (tmp / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    objects = nemo_write.extra_states("model.", cfg.llm.num_layers)
    tensors = _prefixed("model.", _tensors(params, cfg, vocab, padded, llm_only, "nemo1"))
    nemo_write.write_dist(tmp / "model_weights", tensors, objects, {}, np_dtype)


EXPORT_HELP = """\
Export a neva-jax checkpoint to NeMo.

  export-nemo CKPT OUT [--format nemo2|nemo1] [--llm-only] [--dtype DTYPE]
      CKPT: a model folder, training workdir or step folder, or a llava-hf folder.
      nemo2 (default): OUT is a NeMo 2 checkpoint folder (context/ + weights/) for
      vlm.LlavaModel, or llm.LlamaModel with --llm-only.
      nemo1: OUT is a .nemo file (MegatronNevaModel, or MegatronGPTModel with
      --llm-only); needs a sentencepiece tokenizer (tokenizer/tokenizer.model).
      --llm-only drops the <image>/<pad> tokens that import appended.
"""


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m neva_jax.convert export-nemo`."""
    p.add_argument("ckpt", metavar="CKPT", help="neva-jax model folder or training checkpoint")
    p.add_argument("out", metavar="OUT", help="new NeMo 2 folder, or .nemo file for nemo1")
    p.add_argument("--format", default="nemo2", choices=FORMATS, help="default nemo2")
    p.add_argument("--llm-only", action="store_true", help="write the LLM alone (LLaMA)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="stored dtype (default: the model's parameter dtype)",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder, if the checkpoint has none"
    )


def run_export(args: argparse.Namespace) -> None:
    """Runs `export-nemo` and prints a one-line summary."""
    out = export_nemo(
        args.ckpt,
        args.out,
        fmt=args.format,
        llm_only=args.llm_only,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
    )
    print(f"wrote {out}: NeMo {args.format[-1]} {'LLM' if args.llm_only else 'NeVA'} checkpoint")


SUBCOMMAND = (
    "neva-jax checkpoint -> NeMo checkpoint",
    EXPORT_HELP,
    add_export_arguments,
    run_export,
)
