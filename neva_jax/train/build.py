"""Putting a run together: mesh, model config, the sharded initial or restored state.

Initialisation order for a fresh run (no checkpoint in the workdir):
1. every parameter is created on its shards with random values (`config.seed`);
2. `model.llm.from_pretrained` (a Hugging Face folder, or a NeMo checkpoint imported
   on the fly) / `model.vision_encoder.from_pretrained` (a Hugging Face CLIP folder)
   replace the decoder / vision tower;
3. `init_from` (a training workdir or step folder, or an imported model folder)
   replaces every parameter it holds. A stage-1 checkpoint holds the trained
   projector and the untouched pretrained LLM and vision tower, so stage 2 starts
   from exactly what stage 1 ended with.
The config's architecture must match what is loaded: every architecture field of
`init_from`'s model (its model_config.json or checkpoint metadata) and of the
`from_pretrained` folders, then every parameter shape; a mismatch is a one-line
ConfigError naming the field (or parameter) and both values, before anything compiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neva_jax import sharding
from neva_jax.convert import checkpoint
from neva_jax.model import parts as model_parts
from neva_jax.model.neva import Neva, NevaConfig
from neva_jax.run_config import ConfigError, RunConfig, check_architecture, mesh_shape
from neva_jax.train import state as state_lib

PyTree = Any


def run_mesh(cfg: RunConfig) -> Mesh:
    """The (data, fsdp, tensor) mesh of `cfg.mesh` over all devices."""
    data, fsdp, tensor = mesh_shape(cfg.mesh, jax.device_count())
    return sharding.make_mesh(data, fsdp, tensor)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(mesh: Mesh, keys: tuple[str, ...]) -> dict[str, NamedSharding]:
    """Every batch array is split over rows along (data, fsdp)."""
    spec = PartitionSpec(("data", "fsdp"))
    return {k: NamedSharding(mesh, spec) for k in keys}


def mesh_info(mesh: Mesh) -> dict[str, Any]:
    """JSON description of the mesh (for checkpoint metadata)."""
    return {
        "shape": {k: int(v) for k, v in mesh.shape.items()},
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }


def model_constructor(ncfg: NevaConfig, seed: int):
    """A zero-argument constructor of the model (for sharded creation / eval_shape)."""
    return lambda: Neva(ncfg, rngs=nnx.Rngs(seed))


def param_shardings(ncfg: NevaConfig, mesh: Mesh) -> tuple[PyTree, PyTree]:
    """(abstract params with shardings, their shardings), as nested dicts."""
    _, abstract = sharding.abstract_sharded(model_constructor(ncfg, 0), mesh)
    params = nnx.to_pure_dict(abstract.filter(nnx.Param))
    return params, jax.tree.map(lambda a: a.sharding, params)


def abstract_train_state(
    ncfg: NevaConfig,
    parts: tuple[str, ...],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    frozen_dtype: str = "",
) -> tuple[nnx.GraphDef, state_lib.TrainState, state_lib.TrainState]:
    """(graphdef, abstract TrainState with shardings, TrainState of shardings); the
    frozen parameters in `frozen_dtype` (`train.frozen_param_dtype`, "" = as built)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        graphdef, shapes = state_lib.abstract(model_constructor(ncfg, 0), parts, tx, frozen_dtype)
    _, param_sh = param_shardings(ncfg, mesh)
    shards = state_lib.shardings(shapes, param_sh, parts, replicated(mesh))
    return graphdef, state_lib.with_shardings(shapes, shards), shards


def _check_shapes(source: str, loaded: Mapping[str, Any], target: Mapping[str, Any]) -> None:
    """Raises ConfigError at the first parameter whose shape differs."""
    flat_t = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    flat_l = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]
    }
    for key, t in flat_t.items():
        if key in flat_l and tuple(flat_l[key].shape) != tuple(t.shape):
            raise ConfigError(
                f"config.init_from={source!r}: parameter {key} has shape "
                f"{tuple(flat_l[key].shape)}, the config builds {tuple(t.shape)}; make model.* "
                "match the checkpoint"
            )


