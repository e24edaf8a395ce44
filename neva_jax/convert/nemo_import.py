"""Import NeMo checkpoints (NeMo 2 folders, NeMo 1 `.nemo` tars; LLaMA and NeVA/LLaVA)
into a `Neva` model, born sharded: `import_nemo(src, ..., mesh=None) -> Imported`.

Formats: NeMo 2 `context/` + `weights/` (torch_dist); NeMo 1 `.nemo` (tar, gzip tar or
extracted folder) with `model_config.yaml` and `model_weights/` (torch_dist or zarr),
`model_weights.ckpt`, `mp_rank_XX/model_weights.ckpt` or
`tp_rank_XX_pp_rank_YYY/model_weights.ckpt`. Keys, layouts and tensor-parallel merging:
convert/nemo_keys.py; configs: convert/nemo_config.py; tokenizers:
convert/nemo_tokenizer.py. An LLM-only checkpoint imports as a Neva whose vision tower
and projector are freshly initialised (like `import-hf --llm`); a NeVA checkpoint that
holds no LLM (stage 1) or no vision tower (frozen) takes them from `llm` / `vision`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from jax.sharding import Mesh

from neva_jax.convert import hf, hf_clip, hf_llama, nemo_config, nemo_keys
from neva_jax.convert.hf import Imported
from neva_jax.convert.nemo_io import DistCheckpoint, NemoError, Source, load_state_dict
from neva_jax.convert.nemo_tokenizer import nemo1_tokenizer
from neva_jax.convert.weights import Entry, SafetensorsFolder, entries_from, load_into
from neva_jax.data.conversation import IMAGE_PLACEHOLDER
from neva_jax.model import clip
from neva_jax.model.clip import ClipConfig
from neva_jax.model.neva import NevaConfig
from neva_jax.model.projector import projector_depth

# NeMo 1 NeVA media tokens (patch, start, end) per mm_cfg.llm.model_type.
MEDIA_TOKENS = {"llama_3": tuple(f"<|reserved_special_token_{i}|>" for i in (3, 4, 5))}
DEFAULT_MEDIA = ("<extra_id_3>", "<extra_id_4>", "<extra_id_5>")
CLIP_PRESETS = {
    "openai/clip-vit-large-patch14-336": clip.clip_l14_336,
    "openai/clip-vit-large-patch14": clip.clip_l14_224,
}
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")


@dataclasses.dataclass
class _Parts:
    """What one checkpoint contributes."""

    where: str
    llm: nemo_config.LlmSpec | None
    reader: Any  # DistTensors | RankTensors
    tokenizer: Any | None
    neva: dict[str, Any] | None  # projector, vision fields, media tokens


# ---------------------------------------------------------------------------- reading


def _yaml(source: Source, rel: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(source.read_bytes(rel))
    except yaml.YAMLError as e:
        raise NemoError(f"{source.path}/{rel}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise NemoError(f"{source.path}/{rel}: not a mapping")
    return data


def _weights(source: Source, cfg_llm: nemo_config.LlmSpec | None, *, allow_pickle: bool) -> Any:
    """The canonical tensor reader of a NeMo 1 checkpoint's weights."""
    if source.is_dir("model_weights"):
        return nemo_keys.DistTensors(DistCheckpoint(source, "model_weights"))
    ranks: dict[tuple[int, int], Any] = {}
    if source.exists("model_weights.ckpt"):
        ranks[(0, 0)] = load_state_dict(source, "model_weights.ckpt", allow_pickle=allow_pickle)
    for name in source.list(""):
        m = _RANK_DIR.match(name)
        if m and source.exists(f"{name}/model_weights.ckpt"):
            tp, pp = (int(m.group(1)), 0) if m.group(1) else (int(m.group(2)), int(m.group(3)))
            ranks[(tp, pp)] = load_state_dict(
                source, f"{name}/model_weights.ckpt", allow_pickle=allow_pickle
            )
    if not ranks:
        raise NemoError(
            f"{source.path}: no weights (model_weights/, model_weights.ckpt, mp_rank_XX/ or "
            "tp_rank_XX_pp_rank_YYY/)"
        )
    layers = cfg_llm.config.num_layers if cfg_llm else 1
    gated = bool(cfg_llm and cfg_llm.config.activation == "swiglu")
    return nemo_keys.RankTensors(ranks, source.path, num_layers=layers, gated=gated)


