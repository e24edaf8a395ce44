"""Model folders: save an imported/exported `Neva`, and load any folder a user points at.

A model folder (docs/CONTRACTS.md "Checkpoint folders"):
  model_config.json         NevaConfig as JSON (`neva.config_to_dict`)
  params/                   Orbax checkpoint of the parameter State as a nested dict
  tokenizer/                Hugging Face tokenizer files, `<image>` included
  preprocessor_config.json  the image processor, when the source had one

`load_model(path, mesh=None)` accepts a model folder, a llava-hf folder (imported
on the fly), or a training workdir / step folder (read through
`neva_jax.train.checkpoint`, which owns that format).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from neva_jax import platform
from neva_jax.convert import hf
from neva_jax.model import neva
from neva_jax.model.neva import Neva, NevaConfig

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
PREPROCESSOR = "preprocessor_config.json"


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


def save_model(
    out: str | Path,
    model: Neva,
    *,
    tokenizer: Any | None = None,
    preprocessor_config: dict[str, Any] | None = None,
) -> Path:
    """Writes `model` as a model folder at `out` (which must not exist or be empty).

    The folder is written next to `out` under a temporary name and renamed when
    complete, so a crash never leaves a half-written folder at `out`.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new output folder")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / MODEL_CONFIG).write_text(json.dumps(neva.config_to_dict(model.config), indent=2) + "\n")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # Synchronous: an async save would first copy every array to host memory.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp / PARAMS, args=ocp.args.StandardSave(params))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER))
    if preprocessor_config is not None:
        (tmp / PREPROCESSOR).write_text(json.dumps(preprocessor_config, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _detect(path: Path) -> str:
    """The kind of folder at `path`; the trainer adds workdir/step kinds here."""
    if (path / MODEL_CONFIG).exists() and (path / PARAMS).is_dir():
        return "model_folder"
    config = path / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "llava":
        return "llava_hf"
    raise FileNotFoundError(
        f"{path}: neither a neva-jax model folder ({MODEL_CONFIG} + {PARAMS}/) nor a llava-hf "
        "folder (config.json with model_type 'llava')"
    )


def read_config(path: str | Path) -> NevaConfig:
    """The NevaConfig stored in model folder `path`."""
    return neva.config_from_dict(json.loads((Path(path) / MODEL_CONFIG).read_text()))


def restore_params(params_dir: str | Path, cfg: NevaConfig, mesh: Mesh | None = None) -> Neva:
    """A `Neva(cfg)` whose parameters are restored from the Orbax folder `params_dir`,
    each straight onto its shards (`mesh`) or the first device."""
    graphdef, abstract = hf.abstract_model(cfg, mesh)
    target = nnx.to_pure_dict(abstract)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            Path(params_dir).absolute(), args=ocp.args.StandardRestore(target)
        )
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def load_model(
    path: str | Path, mesh: Mesh | None = None, **runtime: Any
) -> tuple[Neva, ModelInfo]:
    """Loads a model folder or a llava-hf folder; `runtime` sets `neva.RUNTIME_FIELDS`
    (compute dtype, attention implementation, ...) on the loaded config, the others
    take this backend's choices (`platform.resolve_runtime`)."""
    path = Path(path)
    runtime = platform.resolve_runtime(**runtime)  # this backend's choices, once
    # Imported lazily: the training checkpoint format lives with the trainer.
    from neva_jax.train import checkpoint as train_checkpoint

    if train_checkpoint.is_training_checkpoint(str(path)):
        model, found = train_checkpoint.restore_model_from_workdir(str(path), mesh, **runtime)
        data = found["config"].get("data", {}) if isinstance(found["config"], dict) else {}
        info = ModelInfo(
            path,
            "training",
            found["model_config"],
            Path(found["tokenizer"]) if found["tokenizer"] else None,
            None,
            found["step"],
            template=data.get("template"),
            image_aspect_ratio=data.get("image_aspect_ratio"),
        )
        return model, info
    kind = _detect(path)
    if kind == "llava_hf":
        imported = hf.import_llava(path, mesh=mesh, **runtime)
        tokenizer_path = path if imported.tokenizer is not None else None
        info = ModelInfo(path, kind, imported.config, tokenizer_path, imported.preprocessor_config)
        return imported.model, info
    cfg = neva.with_runtime(read_config(path), **runtime)
    model = restore_params(path / PARAMS, cfg, mesh)
    tokenizer_path = path / TOKENIZER if (path / TOKENIZER).is_dir() else None
    pre = path / PREPROCESSOR
    preprocessor = json.loads(pre.read_text()) if pre.exists() else None
    return model, ModelInfo(path, kind, cfg, tokenizer_path, preprocessor)
