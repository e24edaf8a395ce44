"""Export a neva-jax model to a `transformers` `LlavaForConditionalGeneration` folder.

`python -m neva_jax.convert export-hf CKPT OUT` (or `export_hf(ckpt, out)`) writes:

    config.json                 LlavaConfig (text_config: LLaMA, vision_config: CLIP)
    generation_config.json      bos/eos/pad ids
    model*.safetensors          weights in the on-disk llava-hf layout that
                                transformers 5 itself writes: language_model.model.*,
                                language_model.lm_head.weight, vision_tower.*,
                                multi_modal_projector.linear_{1,2}.*
                                (sharded with model.safetensors.index.json when large)
    tokenizer files, preprocessor_config.json, processor_config.json, chat_template.jinja
                                a LlavaProcessor: `AutoProcessor.from_pretrained(OUT)`

With LoRA adapters (`model.peft.scheme=lora`) the export folds them into the
kernels (W + alpha/r * A @ B), so the folder is a plain llava-hf model;
`--adapter-only` (`export_adapter`) instead writes the PEFT layout
(`adapter_config.json` + `adapter_model.safetensors`, convert/hf_peft.py) that
`peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), OUT)`
loads on the llava-hf export of the base the adapters were trained on.

The weight layouts come from the key tables of `convert/hf_llama.py` and
`convert/hf_clip.py`. Two llava-hf parts that neva-jax does not store are
written as identities: CLIP's post-LayerNorm (never applied to LLaVA features)
and, for a `linear` projector, `linear_2` (with `projector_hidden_act='linear'`,
so the HF model computes exactly our single affine map). The chat template is
generated from the checkpoint's conversation template, so `apply_chat_template`
renders the same prompt that `neva_jax.generate` builds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neva_jax.convert import hf_clip, hf_llama, hf_peft
from neva_jax.convert.hf_chat import chat_template
from neva_jax.convert.weights import check_tokenizer_folder, written_folder
from neva_jax.data.conversation import IMAGE_PLACEHOLDER, TEMPLATES, get_template
from neva_jax.data.image import CLIP_MEAN, CLIP_STD
from neva_jax.model import lora
from neva_jax.model.clip import ClipConfig
from neva_jax.model.neva import NevaConfig

LLM_PREFIX = "language_model.model."
LM_HEAD_KEY = "language_model.lm_head.weight"
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
DEFAULT_TEMPLATE = "vicuna_v1"
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ---------------------------------------------------------------------------- config


def vision_hf_config(cfg: ClipConfig) -> dict[str, Any]:
    """The `transformers` CLIPVisionConfig dict of a vision tower config."""
    if cfg.activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"vision activation {cfg.activation!r} has no CLIP equivalent")
    return dict(
        model_type="clip_vision_model",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_dim,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layernorm_epsilon,
        projection_dim=cfg.hidden_size,
    )


def llava_hf_config(
    cfg: NevaConfig, *, pad_id: int | None, bos_id: int | None, eos_id: int | None
) -> dict[str, Any]:
    """The `transformers` LlavaConfig dict of `cfg`; refuses what llava-hf cannot express."""
    if cfg.use_im_start_end:
        raise ValueError(
            "use_im_start_end models have no llava-hf equivalent (no image start/end tokens)"
        )
    text = hf_llama.to_hf_config(cfg.llm)
    text.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    act = {"mlp2x_gelu": "gelu", "linear": "linear", "identity": "linear"}.get(cfg.projector)
    if act is None:
        raise ValueError(
            f"projector {cfg.projector!r} has no llava-hf layout (use linear or mlp2x_gelu)"
        )
    return dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        text_config=text,
        vision_config=vision_hf_config(cfg.vision),
        image_token_index=cfg.image_token_id,
        projector_hidden_act=act,
        multimodal_projector_bias=cfg.projector_bias,
        vision_feature_layer=cfg.vision.vision_select_layer,
        vision_feature_select_strategy="default" if cfg.vision.class_token_length else "full",
        image_seq_length=cfg.num_image_tokens,
        tie_word_embeddings=cfg.llm.share_embeddings_and_output_weights,
        pad_token_id=pad_id,
    )


# ---------------------------------------------------------------------------- weights


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


def hf_tensors(params: Mapping[str, Any], cfg: NevaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (llava-hf key, numpy array) for every tensor, one parameter at a time.

    `params` is the model's nested parameter dict (`nnx.to_pure_dict` of its Params);
    arrays may live on devices: each is fetched only when its turn comes.
    """
    tables = (
        ("llm", hf_llama.param_table(cfg.llm, model_prefix=LLM_PREFIX, lm_head_key=LM_HEAD_KEY)),
        ("vision", hf_clip.param_table(cfg.vision, prefix=VISION_PREFIX)),
    )
    for root, table in tables:
        for m in table:
            yield from m.export(_get(params[root], m.path)).items()
    E = cfg.vision.hidden_size
    yield f"{VISION_PREFIX}post_layernorm.weight", np.ones((E,), np.float32)
    yield f"{VISION_PREFIX}post_layernorm.bias", np.zeros((E,), np.float32)
    yield from _projector_tensors(params.get("projector", {}), cfg)