def _member_finder(source: Source):
    def find(ref: str, workdir: Path) -> Path | None:
        name = ref.removeprefix("nemo:")
        hits = [
            n
            for n in _all_files(source)
            if n == name or n.endswith("/" + name) or n.endswith("_" + name)
        ]
        if not hits and ref.startswith("nemo:"):
            hits = [n for n in _all_files(source) if n.endswith(name)]
        if hits:
            return source.extract(hits[0], workdir / Path(hits[0]).name)
        return Path(ref) if Path(ref).exists() else None

    return find


def _all_files(source: Source) -> list[str]:
    from neva_jax.convert.nemo_io import iter_files

    return list(iter_files(source, ""))


def _read_nemo1(source: Source, workdir: Path, *, allow_pickle: bool) -> _Parts:
    where = f"{source.path}:model_config.yaml"
    cfg = _yaml(source, "model_config.yaml")
    llm = nemo_config.llm_from_nemo1(cfg, where)
    reader = _weights(source, llm, allow_pickle=allow_pickle)
    tokenizer = nemo1_tokenizer(cfg.get("tokenizer") or {}, _member_finder(source), workdir, where)
    neva = None
    mm = cfg.get("mm_cfg")
    if mm:
        venc = mm.get("vision_encoder") or {}
        if venc.get("from_hf") is False:
            raise NemoError(
                f"{where}: mm_cfg.vision_encoder.from_hf=False (a NeMo CLIP) is not supported"
            )
        feature = venc.get("vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise NemoError(
                f"{where}: mm_cfg.vision_encoder.vision_select_feature={feature!r} is not supported"
            )
        kind = mm.get("mm_mlp_adapter_type", "linear")
        neva = dict(
            projector=kind,
            projector_bias=True,
            projector_ffn=None,
            vision_name=venc.get("from_pretrained"),
            vision_hidden=venc.get("hidden_size"),
            select_layer=int(venc.get("vision_select_layer", -2)),
            class_token_length=0
            if feature == "cls_patch"
            else int(venc.get("class_token_length", 1)),
            use_im_start_end=bool(mm.get("use_im_start_end", False)),
            media=MEDIA_TOKENS.get((mm.get("llm") or {}).get("model_type"), DEFAULT_MEDIA),
            llm_name=(mm.get("llm") or {}).get("from_pretrained"),
        )
    return _Parts(str(source.path), llm, reader, tokenizer, neva)


def _read_nemo2(source: Source, *, allow_pickle: bool) -> _Parts:
    del allow_pickle  # NeMo 2 weights are never pickled
    import transformers

    where = f"{source.path}/context/model.yaml"
    if not source.exists("context/model.yaml"):
        raise NemoError(f"{source.path}: no context/model.yaml")
    top = _yaml(source, "context/model.yaml")
    cfg = top.get("config") or {}
    neva = None
    if "language_transformer_config" in cfg:
        llm_cfg = cfg["language_transformer_config"]
        vis = cfg.get("vision_transformer_config") or {}
        proj = cfg.get("vision_projection_config") or {}
        kind = proj.get("projector_type", "mlp2x_gelu")
        if kind == "mcore_mlp":
            kind = "mlp2x_gelu"
        elif kind == "mlp1x_gelu":
            kind = "linear"
        neva = dict(
            projector=kind,
            projector_bias=bool(proj.get("bias", True)),
            projector_ffn=proj.get("ffn_hidden_size"),
            vision_name=vis.get("pretrained_model_name_or_path"),
            vision_hidden=vis.get("hidden_size"),
            select_layer=int(cfg.get("vision_feature_layer", -2)),
            class_token_length=1 if cfg.get("drop_vision_class_token", True) else 0,
            use_im_start_end=False,
            media=(IMAGE_PLACEHOLDER, None, None),
            llm_name=cfg.get("language_model_from_pretrained"),
            context=source.path / "context",
        )
    else:
        llm_cfg = cfg
    llm = nemo_config.llm_from_nemo2(llm_cfg, where)
    reader = nemo_keys.DistTensors(DistCheckpoint(source, "weights"))
    tokenizer = None
    if source.is_dir("context/nemo_tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source.path / "context/nemo_tokenizer")
        )
    return _Parts(str(source.path), llm, reader, tokenizer, neva)


