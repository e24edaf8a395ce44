"""Every checkpoint kind a user can point at, read into a model: the one restore path.

Kinds (docs/CONTRACTS.md "Checkpoint folders"):
- a model folder (`convert import-hf` output, `save_model`):
    model_config.json         NevaConfig as JSON (`neva.config_to_dict`)
    params/                   Orbax checkpoint of the parameters as a nested dict
    tokenizer/                Hugging Face tokenizer files, `<image>` included
    preprocessor_config.json  the image processor, when the source had one
    conversation.json         the conversation template and image aspect mode the
                              weights were trained with, when the source named them
- a training run: its workdir, its `checkpoints/` folder or a step folder
  `checkpoints/STEP/{state,meta,data_iter}` (written by `neva_jax.train.checkpointer`,
  which owns writing and resuming; the layout constants live here);
- a llava-hf folder (imported on the fly).

    load_model(path, mesh=None, **runtime) -> (Neva, ModelInfo)   any kind
    restore_params(path, target=None) -> (params, meta)            a training run or model folder
    saved_param_shapes(path)                                        what restore_params would read
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from neva_jax import platform
from neva_jax.convert import hf
from neva_jax.convert.weights import written_folder
from neva_jax.data.image import ASPECT_MODES
from neva_jax.model import neva
from neva_jax.model.neva import Neva, NevaConfig

PyTree = Any
MODEL_CONFIG = "model_config.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
PREPROCESSOR = "preprocessor_config.json"
# {"template": ..., "image_aspect_ratio": ...}: what generate and serve default to.
CONVERSATION = "conversation.json"
# A training run: WORKDIR/checkpoints/STEP/{state,meta,data_iter}, WORKDIR/tokenizer.
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "meta", "data_iter")
# Files Orbax writes last, on commit: a step folder without them never finished.
STEP_COMMIT_FILE = "_CHECKPOINT_METADATA"
ITEM_COMMIT_FILES = {"state": "_METADATA", "meta": "metadata"}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `load_model` found besides the model."""

    path: Path
    kind: str  # "model_folder" | "llava_hf" | "training"
    config: NevaConfig
    tokenizer_path: Path | None  # a folder for `AutoTokenizer.from_pretrained`
    preprocessor_config: dict[str, Any] | None
    step: int | None = None  # training step, for checkpoints that have one
    template: str | None = None  # conversation template the run trained with
    image_aspect_ratio: str | None = None  # square | pad | keep, as trained


# ---------------------------------------------------------------------------- training runs


def is_complete_step(step_dir: str) -> bool:
    """Whether `step_dir` holds a committed checkpoint (state and meta written)."""
    if not os.path.isfile(os.path.join(step_dir, STEP_COMMIT_FILE)):
        return False
    return all(
        os.path.isfile(os.path.join(step_dir, item, name))
        for item, name in ITEM_COMMIT_FILES.items()
    )


def complete_steps(ckpt_dir: str) -> list[int]:
    """Sorted steps under `ckpt_dir` whose folders are complete."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        int(n)
        for n in os.listdir(ckpt_dir)
        if n.isdigit() and is_complete_step(os.path.join(ckpt_dir, n))
    )


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(checkpoints folder, step) for a workdir, a `checkpoints/` folder or a step folder.

    A workdir or `checkpoints/` folder resolves to its newest complete step.
    Raises FileNotFoundError with a one-line message when there is none.
    """
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip("/"))
    if name.isdigit() and os.path.isdir(path):
        if not is_complete_step(path):
            raise FileNotFoundError(f"{path}: checkpoint step folder is incomplete")
        return os.path.dirname(path), int(name)
    ckpt_dir = path
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {CHECKPOINT_DIR}/STEP/)")
    return ckpt_dir, steps[-1]


def read_meta(path: str) -> dict[str, Any]:
    """The JSON `meta` item (config, model_config, versions, mesh) of a training checkpoint."""
    ckpt_dir, step = resolve_checkpoint(path)
    with open(os.path.join(ckpt_dir, str(step), "meta", ITEM_COMMIT_FILES["meta"])) as f:
        meta = json.load(f)
    meta.setdefault("step", step)
    return meta


# ---------------------------------------------------------------------------- any kind