def load_init_params(
    path: str, abstract_params: PyTree, model_config: NevaConfig | None = None
) -> tuple[PyTree, str]:
    """Parameters from `init_from` (a training run or model folder) placed onto
    `abstract_params`' shardings; `model_config` (the run's model) must have the
    source's architecture (`run_config.check_architecture`).

    Returns (nested dict of the parameters the source holds, a description).
    """
    try:
        kind = checkpoint.checkpoint_kind(path)
    except FileNotFoundError:
        kind = None
    if kind not in ("training", "model_folder"):
        raise ConfigError(
            f"config.init_from={path!r}: neither a training workdir/step folder nor a model "
            "folder (model_config.json + params/); import Hugging Face folders with "
            "`python -m neva_jax.convert import-hf`"
        )
    if model_config is not None:
        check_architecture(f"init_from {path!r}", model_config, checkpoint.read_config(path))
    saved = checkpoint.saved_param_shapes(path)
    _check_shapes(path, saved, abstract_params)
    dropped, _ = model_parts.split_dict(_without(saved, abstract_params), (model_parts.ADAPTERS,))
    if jax.tree.leaves(dropped):
        raise ConfigError(
            f"config.init_from={path!r}: the checkpoint holds LoRA adapters that this config "
            "would drop; set model.peft.* as the run that wrote it did, or export it merged "
            "(`convert export-hf`) and import that"
        )
    params, meta = checkpoint.restore_params(path, _subset(abstract_params, saved))
    if kind == "training":
        return params, f"training checkpoint {path} step {meta['step']}"
    return params, f"model folder {path}"


def _adapters(peft: Any) -> str:
    """What a PeftConfig puts on the model, in words (the fields that change its output)."""
    if not peft.enabled:
        return "no LoRA adapters"
    return f"LoRA rank {peft.rank}, scale {peft.scale:g} on {', '.join(peft.projections)}"


def check_adapters(source: str, ours: NevaConfig, saved: NevaConfig) -> None:
    """ConfigError unless the run's LoRA adapters are the checkpoint's (a checkpoint to
    resume or to evaluate: its adapters are restored as they are, none may be dropped or
    rescaled)."""
    theirs, mine = _adapters(saved.peft), _adapters(ours.peft)
    if theirs != mine:
        raise ConfigError(
            f"config.model.peft.*: {source} has {theirs}, this config {mine}; set "
            "model.peft.* as the run that wrote it did"
        )


def config_notes(cfg: RunConfig) -> list[str]:
    """Settings that run but do less than they may seem to, one warning line each."""
    notes = []
    train, peft, parts = cfg.train, cfg.model.peft, cfg.trained_parts
    if parts == ("projector",) and train.projector_lr not in (0.0, train.lr):
        notes.append(
            f"only the projector trains: its lr is train.projector_lr={train.projector_lr:g}; "
            f"train.lr={train.lr:g} is unused"
        )
    param_dtype = cfg.model.llm.param_dtype
    if train.frozen_param_dtype not in ("", param_dtype) and not peft.enabled and len(parts) < 3:
        notes.append(
            f"train.frozen_param_dtype={train.frozen_param_dtype}: the frozen parts are held "
            "and checkpointed in it; a later stage that trains them starts from the rounded "
            "weights"
        )
    if cfg.data.packing and cfg.data.max_images_per_row == 1:
        notes.append(
            "data.packing=True with data.max_images_per_row=1: a row holds one image sample at "
            "most, so image samples are not packed together; raise it (LLaVA-1.5 stage 2: 3)"
        )
    if not peft.enabled:
        default = type(peft)()
        changed = [
            f"model.peft.{f.name}"
            for f in dataclasses.fields(peft)
            if f.name != "scheme" and getattr(peft, f.name) != getattr(default, f.name)
        ]
        if changed:
            notes.append(f"{', '.join(changed)}: no effect with model.peft.scheme=none")
    for part, settings in (("llm", cfg.llm), ("vision_encoder", cfg.vision_encoder)):
        trained = "llm" in parts if part == "llm" else "vision" in parts
        if not trained and not settings.from_pretrained and not cfg.init_from:
            notes.append(
                f"model.{part} is frozen at its random initialisation (no "
                f"model.{part}.from_pretrained or init_from)"
            )
    if train.warmup_steps >= 0 and train.warmup_ratio != type(train)().warmup_ratio:
        notes.append(
            f"train.warmup_ratio={train.warmup_ratio:g} is unused: train.warmup_steps="
            f"{train.warmup_steps} sets the warmup (-1 takes the ratio)"
        )
    if cfg.eval.checkpoint:
        notes.append("eval.checkpoint is read by --mode eval only; training evaluates itself")
    if cfg.data.system_prompt and cfg.data.template == "plain":
        notes.append("data.system_prompt: the plain template renders none")
    if len(cfg.data.weights) == 1:
        notes.append("data.weights with one train file: nothing to weigh")
    if cfg.checkpoint.every_steps > train.steps:
        notes.append(
            f"checkpoint.every_steps={cfg.checkpoint.every_steps} > train.steps={train.steps}: "
            "only the final step is saved"
        )
    return notes