def _projector_tensors(
    proj: Mapping[str, Any], cfg: NevaConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of multi_modal_projector.linear_{1,2}: torch Linear weights are our
    kernels transposed."""
    D, E = cfg.llm.hidden_size, cfg.vision.hidden_size
    layers: list[tuple[np.ndarray, np.ndarray | None]] = []
    for i in (1, 2):
        if f"linear_{i}" in proj:
            layer = proj[f"linear_{i}"]
            bias = np.asarray(layer["bias"]) if "bias" in layer else None
            layers.append((np.asarray(layer["kernel"]).T, bias))
    if cfg.projector == "identity":
        layers = [(np.eye(D, E, dtype=np.float32), None)]
    if len(layers) == 1:  # linear: the second map is the identity (act 'linear')
        layers.append((np.eye(D, dtype=np.float32), None))
    for i, (weight, bias) in enumerate(layers, start=1):
        yield f"{PROJECTOR_PREFIX}linear_{i}.weight", np.ascontiguousarray(weight)
        if cfg.projector_bias:
            b = bias if bias is not None else np.zeros((weight.shape[0],), np.float32)
            yield f"{PROJECTOR_PREFIX}linear_{i}.bias", b


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes a .safetensors file (8-byte header size, JSON header, raw little-endian data)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, value in tensors.items():
        dtype = _ST_DTYPES.get(np.dtype(value.dtype).name)
        if dtype is None:
            raise ValueError(f"{key}: dtype {value.dtype} cannot be exported")
        header[key] = {
            "dtype": dtype,
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for value in tensors.values():
            f.write(
                np.ascontiguousarray(value)
                .astype(value.dtype.newbyteorder("<"), copy=False)
                .tobytes()
            )


def write_weights(
    out: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    dtype: Any,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Writes the tensors as model.safetensors, or shards plus an index when large.

    Returns the number of bytes written. At most one shard is held in memory.
    """
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size, total, names = 0, 0, []

    def flush() -> None:
        nonlocal pending, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        write_safetensors(out / name, pending)
        names.append(name)
        shards.append(list(pending))
        pending, size = {}, 0

    for key, value in tensors:
        value = np.asarray(value).astype(dtype)
        if pending and size + value.nbytes > max_shard_bytes:
            flush()
        pending[key] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    if len(names) == 1:
        (out / names[0]).rename(out / "model.safetensors")
        return total
    weight_map = {}
    for i, (name, keys) in enumerate(zip(names, shards, strict=True)):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ---------------------------------------------------------------------------- processor


def image_processor_config(cfg: NevaConfig, source: Mapping[str, Any] | None) -> dict[str, Any]:
    """CLIPImageProcessor settings: the checkpoint's own, else CLIP's at the tower's size."""
    if source:
        return dict(source)
    size = cfg.vision.image_size
    return dict(
        image_processor_type="CLIPImageProcessor",
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


# ---------------------------------------------------------------------------- export


def export_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    template: str | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes the model at `ckpt_path` as a llava-hf folder at `out_dir`.

    Args:
      ckpt_path: anything `convert.checkpoint.load_model` reads (a model folder,
        a training workdir or step folder, a llava-hf folder).
      out_dir: a new (or empty) folder; written under a temporary name and
        renamed when complete.
      template: conversation template for the chat template (default: the
        checkpoint's, else `vicuna_v1`).
      dtype: weight dtype in the files (float32, bfloat16, float16; default:
        the model's parameter dtype).
      tokenizer: tokenizer folder, when the checkpoint carries none.
      max_shard_bytes: safetensors shard size.

    Returns:
      The output folder.
    """
    # Heavy imports here: `python -m neva_jax.convert` imports this module to list it.
    import transformers
    from flax import nnx

    from neva_jax.convert import checkpoint

    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output folder")
    check_tokenizer_folder(tokenizer)
    model, info = checkpoint.load_model(ckpt_path)
    cfg: NevaConfig = info.config
    tok_path = tokenizer or info.tokenizer_path
    if tok_path is None:
        raise ValueError(f"{ckpt_path}: the checkpoint has no tokenizer; pass --tokenizer DIR")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_path))
    image_id = hf_tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_id != cfg.image_token_id:
        raise ValueError(
            f"{tok_path}: tokenizer maps {IMAGE_PLACEHOLDER} to {image_id}, the model expects "
            f"{cfg.image_token_id}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    if len(hf_tok) > cfg.llm.vocab_size:
        raise ValueError(
            f"{tok_path}: {len(hf_tok)} tokens exceed the model's vocab_size {cfg.llm.vocab_size}"
        )
    chat = get_template(template or getattr(info, "template", None) or DEFAULT_TEMPLATE)
    np_dtype = np.dtype(dtype or cfg.llm.param_dtype)
    if np_dtype.name not in _ST_DTYPES:
        raise ValueError(f"--dtype {np_dtype.name}: use one of {', '.join(_ST_DTYPES)}")

    with written_folder(out) as tmp:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if cfg.peft.enabled:  # fold the adapters in: a plain llava-hf model
            params = lora.merge_params(params, cfg.peft)
        write_weights(tmp, hf_tensors(params, cfg), np_dtype, max_shard_bytes)
        ids = dict(
            pad_id=hf_tok.pad_token_id, bos_id=hf_tok.bos_token_id, eos_id=hf_tok.eos_token_id
        )
        hf_config = transformers.LlavaConfig(**llava_hf_config(cfg, **ids))
        hf_config.dtype = np_dtype.name
        hf_config.save_pretrained(str(tmp))
        gen = transformers.GenerationConfig(
            bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"]
        )
        gen.save_pretrained(str(tmp))
        image_processor = transformers.CLIPImageProcessor.from_dict(
            image_processor_config(cfg, info.preprocessor_config)
        )
        processor = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=hf_tok,
            patch_size=cfg.vision.patch_dim,
            vision_feature_select_strategy="default" if cfg.vision.class_token_length else "full",
            chat_template=chat_template(chat),
            image_token=IMAGE_PLACEHOLDER,
            num_additional_image_tokens=1,
        )
        processor.save_pretrained(str(tmp))
        # transformers 5 nests the image processor in processor_config.json; tools that
        # read the classic layout (vLLM, AutoImageProcessor) look for this file.
        image_processor.save_pretrained(str(tmp))
    if info.image_aspect_ratio in ("pad", "keep"):
        print(
            f"warning: {ckpt_path} was trained with image_aspect_ratio={info.image_aspect_ratio!r}; "
            "llava-hf's CLIPImageProcessor resizes and centre-crops (square), so transformers "
            "sees other pixels: pad or resize the images to a square before its processor",
            file=sys.stderr,
        )
    return out


def export_adapter(
    ckpt_path: str | Path, out_dir: str | Path, *, dtype: str | None = None, base: str = ""
) -> Path:
    """Writes the LoRA adapters (and the projector, as `modules_to_save`) of the model at
    `ckpt_path` in Hugging Face PEFT's layout at `out_dir`; `base` is recorded as
    `base_model_name_or_path`.

    The adapters apply to the llava-hf export of the model they were trained on: the
    same LLM and vision tower (frozen under LoRA), whatever its projector was.
    """
    from flax import nnx

    from neva_jax.convert import checkpoint

    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output folder")
    if checkpoint.checkpoint_kind(ckpt_path) == "training":
        meta = checkpoint.read_meta(str(ckpt_path))
        if "vision" in meta.get("trained_parts", ()):
            raise ValueError(
                f"{ckpt_path}: the vision tower trained too and has no place in a PEFT adapter "
                "folder; export the merged model (export-hf without --adapter-only)"
            )
    model, info = checkpoint.load_model(ckpt_path)
    cfg: NevaConfig = info.config
    if not cfg.peft.enabled:
        raise ValueError(
            f"{ckpt_path}: the model has no LoRA adapters (model.peft.scheme={cfg.peft.scheme!r}); "
            "export it without --adapter-only"
        )
    np_dtype = np.dtype(dtype or cfg.llm.param_dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = dict(hf_peft.adapter_tensors(params, cfg))
    for key, value in _projector_tensors(params.get("projector", {}), cfg):
        tensors[hf_peft.projector_key(key)] = value
    with written_folder(out) as tmp:
        write_safetensors(
            tmp / hf_peft.ADAPTER_WEIGHTS,
            {k: np.asarray(v).astype(np_dtype) for k, v in tensors.items()},
        )
        config = hf_peft.adapter_config(cfg, base)
        (tmp / hf_peft.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


EXPORT_HELP = """\
Export a neva-jax checkpoint to a transformers LlavaForConditionalGeneration folder.

  export-hf CKPT OUT
      CKPT is a model folder (import-hf output), a training workdir (newest step),
      a step folder, or a llava-hf folder. OUT receives config.json,
      generation_config.json, safetensors weights, the tokenizer, the image
      processor and a chat template; load it offline with
      LlavaForConditionalGeneration.from_pretrained(OUT) and
      AutoProcessor.from_pretrained(OUT). LoRA adapters are merged into the weights.
  export-hf CKPT OUT --adapter-only [--base BASE]
      The LoRA adapters alone in Hugging Face PEFT's layout (adapter_config.json +
      adapter_model.safetensors, the projector as modules_to_save), for
      PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), OUT)
      where BASE is the llava-hf form of the model the adapters were trained on.
"""


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m neva_jax.convert export-hf`."""
    p.add_argument(
        "ckpt", metavar="CKPT", help="neva-jax model folder, training workdir or step folder"
    )
    p.add_argument("out", metavar="OUT", help="new output folder")
    p.add_argument(
        "--template",
        choices=tuple(TEMPLATES),
        help=f"conversation template for the chat template (default: the checkpoint's, else {DEFAULT_TEMPLATE})",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(_ST_DTYPES),
        help="weight dtype (default: the model's parameter dtype)",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder, if the checkpoint has none"
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the LoRA adapters in PEFT's layout instead of the merged model",
    )
    p.add_argument(
        "--base",
        default="",
        metavar="BASE",
        help="with --adapter-only: recorded as base_model_name_or_path (the llava-hf base)",
    )


def run_export(args: argparse.Namespace) -> None:
    """Runs `export-hf` from parsed arguments and prints a one-line summary."""
    if args.adapter_only:
        unused = [
            f for f, v in (("--template", args.template), ("--tokenizer", args.tokenizer)) if v
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not written with --adapter-only (PEFT's folder holds the "
                "adapters alone)"
            )
        out = export_adapter(args.ckpt, args.out, dtype=args.dtype, base=args.base)
        size = (out / hf_peft.ADAPTER_WEIGHTS).stat().st_size
        print(f"wrote {out}: PEFT LoRA adapter, {size / 2**20:.1f} MiB")
        return
    if args.base:
        raise ValueError("--base goes with --adapter-only")
    out = export_hf(
        args.ckpt, args.out, template=args.template, dtype=args.dtype, tokenizer=args.tokenizer
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: LlavaForConditionalGeneration, {size / 2**20:.1f} MiB of weights")


# Entry for `neva_jax.convert.__main__.SUBCOMMANDS` (name -> (help, description, add, run)).
SUBCOMMAND = (
    "neva-jax checkpoint -> llava-hf folder",
    EXPORT_HELP,
    add_export_arguments,
    run_export,
)