def read_checkpoint(source: Source, workdir: Path, *, allow_pickle: bool = False) -> _Parts:
    """Config, weights reader and tokenizer of a NeMo checkpoint."""
    if source.exists("model_config.yaml"):
        return _read_nemo1(source, workdir, allow_pickle=allow_pickle)
    if source.is_dir("context") and source.is_dir("weights"):
        return _read_nemo2(source, allow_pickle=allow_pickle)
    raise NemoError(
        f"{source.path}: not a NeMo checkpoint (no model_config.yaml, nor context/ + weights/)"
    )


# ---------------------------------------------------------------------------- checks


def check_entries(entries: list[Entry], reader: Any, unused: set[str], config_file: str) -> None:
    """Every key present with the shape the config implies; every stored tensor used."""
    have = reader.keys()
    stored = getattr(reader, "stored", lambda k: k)
    for e in entries:
        for key, shape in zip(e.keys, e.hf_shapes, strict=True):
            if key not in have:
                raise NemoError(f"{reader.path}: missing tensor {key!r}")
            if tuple(reader.shape(key)) != tuple(shape):
                raise NemoError(
                    f"{reader.path}: tensor {stored(key)!r} has shape {tuple(reader.shape(key))}, "
                    f"{config_file} implies {tuple(shape)}"
                )
    expected = {k for e in entries for k in e.keys}
    extra = sorted(have - expected - unused)
    if extra:
        raise NemoError(
            f"{reader.path}: unexpected tensor {stored(extra[0])!r} ({len(extra)} in all)"
        )


# ---------------------------------------------------------------------------- vocabulary


