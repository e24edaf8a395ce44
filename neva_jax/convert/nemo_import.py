"""Import NeMo checkpoints (NeMo 2 folders, NeMo 1 `.nemo` tars; LLaMA and NeVA/LLaVA)
into a `Neva` model, born sharded: `import_nemo(src, ..., mesh=None) -> Imported`, and
the `import-nemo` command.

Formats: NeMo 2 `context/` + `weights/` (torch_dist); NeMo 1 `.nemo` (tar, gzip tar or
extracted folder) with `model_config.yaml` and `model_weights/` (torch_dist or zarr),
`model_weights.ckpt`, `mp_rank_XX/model_weights.ckpt` or
`tp_rank_XX_pp_rank_YYY/model_weights.ckpt`. The pieces: files and tars
(convert/nemo_io.py), stored tensors (convert/nemo_dist.py), reading a checkpoint
(convert/nemo_read.py), tensor names and the key table (convert/nemo_keys.py),
tensor-parallel merging (convert/nemo_merge.py), configs (convert/nemo_config.py),
tokenizers and the vocabulary (convert/nemo_tokenizer.py). An LLM-only checkpoint
imports as a Neva whose vision tower and projector are freshly initialised (like
`import-hf --llm`); a NeVA checkpoint that holds no LLM (stage 1) or no vision tower
(frozen) takes them from `llm` / `vision`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from neva_jax import sharding
from neva_jax.convert import hf, hf_clip, hf_llama, nemo_keys
from neva_jax.convert.hf import Imported, add_conversation_arguments
from neva_jax.convert.nemo_io import NemoError, Source
from neva_jax.convert.nemo_merge import Subset, check_entries
from neva_jax.convert.nemo_read import read_checkpoint
from neva_jax.convert.nemo_tokenizer import vocabulary
from neva_jax.convert.weights import (
    Entry,
    SafetensorsFolder,
    check_tokenizer_folder,
    entries_from,
    load_into,
)
from neva_jax.data.conversation import IMAGE_PLACEHOLDER
from neva_jax.model import clip
from neva_jax.model.clip import ClipConfig
from neva_jax.model.neva import NevaConfig
from neva_jax.model.projector import Projector, projector_depth

CLIP_PRESETS = {
    "openai/clip-vit-large-patch14-336": clip.clip_l14_336,
    "openai/clip-vit-large-patch14": clip.clip_l14_224,
}


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
        size, rows, image_id = vocabulary(tok, padded, neva, where, grow)
        cfg = dataclasses.replace(spec.config, vocab_size=size, **runtime)
        entries = nemo_keys.llm_entries(cfg, reader.keys(), padded_vocab=padded, rows=rows)
        have = reader.keys()
        unused = {k for k in have if k.startswith(("vision_tower.", "projector."))}
        if cfg.share_embeddings_and_output_weights:
            unused |= {"output_layer.weight"} & have
        check_entries(
            entries, Subset(reader, exclude=("vision_tower.", "projector.")), unused, config_file
        )
        return cfg, (entries, reader), image_id
    hf_cfg = hf.read_hf_config(reader, ("llama", "mistral"))
    base = hf_llama.from_hf_config(hf_cfg)
    size, rows, image_id = vocabulary(tok, base.vocab_size, neva, where, grow)
    st = SafetensorsFolder(reader)
    entries = entries_from(hf_llama.param_table(base), ("llm",))
    axes = {("llm", "embed", "embedding"): 0, ("llm", "lm_head", "kernel"): 1}
    entries = [_resize_rows(e, rows, axes[e.path]) if e.path in axes else e for e in entries]
    return dataclasses.replace(base, vocab_size=size, **runtime), (entries, st), image_id


def is_nemo_checkpoint(path: str | Path) -> bool:
    """Whether `import_nemo` reads `path` (rather than a Hugging Face folder): a file (a
    `.nemo` tar), a NeMo 2 folder (`context/` + `weights/`) or an extracted `.nemo`."""
    p = Path(path)
    if p.is_file():
        return True
    return (p / "model_config.yaml").is_file() or (
        (p / "context").is_dir() and (p / "weights").is_dir()
    )


def import_nemo(
    src: str | Path,
    *,
    llm: str | Path | None = None,
    vision: str | Path | None = None,
    tokenizer: str | Path | None = None,
    projector: str | None = None,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    seed: int | None = None,
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
      projector: the fresh projector of an LLM-only checkpoint (default mlp2x_gelu).
      mesh: every parameter is placed straight onto its shards on this mesh.
      allow_pickle: permit full unpickling of `.ckpt` files (can run code from the file).
      seed: seed of a fresh projector (default 0).
      runtime: RUNTIME_FIELDS (param_dtype, dtype, ...) of the imported config.
    """
    check_tokenizer_folder(tokenizer)
    with tempfile.TemporaryDirectory(prefix="neva_nemo_") as tmp, contextlib.ExitStack() as stack:
        source = stack.enter_context(Source(src))
        parts = read_checkpoint(source, Path(tmp), allow_pickle=allow_pickle)
        where = parts.where
        config_file = (
            "model_config.yaml" if source.exists("model_config.yaml") else "context/model.yaml"
        )
        tok = parts.tokenizer
        if tokenizer:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
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
                projector=projector or "mlp2x_gelu",
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
            if llm is not None:
                raise NemoError(
                    f"{where}: holds its own LLM weights; --llm is for a stage-1 NeVA "
                    "checkpoint that holds only the projector"
                )
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
            tokenizer_vocab_size=len(tok),
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
        own = Subset(parts.reader, include=("vision_tower.", "projector."))
        entries = []
        if neva.get("fresh"):
            fresh["projector"] = _fresh_projector(cfg, seed or 0, mesh)
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
        return Imported(
            model,
            cfg,
            tok,
            preprocessor,
            template=neva.get("template"),
            image_aspect_ratio=neva.get("image_aspect_ratio"),
            fresh_projector=bool(neva.get("fresh")),
        )