def template_mismatch(init_from: str, template: str) -> str | None:
    """A warning when `init_from` was trained with a conversation template other than
    the run's (stage 1's `plain` aside: stage 2 starts from it by design), else None."""
    trained = checkpoint.read_template(init_from)
    if trained in (None, "plain", template):
        return None
    return (
        f"init_from {init_from} was trained with the {trained!r} conversation template; "
        f"this run renders its data with {template!r}; --config.data.template={trained} "
        "trains with the checkpoint's"
    )


def _without(tree: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `tree` whose keys are not in `target` (nested)."""
    out = {}
    for k, v in tree.items():
        if k not in target:
            out[k] = v
        elif isinstance(v, Mapping) and isinstance(target[k], Mapping):
            rest = _without(v, target[k])
            if rest:
                out[k] = rest
    return out


def _subset(target: Mapping[str, Any], present: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `target` whose keys are in `present` (nested)."""
    out = {}
    for k, v in target.items():
        if k not in present:
            continue
        out[k] = _subset(v, present[k]) if isinstance(v, Mapping) else v
    return out


def _deep_update(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def load_pretrained_parts(cfg: RunConfig, ncfg: NevaConfig, mesh: Mesh) -> PyTree:
    """The LLM and vision tower from `from_pretrained` ({} if unset).

    Both are needed (they are imported together, as `convert import-hf --llm --vision`
    does). The LLM is a Hugging Face folder or, as NeMo's configs allow, a NeMo
    checkpoint (`.nemo`, NeMo 2 folder) imported on the fly as `convert import-nemo
    --vision` does; the imported architecture must match the config's.
    """
    llm_dir, clip_dir = cfg.llm.from_pretrained, cfg.vision_encoder.from_pretrained
    if not llm_dir and not clip_dir:
        return {}
    if not (llm_dir and clip_dir):
        missing = "vision_encoder" if llm_dir else "llm"
        raise ConfigError(
            f"config.model.{missing}.from_pretrained is empty: set both LLM and vision folders, "
            "or import them once with `python -m neva_jax.convert import-hf` and use init_from"
        )
    from neva_jax.convert import hf as convert_hf
    from neva_jax.convert import nemo_import
    from neva_jax.convert.nemo_io import NemoError

    vis = cfg.model.vision
    try:
        if nemo_import.is_nemo_checkpoint(llm_dir):
            imported = nemo_import.import_nemo(
                llm_dir, vision=clip_dir, projector=ncfg.projector, seed=cfg.seed, mesh=mesh
            )
        else:
            imported = convert_hf.import_llm_and_clip(
                llm_dir,
                clip_dir,
                projector=ncfg.projector,
                vision_select_layer=vis.vision_select_layer,
                class_token_length=vis.class_token_length,
                seed=cfg.seed,
                mesh=mesh,
            )
    except (convert_hf.HFImportError, NemoError) as e:
        raise ConfigError(f"config.model.*.from_pretrained: {e}") from None
    got = imported.config  # its decoder and tower against the config's
    theirs = dataclasses.replace(
        ncfg,
        llm=got.llm,
        vision=got.vision,
        image_token_id=got.image_token_id,
        tokenizer_vocab_size=got.tokenizer_vocab_size,
    )
    check_architecture("the from_pretrained folders' config", ncfg, theirs, unset_takes_it=False)
    params = nnx.to_pure_dict(nnx.state(imported.model, nnx.Param))
    logging.info("llm from %s, vision from %s", llm_dir, clip_dir)
    return {"llm": params["llm"], "vision": params["vision"]}


def _covers(tree: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether `tree` has a leaf for every leaf of `target`."""
    for k, v in target.items():
        if k not in tree:
            return False
        if isinstance(v, Mapping) and not (isinstance(tree[k], Mapping) and _covers(tree[k], v)):
            return False
    return True


def initial_state(
    cfg: RunConfig,
    ncfg: NevaConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    abstract: state_lib.TrainState,
    shards: state_lib.TrainState,
) -> state_lib.TrainState:
    """A fresh sharded TrainState: random, then from_pretrained, then init_from.

    When the loaded weights cover every parameter (stage 2 from a stage-1 run, or an
    imported model folder) nothing is initialised at random.
    """
    parts = cfg.trained_parts
    abstract_params = model_parts.merge_dicts(abstract.params, abstract.frozen)
    loaded = load_pretrained_parts(cfg, ncfg, mesh)
    if cfg.init_from:
        init, what = load_init_params(cfg.init_from, abstract_params, ncfg)
        loaded = _deep_update(loaded, init)
        logging.info("init_from: %s", what)
        mismatch = template_mismatch(cfg.init_from, cfg.data.template)
        if mismatch:
            logging.warning("%s", mismatch)
    if _covers(loaded, abstract_params) and not jax.tree.leaves(abstract.other):
        full, other = _subset(loaded, abstract_params), {}
        logging.info(
            "every parameter is loaded: seed=%d draws none (it still seeds dropout); the data "
            "order follows data.seed=%d",
            cfg.seed,
            cfg.data.seed,
        )
    else:
        model = sharding.create_sharded(model_constructor(ncfg, cfg.seed), mesh)
        _, params, frozen, other = model_parts.split_model(model, parts)
        del model
        full = _deep_update(model_parts.merge_dicts(params, frozen), loaded)
    params, frozen = model_parts.split_dict(full, parts)
    frozen = state_lib.cast_frozen(frozen, cfg.train.frozen_param_dtype)
    rep = replicated(mesh)
    opt_state = jax.jit(tx.init, out_shardings=shards.opt_state)(params)

    def zero() -> jax.Array:  # a distinct buffer each (the step donates them)
        return jax.device_put(jnp.zeros((), jnp.int32), rep)

    return state_lib.TrainState(
        step=zero(),
        params=params,
        frozen=frozen,
        other=other,
        opt_state=opt_state,
        nonfinite_count=zero(),
        nonfinite_streak=zero(),
    )


def versions() -> dict[str, str]:
    """Library versions for checkpoint metadata."""
    import sys

    import flax
    import grain
    import optax as optax_mod
    import orbax.checkpoint as ocp

    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax_mod.__version__,
        "orbax-checkpoint": ocp.__version__,
        "grain": getattr(grain, "__version__", "?"),
    }


def run_meta(cfg: RunConfig, ncfg: NevaConfig, mesh: Mesh, **extra: Any) -> dict[str, Any]:
    """The JSON `meta` item of a checkpoint."""
    from neva_jax.config import to_dict
    from neva_jax.model.neva import config_to_dict

    return {
        "config": to_dict(cfg),
        "model_config": config_to_dict(ncfg),
        "trained_parts": list(cfg.trained_parts),
        "versions": versions(),
        "mesh": mesh_info(mesh),
        **extra,
    }