def _vocab(
    tokenizer: Any, padded: int, neva: dict[str, Any] | None, where: str, grow: bool = False
) -> tuple[int, list[int | None], int | None]:
    """(model vocab size, row sources, image token id): the padded table is trimmed to the
    tokenizer (rounded up to 64); NeVA adds `<image>` (and `<im_start>`/`<im_end>`),
    copying the rows of NeMo's media tokens. `grow`: the LLM came separately (--llm), so
    tokens past its table get new (mean) rows instead of being an error."""
    from neva_jax.data.tokenize import IM_END, IM_START

    base = len(tokenizer)
    copies: dict[int, int] = {}
    image_id = None
    if neva is not None:
        media = neva["media"]
        wanted = [(IMAGE_PLACEHOLDER, media[0])]
        if neva["use_im_start_end"]:
            wanted += [(IM_START, media[1]), (IM_END, media[2])]
        vocab = tokenizer.get_vocab()
        new = [t for t, _ in wanted if t not in vocab]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new})
        vocab = tokenizer.get_vocab()
        for ours, theirs in wanted:
            if theirs in vocab and theirs != ours and vocab[theirs] < padded:
                copies[vocab[ours]] = vocab[theirs]
        image_id = vocab[IMAGE_PLACEHOLDER]
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    n = len(tokenizer)
    if base > padded and not grow:
        raise NemoError(f"{where}: tokenizer has {base} tokens, the embedding only {padded} rows")
    size = -(-n // hf.VOCAB_MULTIPLE) * hf.VOCAB_MULTIPLE
    size = min(size, padded) if n <= padded else size
    rows: list[int | None] = [i if i < min(base, padded) else None for i in range(size)]
    for new_id, src in copies.items():
        rows[new_id] = src
    return size, rows, image_id


def _resize_rows(entry: Entry, rows: list[int | None], axis: int) -> Entry:
    """An HF embedding (axis 0) or LM head (axis 1) entry rebuilt with `rows`."""
    table = nemo_keys.vocab_rows(rows)
    base = entry.combine

    def combine(ts: list[Any]) -> Any:
        w = base(ts)
        return table(w) if axis == 0 else table(w.T).T

    shape = list(entry.shape)
    shape[axis] = len(rows)
    return dataclasses.replace(entry, shape=tuple(shape), combine=combine)


# ---------------------------------------------------------------------------- import


def _vision_config(
    neva: dict[str, Any], vision_dir: Path | None, where: str, runtime: dict
) -> tuple[ClipConfig, Path | None]:
    """The tower's config: from `vision_dir`, a local folder the checkpoint names, or a
    known CLIP name; the feature layer and class-token choice come from the checkpoint."""
    name = neva["vision_name"]
    if vision_dir is None and name and (Path(name) / "config.json").exists():
        vision_dir = Path(name)
    own = neva.get("context")  # a NeMo 2 export keeps an unnamed tower's config here
    if vision_dir is None and own is not None and (own / "vision_model" / "config.json").exists():
        vision_dir = own / "vision_model"
    sel = dict(
        vision_select_layer=neva["select_layer"], class_token_length=neva["class_token_length"]
    )
    if vision_dir is not None:
        hf_cfg = hf.read_hf_config(vision_dir, ("clip", "clip_vision_model"))
        cfg = clip.from_hf_config(hf_cfg)
        return dataclasses.replace(cfg, **sel, **runtime), vision_dir
    if name in CLIP_PRESETS:
        return CLIP_PRESETS[name](**sel, **runtime), None
    raise NemoError(
        f"{where}: vision tower {name!r} is neither a local CLIP folder nor a known CLIP; "
        "pass --vision CLIP_DIR"
    )


def _llm_part(
    kind: str,
    reader: Any,
    spec: Any,
    tok: Any,
    neva: dict[str, Any],
    where: str,
    config_file: str,
    runtime: dict,
    grow: bool = False,
) -> tuple[Any, tuple[list[Entry], Any], int]:
    """(LLM config, (entries, reader), image token id) from a NeMo reader or an HF folder."""
    if kind == "nemo":
        padded = reader.shape("embedding.word_embeddings.weight")[0]
        size, rows, image_id = _vocab(tok, padded, neva, where, grow)
        cfg = dataclasses.replace(spec.config, vocab_size=size, **runtime)
        entries = nemo_keys.llm_entries(cfg, reader.keys(), padded_vocab=padded, rows=rows)
        have = reader.keys()
        unused = {k for k in have if k.startswith(("vision_tower.", "projector."))}
        if cfg.share_embeddings_and_output_weights:
            unused |= {"output_layer.weight"} & have
        check_entries(
            entries, _Only(reader, exclude=("vision_tower.", "projector.")), unused, config_file
        )
        return cfg, (entries, reader), image_id
    hf_cfg = hf.read_hf_config(reader, ("llama", "mistral"))
    base = hf_llama.from_hf_config(hf_cfg)
    size, rows, image_id = _vocab(tok, base.vocab_size, neva, where, grow)
    st = SafetensorsFolder(reader)
    entries = entries_from(hf_llama.param_table(base), ("llm",))
    axes = {("llm", "embed", "embedding"): 0, ("llm", "lm_head", "kernel"): 1}
    entries = [_resize_rows(e, rows, axes[e.path]) if e.path in axes else e for e in entries]
    return dataclasses.replace(base, vocab_size=size, **runtime), (entries, st), image_id


def import_nemo(
    src: str | Path,
    *,
    llm: str | Path | None = None,
    vision: str | Path | None = None,
    tokenizer: str | Path | None = None,
    projector: str = "mlp2x_gelu",
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    **runtime: Any,
) -> Imported:
    """Imports a NeMo checkpoint as a `Neva` (see the module docstring).

    Args:
      src: NeMo 2 folder, `.nemo` file (tar or gzip tar) or extracted NeMo 1 folder.
      llm: the LLM (a NeMo checkpoint or a Hugging Face LLaMA folder) of a NeVA
        checkpoint that holds only the projector (stage 1).
      vision: Hugging Face CLIP folder: the tower's config, and its weights when the
        checkpoint holds none (a frozen tower, or an LLM-only checkpoint).
      tokenizer: tokenizer folder overriding the checkpoint's artifact.
      projector: the fresh projector of an LLM-only checkpoint.
      mesh: every parameter is placed straight onto its shards on this mesh.
      allow_pickle: permit full unpickling of `.ckpt` files (can run code from the file).
      seed: seed of a fresh projector.
      runtime: RUNTIME_FIELDS (param_dtype, dtype, ...) of the imported config.
    """
    import transformers

    with tempfile.TemporaryDirectory(prefix="neva_nemo_") as tmp, contextlib.ExitStack() as stack:
        source = stack.enter_context(Source(src))
        parts = read_checkpoint(source, Path(tmp), allow_pickle=allow_pickle)
        where = parts.where
        config_file = (
            "model_config.yaml" if source.exists("model_config.yaml") else "context/model.yaml"
        )
        tok = (
            transformers.AutoTokenizer.from_pretrained(str(tokenizer))
            if tokenizer
            else parts.tokenizer
        )
        if tok is None:
            raise NemoError(
                f"{where}: the checkpoint has no tokenizer artifact; pass --tokenizer DIR"
            )
        neva = parts.neva
        if neva is None:
            if vision is None:
                raise NemoError(
                    f"{where}: an LLM-only checkpoint; pass --vision CLIP_DIR to build a NeVA"
                )
            neva = dict(
                projector=projector,
                projector_bias=True,
                projector_ffn=None,
                vision_name=None,
                select_layer=-2,
                class_token_length=1,
                use_im_start_end=False,
                media=(IMAGE_PLACEHOLDER, None, None),
                llm_name=None,
                fresh=True,
            )
        keys = parts.reader.keys()
        if "decoder.layers.0.mlp.linear_fc2.weight" in keys:
            kind, llm_reader, spec = "nemo", parts.reader, parts.llm
        else:
            llm = llm or neva.get("llm_name")
            if llm is None or not Path(llm).exists():
                raise NemoError(
                    f"{where}: holds no LLM weights (stage 1); pass --llm with the LLM checkpoint"
                )
            if (Path(llm) / "config.json").exists():
                kind, llm_reader, spec = "hf", Path(llm), None
            else:
                sub = read_checkpoint(
                    stack.enter_context(Source(llm)), Path(tmp), allow_pickle=allow_pickle
                )
                kind, llm_reader, spec = "nemo", sub.reader, sub.llm
        separate = llm_reader is not parts.reader
        llm_cfg, llm_source, image_id = _llm_part(
            kind, llm_reader, spec, tok, neva, where, config_file, runtime, separate
        )
        vision_cfg, vision_dir = _vision_config(
            neva, Path(vision) if vision else None, where, runtime
        )
        cfg = NevaConfig(
            llm=llm_cfg,
            vision=vision_cfg,
            projector=neva["projector"],
            projector_bias=neva["projector_bias"],
            image_token_id=image_id,
            use_im_start_end=neva["use_im_start_end"],
        )
        if (
            neva["projector_ffn"] not in (None, llm_cfg.hidden_size)
            and projector_depth(cfg.projector) > 1
        ):
            raise NemoError(
                f"{where}: vision_projection_config.ffn_hidden_size={neva['projector_ffn']} "
                f"differs from the LLM width {llm_cfg.hidden_size} (not supported)"
            )
        sources, fresh = [llm_source], {}
        keys = parts.reader.keys()
        own = _Only(parts.reader, include=("vision_tower.", "projector."))
        entries = []
        if neva.get("fresh"):
            fresh["projector"] = hf._fresh_projector(cfg, seed, mesh)
        else:
            entries += nemo_keys.nemo_projector_entries(
                projector_depth(cfg.projector),
                vision_cfg.hidden_size,
                llm_cfg.hidden_size,
                cfg.projector_bias,
                keys,
            )
        unused: set[str] = set()
        if "vision_tower.embeddings.patch_embedding.weight" in keys:
            entries += entries_from(
                hf_clip.param_table(vision_cfg, prefix="vision_tower."), ("vision",)
            )
            unused = hf_clip.unused_keys(keys, "vision_tower.")
        elif vision_dir is None:
            raise NemoError(
                f"{where}: holds no vision tower weights (frozen); pass --vision CLIP_DIR"
            )
        else:
            _, v_entries, v_reader = hf._clip_source(
                vision_dir,
                vision_select_layer=vision_cfg.vision_select_layer,
                class_token_length=vision_cfg.class_token_length,
                **runtime,
            )
            sources.append((v_entries, v_reader))
        check_entries(entries, own, unused, config_file)
        sources.append((entries, parts.reader))
        model = load_into(*hf.abstract_neva(cfg, mesh), sources, fresh)
        pre = vision_dir / "preprocessor_config.json" if vision_dir else None
        preprocessor = json.loads(pre.read_text()) if pre is not None and pre.exists() else None
        return Imported(model, cfg, tok, preprocessor)


class _Only:
    """A reader's view restricted to keys with (`include`) or without (`exclude`) prefixes."""

    def __init__(
        self, reader: Any, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ):
        self._r, self._in, self._out, self.path = reader, include, exclude, reader.path

    def keys(self) -> set[str]:
        return {
            k
            for k in self._r.keys()  # noqa: SIM118 (a reader, not a dict)
            if (not self._in or k.startswith(self._in)) and not k.startswith(self._out or ("\0",))
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return self._r.shape(key)

    def stored(self, key: str) -> str:
        return getattr(self._r, "stored", lambda k: k)(key)


IMPORT_HELP = """\
Import a NeMo checkpoint into a neva-jax model folder (like import-hf).

  import-nemo SRC OUT [--llm DIR] [--vision CLIP_DIR] [--tokenizer DIR]
      SRC: a NeMo 2 checkpoint folder (context/ + weights/), a NeMo 1 .nemo file
      (tar or gzip tar) or an extracted .nemo folder; LLaMA (GPT) or NeVA/LLaVA.
      NeMo 1 weights may be model_weights/ (torch_dist or zarr), model_weights.ckpt,
      mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/ (tensor-parallel shards are merged).
      --vision CLIP_DIR: a Hugging Face CLIP folder: required for an LLM-only SRC
      (the projector starts fresh), and for a NeVA SRC whose tower was frozen (not
      saved) or is not a known CLIP name.
      --llm DIR: the LLM (NeMo checkpoint or Hugging Face LLaMA folder) of a stage-1
      NeVA SRC that holds only the projector.

Pickle safety: dist checkpoints (model_weights/, weights/) are read without running
code from the files (a restricted unpickler for .metadata, weights-only tensors).
Legacy model_weights.ckpt files are pickles: they load weights-only when they hold
only tensors; otherwise they need --allow-pickle, which unpickles them fully and can
run code from a checkpoint of an untrusted source.
"""


def add_import_arguments(p: Any) -> None:
    """Arguments of `python -m neva_jax.convert import-nemo`."""
    p.add_argument("src", metavar="SRC", help="NeMo 2 folder, .nemo file or extracted .nemo folder")
    p.add_argument("out", metavar="OUT", help="new model folder")
    p.add_argument("--llm", metavar="DIR", help="LLM of a stage-1 NeVA checkpoint")
    p.add_argument("--vision", metavar="CLIP_DIR", help="Hugging Face CLIP(Vision)Model folder")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder overriding the checkpoint's"
    )
    p.add_argument(
        "--projector",
        default="mlp2x_gelu",
        help="fresh projector for an LLM-only SRC (default mlp2x_gelu)",
    )
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="stored parameter dtype",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh projector")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fully unpickle legacy .ckpt files (runs code from the file: trusted sources only)",
    )