@functools.lru_cache(maxsize=4)
def _projector_program(
    kind: str, widths: tuple[int, int], bias: bool, dtypes: tuple[Any, Any], seed: int
) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, compiled initialisation) of a fresh projector, compiled once per
    process for each shape, dtype and seed (the same program as `sharding.unsharded`)."""

    def make() -> Projector:
        return Projector(
            kind,
            *widths,
            use_bias=bias,
            dtype=dtypes[0],
            param_dtype=dtypes[1],
            rngs=nnx.Rngs(seed),
        )

    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(make))
        lowered = jax.jit(lambda: nnx.state(make())).lower()
    return graphdef, lowered.compile(compiler_options=sharding._init_compiler_options())


def _fresh_projector(cfg: NevaConfig, seed: int, mesh: Mesh | None) -> Projector:
    """The freshly initialised projector of an LLM-only import."""
    if mesh is not None:
        return hf._fresh_projector(cfg, seed, mesh)
    graphdef, init = _projector_program(
        cfg.projector,
        (cfg.vision.hidden_size, cfg.llm.hidden_size),
        cfg.projector_bias,
        (cfg.llm.compute_dtype, cfg.llm.weight_dtype),
        seed,
    )
    return nnx.merge(graphdef, init())


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
    p.add_argument("--projector", help="fresh projector for an LLM-only SRC (default mlp2x_gelu)")
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="stored parameter dtype",
    )
    p.add_argument("--seed", type=int, help="seed of a fresh projector (default 0)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fully unpickle legacy .ckpt files (runs code from the file: trusted sources only)",
    )
    add_conversation_arguments(p)


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
    if not imported.fresh_projector and (args.projector or args.seed is not None):
        raise NemoError(
            f"{args.src}: holds its projector; --projector and --seed are for an LLM-only "
            "checkpoint (whose projector starts fresh)"
        )
    conversation = checkpoint.save_imported(out, imported, args.template, args.image_aspect)
    cfg = imported.config
    print(
        f"wrote {out}: LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size}, vocab "
        f"{cfg.llm.vocab_size}, <image> = {cfg.image_token_id}; vision {cfg.vision.image_size}px; "
        f"projector {cfg.projector}; {conversation} ({time.time() - start:.1f}s)"
    )


SUBCOMMAND = (
    "NeMo checkpoint -> neva-jax model folder",
    IMPORT_HELP,
    add_import_arguments,
    run_import,
)