def checkpoint_kind(path: str | Path) -> str:
    """ "training", "model_folder" or "llava_hf"; FileNotFoundError (one line) otherwise.

    A folder is judged by what it holds, not by its name (a model folder may be called
    `2024`): a model folder's files, a llava-hf `config.json`, then a training run's
    checkpoints (a workdir, its `checkpoints/` or one step folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / MODEL_CONFIG).exists() and (path / PARAMS).is_dir():
        return "model_folder"
    config = path / "config.json"
    if config.exists():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError) as e:
            raise FileNotFoundError(f"{config}: not a readable config.json ({e})") from None
        if model_type == "llava":
            return "llava_hf"
    step_like = path.name.isdigit() and (
        path.parent.name == CHECKPOINT_DIR or any((path / item).is_dir() for item in ITEMS)
    )
    if step_like:  # a step folder: complete, or say why not
        resolve_checkpoint(str(path))
        return "training"
    try:
        resolve_checkpoint(str(path))
        return "training"
    except FileNotFoundError:
        pass
    if (path / CHECKPOINT_DIR).is_dir() or path.name == CHECKPOINT_DIR:
        raise FileNotFoundError(
            f"{path}: a training run with no complete checkpoint yet ({CHECKPOINT_DIR}/STEP/ "
            "appears when the first save commits)"
        )
    raise FileNotFoundError(
        f"{path}: not a training workdir or step folder ({CHECKPOINT_DIR}/STEP/), a neva-jax "
        f"model folder ({MODEL_CONFIG} + {PARAMS}/) or a llava-hf folder (config.json with "
        "model_type 'llava')"
    )


def _params_dir(path: str | Path) -> tuple[str, bool]:
    """(Orbax folder, whether the parameters are its whole tree) of a run or model folder."""
    if checkpoint_kind(path) == "training":
        ckpt_dir, step = resolve_checkpoint(str(path))
        return os.path.join(ckpt_dir, str(step), "state"), False
    return os.path.join(os.path.abspath(path), PARAMS), True


def saved_param_shapes(path: str | Path) -> PyTree:
    """ShapeDtypeStructs of the parameters a training run or model folder holds (no data read)."""
    directory, root = _params_dir(path)
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        tree if root else tree["params"],
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def restore_params(path: str | Path, target: PyTree = None) -> tuple[PyTree, dict[str, Any]]:
    """The parameters saved at `path` (a training run or model folder) and its metadata.

    `target` (ShapeDtypeStructs with shardings, a nested dict) says which parameters
    to read and where to place them; it may be a subset of what is saved. None reads
    every parameter as saved onto the first device. The metadata is the training
    checkpoint's `meta` item, or {"model_config": ...} for a model folder.
    """
    directory, root = _params_dir(path)
    if target is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), saved_param_shapes(path)
        )
    item = target if root else {"params": target}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            directory,
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
    if root:
        return restored, {"model_config": json.loads((Path(path) / MODEL_CONFIG).read_text())}
    return restored["params"], read_meta(str(path))


def read_config(path: str | Path) -> NevaConfig:
    """The NevaConfig of a training run or model folder."""
    if checkpoint_kind(path) == "training":
        return neva.config_from_dict(read_meta(str(path))["model_config"])
    return neva.config_from_dict(json.loads((Path(path) / MODEL_CONFIG).read_text()))


def read_template(path: str | Path) -> str | None:
    """The conversation template a training run or model folder was trained with (its
    run config's `data.template`; a folder's `conversation.json`), or None."""
    if checkpoint_kind(path) == "training":
        return read_meta(str(path)).get("config", {}).get("data", {}).get("template")
    return read_conversation(path).get("template")


def load_model(
    path: str | Path, mesh: Mesh | None = None, **runtime: Any
) -> tuple[Neva, ModelInfo]:
    """Loads any checkpoint kind (see the module doc) into a `Neva`, each parameter
    straight onto its shards (`mesh`) or the first device; `runtime` sets
    `neva.RUNTIME_FIELDS` (compute dtype, attention implementation, ...), the others
    take this backend's choices (`platform.resolve_runtime`)."""
    path = Path(path)
    runtime = platform.resolve_runtime(**runtime)  # this backend's choices, once
    kind = checkpoint_kind(path)
    if kind == "llava_hf":
        imported = hf.import_llava(path, mesh=mesh, **runtime)
        tokenizer_path = path if imported.tokenizer is not None else None
        info = ModelInfo(
            path,
            kind,
            imported.config,
            tokenizer_path,
            imported.preprocessor_config,
            template=imported.template,
            image_aspect_ratio=imported.image_aspect_ratio,
        )
        return imported.model, info
    cfg = neva.with_runtime(read_config(path), **runtime)
    graphdef, abstract = hf.abstract_neva(cfg, mesh)
    params, meta = restore_params(path, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    if kind == "model_folder":
        tokenizer = path / TOKENIZER
        pre = path / PREPROCESSOR
        preprocessor = json.loads(pre.read_text()) if pre.exists() else None
        conv = read_conversation(path)
        info = ModelInfo(
            path,
            kind,
            cfg,
            tokenizer if tokenizer.is_dir() else None,
            preprocessor,
            template=conv.get("template"),
            image_aspect_ratio=conv.get("image_aspect_ratio"),
        )
        return model, info
    ckpt_dir, step = resolve_checkpoint(str(path))
    tokenizer = Path(ckpt_dir).parent / TOKENIZER
    data = meta.get("config", {}).get("data", {})
    info = ModelInfo(
        path,
        kind,
        cfg,
        tokenizer if tokenizer.is_dir() else None,
        None,
        step,
        template=data.get("template"),
        image_aspect_ratio=data.get("image_aspect_ratio"),
    )
    return model, info


# ---------------------------------------------------------------------------- model folders


def save_model(
    out: str | Path,
    model: Neva,
    *,
    tokenizer: Any | None = None,
    preprocessor_config: dict[str, Any] | None = None,
    template: str | None = None,
    image_aspect_ratio: str | None = None,
) -> Path:
    """Writes `model` as a model folder at `out` (which must not exist or be empty).

    `tokenizer`: a `transformers` tokenizer, a neva-jax `TextTokenizer` (its `.hf`) or a
    tokenizer folder (copied). `template` / `image_aspect_ratio`: the conversation
    template and image aspect mode
    the weights were trained with, when known (`conversation.json`; generate and serve
    default to them).

    The folder is written next to `out` under a temporary name and renamed when
    complete, so a crash never leaves a half-written folder at `out`.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output folder")
    conversation = _conversation(template, image_aspect_ratio)
    hf_tokenizer = getattr(tokenizer, "hf", tokenizer)  # a TextTokenizer holds one
    if isinstance(tokenizer, str | Path):
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"tokenizer {tokenizer}: not a folder")
    elif tokenizer is not None and not hasattr(hf_tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer: expected a transformers tokenizer, a TextTokenizer or a folder, got "
            f"{type(tokenizer).__name__}"
        )
    with written_folder(out) as tmp:
        (tmp / MODEL_CONFIG).write_text(
            json.dumps(neva.config_to_dict(model.config), indent=2) + "\n"
        )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # Synchronous: an async save would first copy every array to host memory.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(tmp / PARAMS, args=ocp.args.StandardSave(params))
        if isinstance(tokenizer, str | Path):
            shutil.copytree(tokenizer, tmp / TOKENIZER)
        elif tokenizer is not None:
            hf_tokenizer.save_pretrained(str(tmp / TOKENIZER))
        if preprocessor_config is not None:
            (tmp / PREPROCESSOR).write_text(json.dumps(preprocessor_config, indent=2) + "\n")
        if conversation:
            (tmp / CONVERSATION).write_text(json.dumps(conversation, indent=2) + "\n")
    return out


def _conversation(template: str | None, image_aspect_ratio: str | None) -> dict[str, str]:
    """The checked `conversation.json` contents (known names only; None keys left out)."""
    from neva_jax.data.conversation import TEMPLATES

    out = {}
    if template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r}: unknown; use one of {', '.join(TEMPLATES)}")
        out["template"] = template
    if image_aspect_ratio is not None:
        if image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(
                f"image aspect ratio {image_aspect_ratio!r}: use one of {', '.join(ASPECT_MODES)}"
            )
        out["image_aspect_ratio"] = image_aspect_ratio
    return out


def read_conversation(folder: str | Path) -> dict[str, str]:
    """A model folder's `conversation.json` ({} when absent), checked as `save_model`
    writes it, so a hand-edited typo fails here with the file's name."""
    path = Path(folder) / CONVERSATION
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"template", "image_aspect_ratio"}:
        raise ValueError(f"{path}: expected an object with template and image_aspect_ratio")
    try:
        return _conversation(data.get("template"), data.get("image_aspect_ratio"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_imported(
    out: str | Path,
    imported: hf.Imported,
    template: str | None = None,
    image_aspect: str | None = None,
) -> str:
    """Writes an import (`import-hf`, `import-nemo`) as a model folder, `template` /
    `image_aspect` (the import commands' flags) over what the source names; a NeMo 1
    sentencepiece model is kept as `tokenizer/tokenizer.model` for a NeMo 1 export.
    Returns the summary's words on the conversation."""
    template = template or imported.template
    aspect = image_aspect or imported.image_aspect_ratio
    out = save_model(
        out,
        imported.model,
        tokenizer=imported.tokenizer,
        preprocessor_config=imported.preprocessor_config,
        template=template,
        image_aspect_ratio=aspect,
    )
    sp_model = getattr(imported.tokenizer, "nemo_sentencepiece_model", None)
    if sp_model is not None:
        (out / TOKENIZER / "tokenizer.model").write_bytes(sp_model)
    return f"template {template or 'not named (generate/serve: --template, else vicuna_v1)'}" + (
        f", images {aspect}" if aspect else ""
    )