def run_import(args: Any) -> None:
    """Runs `import-nemo` and prints a one-line summary."""
    import time

    from neva_jax.convert import checkpoint

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output folder")
    start = time.time()
    imported = import_nemo(
        args.src,
        llm=args.llm,
        vision=args.vision,
        tokenizer=args.tokenizer,
        projector=args.projector,
        allow_pickle=args.allow_pickle,
        seed=args.seed,
        param_dtype=args.param_dtype,
    )
    checkpoint.save_model(
        out,
        imported.model,
        tokenizer=imported.tokenizer,
        preprocessor_config=imported.preprocessor_config,
    )
    sp_model = getattr(imported.tokenizer, "nemo_sentencepiece_model", None)
    if sp_model is not None:  # kept for export-nemo --format nemo1
        (out / checkpoint.TOKENIZER / "tokenizer.model").write_bytes(sp_model)
    cfg = imported.config
    print(
        f"wrote {out}: LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size}, vocab "
        f"{cfg.llm.vocab_size}, <image> = {cfg.image_token_id}; vision {cfg.vision.image_size}px; "
        f"projector {cfg.projector} ({time.time() - start:.1f}s)"
    )


SUBCOMMAND = (
    "NeMo checkpoint -> neva-jax model folder",
    IMPORT_HELP,
    add_import_arguments,
    run_import,
)
