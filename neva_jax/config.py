"""Experiment configuration: an ml_collections ConfigDict -> one typed, validated `RunConfig`.

Experiment files (`configs/*.py`) build a ConfigDict with `get_config(arg)`, starting
from `default_config()`. The entry point converts it here, once, into a `RunConfig`
and checks it before any model is built or any function compiled. Every problem is a
`ConfigError` whose message is one line naming the key and what would fix it;
`neva_jax.main` turns it into exit status 2. No code below this module reads a
ConfigDict.

The architecture has one schema, the model's own config dataclasses: `RunConfig.model`
is a `NevaConfig` (holding `LlamaConfig` and `ClipConfig`). ConfigDict keys keep
NeMo's names (docs/DESIGN.md "Configuration"):

  model.llm.<name>             LlamaConfig fields made with `schema.key()`
  model.vision_encoder.<name>  ClipConfig fields made with `schema.key()`
  model.<name>                 NevaConfig fields made with `schema.key()`
  model.peft.<name>            PeftConfig fields (LoRA adapters, model/lora.py)
  model.llm.<name>             also `LlmSettings` (from_pretrained, freeze, ...) -> RunConfig.llm
  model.vision_encoder.<name>  also `VisionSettings` -> RunConfig.vision_encoder
  RUNTIME_KEYS / model.<name>  the run-time model fields (`neva.RUNTIME_FIELDS`), both parts
  <section>.<name>             the other sections' fields; data.<name>: `DataConfig`'s

`_keys()` builds that table from the dataclasses; conversion, defaults, presets and
`to_dict` all go through it. The typed side and its rules are `neva_jax.run_config`.

Unset keys. `default_config()` leaves every architecture key (`model.*` but the
run-time ones), `data.template` and `model.llm.model_type` (llama_2 when unset) at
None, "unset". An unset architecture key takes
the value of `init_from`'s model (its `model_config.json` or checkpoint metadata)
when `init_from` names one, else the default architecture (`run_config.default_model`,
the seed's NeVA); a set key must equal `init_from`'s value (a one-line ConfigError
naming the key and both values otherwise). An unset `data.template` is the one
`init_from` was trained with (its run's `data.template`, a model folder's
`conversation.json`; not stage 1's `plain`) unless `model.llm.model_type` is set, else
the one NeMo selects with `model.llm.model_type`
(`data.conversation.MODEL_TYPE_TEMPLATES`). A preset
(`model_preset`) sets every architecture key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from neva_jax.data.config import DataConfig
from neva_jax.data.conversation import MODEL_TYPE_TEMPLATES
from neva_jax.model import neva
from neva_jax.model.neva import NevaConfig
from neva_jax.model.schema import FieldError, keys
from neva_jax.run_config import (
    ConfigError,
    RunConfig,
    check,
    check_architecture,
    default_model,
)

# The model's parts: ConfigDict section -> (NevaConfig field, RunConfig field of its other
# knobs, or None).
MODEL_PARTS = {
    "llm": ("llm", "llm"),
    "vision_encoder": ("vision", "vision_encoder"),
    "peft": ("peft", None),
}
# Run-time model fields (`neva.RUNTIME_FIELDS`) whose key is not `model.<field>`.
RUNTIME_KEYS = {
    "dtype": "precision.compute_dtype",
    "param_dtype": "precision.param_dtype",
    "attention_impl": "attention.implementation",
    "remat_policy": "remat.policy",
}
# Keys that moved, with what to set instead.
_MOVED = {"data.batch_size": "set train.batch_size (the global batch)"}
# Sections built field by field from ConfigDict sections of the same name.
_SECTIONS = ("mesh", "remat", "train", "eval", "checkpoint", "distributed", "plan")


# ----------------------------------------------------------------------------------------
# The key table: ConfigDict key -> where its value lives in RunConfig.


@dataclasses.dataclass(frozen=True)
class _Slot:
    paths: tuple[tuple[str, ...], ...]  # attribute paths in RunConfig (several: both parts)
    annotation: Any


@functools.cache
def _keys() -> dict[str, _Slot]:
    out: dict[str, _Slot] = {}
    run_hints = typing.get_type_hints(RunConfig)

    def add_fields(prefix: str, cls: type, path: tuple[str, ...], names: Any = None) -> None:
        hints = typing.get_type_hints(cls)
        for name in names if names is not None else [f.name for f in dataclasses.fields(cls)]:
            out[f"{prefix}{name}"] = _Slot(((*path, name),), hints[name])

    model = default_model()
    for section, (part, settings) in MODEL_PARTS.items():
        part_cls = type(getattr(model, part))
        add_fields(f"model.{section}.", part_cls, ("model", part), keys(part_cls))
        if settings is not None:
            add_fields(f"model.{section}.", run_hints[settings], (settings,))
    add_fields("model.", NevaConfig, ("model",), keys(NevaConfig))
    llm_hints = typing.get_type_hints(type(model.llm))
    for name in neva.RUNTIME_FIELDS:
        if name in neva.PLATFORM_FIELDS:
            continue
        paths = tuple(("model", part, name) for part in ("llm", "vision"))
        out[RUNTIME_KEYS.get(name, f"model.{name}")] = _Slot(paths, llm_hints[name])
    for section in _SECTIONS:
        add_fields(f"{section}.", run_hints[section], (section,))
    data_fields = [f.name for f in dataclasses.fields(DataConfig) if f.name != "batch_size"]
    add_fields("data.", DataConfig, ("data",), data_fields)
    add_fields("", RunConfig, (), ["seed", "init_from"])
    return out


@functools.cache
def _architecture_keys() -> frozenset[str]:
    """The model keys that describe the architecture (init_from can supply them): not
    the run-time fields, nor the adapters (the run's choice, not init_from's)."""
    return frozenset(
        k
        for k, slot in _keys().items()
        if slot.paths[0][0] == "model"
        and slot.paths[0][-1] not in neva.RUNTIME_FIELDS
        and slot.paths[0][1] != "peft"
    )


@functools.cache
def _unset_keys() -> frozenset[str]:
    """The keys `default_config()` leaves unset (None): see the module doc."""
    return _architecture_keys() | {"data.template", "model.llm.model_type"}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _set_path(tree: Any, parts: list[str], value: Any) -> None:
    for name in parts[:-1]:
        if name not in tree:
            tree[name] = {} if isinstance(tree, dict) else ml_collections.ConfigDict()
        tree = tree[name]
    tree[parts[-1]] = value


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, tuple | list) else v


def _unknown_key(key: str) -> ConfigError:
    head, _, last = key.rpartition(".")
    known = [k.rpartition(".")[2] for k in _keys() if k.rpartition(".")[0] == head]
    if not known:  # an unknown section: name the top-level ones
        head, known = "", sorted({k.split(".")[0] for k in _keys()})
        last = key.split(".")[0]
    close = difflib.get_close_matches(last, known, n=1)
    hint = f"did you mean {head + '.' if head else ''}{close[0]}?" if close else ""
    return ConfigError(
        f"config.{key}: unknown key; {hint or 'known keys: ' + ', '.join(sorted(known))}"
    )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks/converts one value to the field's annotated type."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType):
        # ml_collections hands `--config.KEY=None` over as the string 'None' where the
        # default is None (a system prompt "None" would be trained otherwise).
        if (value is None or value == "None") and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _coerce(key, value, rest[0])
        # e.g. str | tuple[str, ...]: the first that takes it, the tuple first (None is
        # "none of them" there, while a str field takes None as "").
        for option in sorted(rest, key=lambda a: typing.get_origin(a) is not tuple):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in rest)
        raise ConfigError(f"config.{key}={value!r}: expected {names}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif typing.get_origin(annotation) is tuple:
        if value is None or (isinstance(value, tuple | list) and list(value) == [None]):
            return ()  # `--config.data.eval_files=None`: none (ml_collections gives (None,))
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, tuple | list):
            (item,) = {a for a in args if a is not Ellipsis}
            return tuple(_coerce(key, v, item) for v in value)
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    article = "an" if name[:1] in "aeiou" else "a"
    raise ConfigError(f"config.{key}={value!r}: expected {article} {name}")


def _values(cd: Any) -> dict[str, Any]:
    """{key: value} of every key `cd` sets, checked against the key table and coerced."""
    if isinstance(cd, ml_collections.ConfigDict):
        cd = cd.to_dict()
    if not isinstance(cd, Mapping):
        raise ConfigError(f"config: expected a ConfigDict, got {type(cd).__name__}")
    table, out = _keys(), {}

    def walk(tree: Mapping[str, Any], prefix: str) -> None:
        for name, value in tree.items():
            key = prefix + name
            if key in _MOVED:
                raise ConfigError(f"config.{key}: {_MOVED[key]}")
            if key in table:
                if value is None and key in _unset_keys():
                    continue  # unset: init_from's value, the default, or model_type's
                out[key] = _coerce(key, value, table[key].annotation)
            elif any(k.startswith(key + ".") for k in table):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config.{key}: expected a section (a ConfigDict)")
                walk(value, key + ".")
            else:
                raise _unknown_key(key)

    walk(cd, "")
    return out


def _assemble(obj: Any, changes: Mapping[tuple[str, ...], Any]) -> Any:
    """`obj` with `changes` (attribute path -> value): each dataclass is built once."""
    direct = {p[0]: v for p, v in changes.items() if len(p) == 1}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in changes.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        direct[name] = _assemble(getattr(obj, name), sub)
    return dataclasses.replace(obj, **direct) if direct else obj


def _init_source(path: str) -> tuple[NevaConfig, str | None] | None:
    """The architecture and conversation template of `init_from` (a training run or
    model folder), or None when it names none (unset, not here: `--mode plan` for
    another machine, or another kind)."""
    if not path or not os.path.exists(path):
        return None
    from neva_jax.convert import checkpoint  # reads model_config.json / checkpoint meta

    try:
        if checkpoint.checkpoint_kind(path) not in ("training", "model_folder"):
            return None
        return checkpoint.read_config(path), checkpoint.read_template(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"config.init_from={path!r}: {str(e).splitlines()[0]}") from None


def _build(values: Mapping[str, Any]) -> RunConfig:
    """The RunConfig with these key values; unset keys as the module doc says."""
    changes = {path: value for key, value in values.items() for path in _keys()[key].paths}
    base = RunConfig()
    source, source_template = _init_source(values.get("init_from", "")) or (None, None)
    if source is not None:  # unset architecture keys take init_from's values
        runtime = {f: getattr(base.model.llm, f) for f in neva.RUNTIME_FIELDS}
        base = dataclasses.replace(base, model=neva.with_runtime(source, **runtime))
    else:  # the image id: a placeholder (the last id) until the tokenizer is known
        vocab = changes.get(("model", "llm", "vocab_size"), base.model.llm.vocab_size)
        changes[("model", "image_token_id")] = vocab - 1
    if not values.get("data.template"):
        model_type = values.get("model.llm.model_type")
        if model_type is None and source_template not in (None, "plain"):
            changes[("data", "template")] = source_template  # what init_from was trained with
        else:  # NeMo: conv_template follows model_type
            model_type = model_type or base.llm.model_type
            changes[("data", "template")] = MODEL_TYPE_TEMPLATES.get(model_type, base.data.template)
    try:
        cfg = _assemble(base, changes)
        if source is not None:
            check_architecture(f"init_from {values['init_from']!r}", cfg.model, source)
        return cfg
    except FieldError as e:
        if e.field in neva.RUNTIME_FIELDS:
            key = RUNTIME_KEYS.get(e.field, f"model.{e.field}")
        else:
            key = f"{e.section}.{e.field}"
        raise ConfigError(f"config.{key}={e.value!r}: {e.problem}") from None
    except (TypeError, ValueError) as e:  # DataConfig's own conversions
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.data: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------
# ConfigDicts: defaults, presets, recipes.


def default_config() -> ml_collections.ConfigDict:
    """A ConfigDict holding every key with its default; experiment files start from it.

    With `lock_config=True` only existing keys can be set, so every knob is here. The
    architecture keys, `data.template` and `model.llm.model_type` are unset (None): see
    the module doc.
    """
    cd = ml_collections.ConfigDict()
    default = RunConfig()
    for key, slot in _keys().items():
        value = None if key in _unset_keys() else _get(default, slot.paths[0])
        if value is None:
            kinds = typing.get_args(slot.annotation) or (slot.annotation,)
            kind = next(a for a in kinds if a is not type(None))
            value = ml_collections.FieldReference(None, field_type=kind)
        _set_path(cd, key.split("."), value)
    return cd


def set_model(cd: ml_collections.ConfigDict, model: NevaConfig) -> None:
    """Writes the architecture of `model` into `cd`'s model keys (in place; run-time
    fields and adapters are left as they are)."""
    for key, slot in _keys().items():  # in the key table's order
        if key in _architecture_keys():
            _set_path(cd, key.split("."), _get(model, slot.paths[0][1:]))


def model_preset(cd: ml_collections.ConfigDict, name: str) -> None:
    """Sets `cd`'s architecture to `neva_jax.model.neva.PRESETS[name]` (in place)."""
    if name not in neva.PRESETS:
        raise ConfigError(f"model preset {name!r}: unknown; known: {', '.join(neva.PRESETS)}")
    set_model(cd, neva.PRESETS[name]())


def model_config(cd: ml_collections.ConfigDict) -> NevaConfig:
    """The architecture `cd` describes (its model keys only); raises ConfigError."""
    values = {
        k: v
        for k, v in _values(cd).items()
        if _keys()[k].paths[0][0] == "model" or k in ("init_from", "model.llm.model_type")
    }
    return _build(values).model


def llava_recipe(cd: ml_collections.ConfigDict, *, stage2: bool, data_dir: str, init: str) -> None:
    """LLaVA-1.5's two-stage hyperparameters (docs/REFERENCE.md "Recipes") on `cd` (in place).

    Stage 1: `plain` captions (LLaVA-Pretrain 558K), projector only, batch 256, lr 1e-3.
    Stage 2: instruction data (llava_v1_5_mix665k), projector + LLM, lr 2e-5, packed
    rows of 2048 tokens (48 rows ~ LLaVA's 128 samples per step).
    Both: 1 epoch, warmup 3 % (rounded up), cosine to 0, no weight decay, the loss
    averaged per micro-batch and device (`micro_batch`), bf16 compute, fp32 master
    weights. `data_dir` holds the LLaVA layout; `init` is `init_from` (an imported model
    folder for stage 1, the stage-1 workdir for stage 2), whose `tokenizer/` is used.
    """
    cd.model.llm.freeze = not stage2
    cd.init_from = init
    data = cd.data
    if stage2:
        data.train_files = (os.path.join(data_dir, "llava_v1_5_mix665k.json"),)
        data.image_folder = data_dir
        data.image_aspect_ratio = "pad"
    else:
        data.train_files = (
            os.path.join(data_dir, "LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json"),
        )
        data.image_folder = os.path.join(data_dir, "LLaVA-Pretrain", "images")
        data.template = "plain"
    data.tokenizer = os.path.join(init, "tokenizer") if init else ""
    # Stage 1 rows are one image + a short caption; stage 2 packs ~3 samples per row.
    data.max_seq_len = 2048 if stage2 else model_config(cd).num_image_tokens + 128
    data.packing = stage2
    data.group_by_modality_length = stage2  # LLaVA-1.5 stage 2: all-image or all-text batches
    data.max_images_per_row = 3 if stage2 else 1
    data.num_workers = 8
    t = cd.train
    # One epoch: 558,128 captions / 256; 665,298 conversations packed ~2.8 per row / 48
    # rows (~134 samples per step, LLaVA's 128); data_report.json shows the real packing.
    t.batch_size, t.lr, t.steps = (48, 2e-5, 5000) if stage2 else (256, 1e-3, 2181)
    t.warmup_ratio, t.min_lr, t.weight_decay, t.grad_clip = 0.03, 0.0, 0.0, 1.0
    # HF Trainer (LLaVA) and NeMo average token means per micro-batch and device.
    t.loss_normalization = "micro_batch"
    t.logits_fraction = 0.5 if stage2 else 0.125  # speed only; exact either way
    cd.remat.policy = "full" if stage2 else "selective"
    cd.checkpoint.every_steps = 500
    cd.checkpoint.keep = 2


LORA_RECIPES = {
    # LLaVA-1.5 scripts/v1_5/finetune_lora.sh: r 128, alpha 256, dropout 0.05, every
    # linear of the LLM but lm_head, PEFT's init; lr 2e-4, mm_projector_lr 2e-5.
    "llava": dict(
        rank=128, alpha=256.0, dropout=0.05, target_modules=("all_linear",), a_init="kaiming"
    ),
    # NeMo 1.x NeVA PEFT (peft_scheme lora): adapter_dim 32, alpha = dim, no dropout,
    # attention_qkv, xavier column init; lr 2e-4, the projector at 0.1x.
    "nemo": dict(
        rank=32, alpha=32.0, dropout=0.0, target_modules=("attention_qkv",), a_init="xavier"
    ),
}


def lora_recipe(cd: ml_collections.ConfigDict, style: str) -> None:
    """Turns a stage-2 config into LoRA stage 2 (in place): the LLM frozen in bf16 with
    adapters (LORA_RECIPES[style]: `llava` or `nemo`) and the projector training, lr 2e-4,
    projector lr 2e-5 (docs/LORA.md)."""
    for name, value in LORA_RECIPES[style].items():
        cd.model.peft[name] = value
    cd.model.peft.scheme = "lora"
    cd.model.llm.freeze = False  # the LLM learns, through its adapters alone
    cd.train.lr, cd.train.projector_lr = 2e-4, 2e-5
    cd.train.frozen_param_dtype = "bfloat16"


def parse_arg(arg: str | None, variants: tuple[str, ...] = (), **defaults: Any) -> dict[str, Any]:
    """`get_config` arguments: 'stage1,data_dir=/x' -> {'variant': 'stage1', 'data_dir': '/x'}.

    The bare word is the variant, one of `variants` when they are given (a config
    file's stages, the first the default: a typo must not silently run another);
    `key=value` pairs
    override `defaults` (values keep the type of the default). An unknown variant or
    key, or a second bare word, is a ConfigError.
    """
    out = dict(defaults)
    if variants:
        out.setdefault("variant", variants[0])
    named = None
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            if named is not None:
                raise ConfigError(
                    f"config argument {key!r}: a second variant after {named!r}; "
                    "give one, then key=value pairs"
                )
            if variants and key not in variants:
                close = difflib.get_close_matches(key, variants, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"config argument {key!r}: unknown variant; {hint}known: {', '.join(variants)}"
                )
            out["variant"] = named = key
            continue
        if key not in defaults:
            raise ConfigError(f"config argument {key!r}: unknown; known: {', '.join(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


# ----------------------------------------------------------------------------------------
# Loading a config file (`config_flags`): its failures as one line, for main and the data CLIs.


def error_line(err: BaseException) -> str:
    """The useful line of a config error: config_flags wraps an error raised while the
    config file runs ("Error whilst parsing config file ...") in a traceback whose last
    line holds it."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    line = lines[0]
    if "Error whilst parsing config file" in lines[0] and len(lines) > 1:
        last = lines[-1]  # "neva_jax.config.ConfigError: config argument ..."
        line = re.sub(r"^[\w.]*(Error|Exception)[\w]*: ", "", last)
    return _type_lock_line(line)


def _type_lock_line(line: str) -> str:
    """ml_collections' refusal of a value of another type, set in a config file, in our
    terms: the key's full name and what to write (e.g. a tuple of files for one file)."""
    found = re.search(
        r"Could not override field '(\w+)' \(reference\)\. (.*) is of original type "
        r"<class '(\w+)'> and cannot be casted to type <class '(\w+)'>",
        line,
    )
    if not found:
        return line
    name, value, given, wanted = found.groups()
    keys = [k for k in _keys() if k.rpartition(".")[2] == name]
    key = keys[0] if len(keys) == 1 else name
    fix = f"; for one, write ({value!r},)" if wanted == "tuple" and given == "str" else ""
    return f"config.{key}={value!r}: a {given} where a {wanted} is expected{fix}"


def unknown_key_line(err: AttributeError | KeyError, argv: Sequence[str]) -> str | None:
    """One line for config_flags' error on a `--config.KEY` that does not exist: an
    AttributeError for the last name, a KeyError for a section (`--config.trian.steps`);
    None for a KeyError that names no `--config.` flag (the config file raised it)."""
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    names = re.findall(r"'([^'\s]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    bad = names[0] if names else ""
    for arg in argv:
        key = arg.split("=", 1)[0]
        parts = key.split(".")
        if key.startswith("--config.") and bad in parts[1:]:
            i = parts.index(bad, 1)
            fixed = ".".join([*parts[:i], hint.group(1), *parts[i + 1 :]])[2:] if hint else ""
            return f"{key[2:]}: unknown config key" + (f"; did you mean {fixed}?" if hint else "")
    if isinstance(err, KeyError):
        return None
    return f"config: unknown key {bad!r}" + (f"; did you mean {hint.group(1)!r}?" if hint else "")


def load_error_line(value: Any, path: str) -> str | None:
    """One line if config_flags could not load the file `path` (it defers that error into
    the value it returns), else None."""
    if type(value).__name__ != "_ErrorConfig":
        return None
    err = object.__getattribute__(value, "_error")
    if isinstance(err, OSError) and not os.path.isfile(path.split(":", 1)[0]):
        return f"--config={path}: no such file; configs live in configs/*.py"
    return f"--config={path}: {error_line(err)}"


# ----------------------------------------------------------------------------------------
# ConfigDict -> RunConfig -> dict.


def from_config_dict(
    cd: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    num_devices: int | None = None,
    check_environment: bool = True,
) -> RunConfig:
    """Converts and validates an experiment ConfigDict; raises `ConfigError`.

    The mesh is checked against `num_devices` (default: the devices JAX sees);
    `check_environment=False` skips what depends on this machine (files and folders
    exist, a cuDNN backend): `--mode plan` plans for another machine.
    """
    cfg = _with_model_data(_build(_values(cd)))
    check(cfg, jax.device_count() if num_devices is None else num_devices, check_environment)
    return cfg


def data_config(cd: ml_collections.ConfigDict | Mapping[str, Any]) -> DataConfig:
    """The `data` section of an experiment as its training run reads it (the data CLIs):
    unset keys resolved as for training (`data.template` from `init_from` or
    `model.llm.model_type`), the model's image size, slots and start/end tokens and
    `train.batch_size` filled in. Only the data rules are checked (not the mesh or the
    devices); raises `ConfigError`."""
    data = _with_model_data(_build(_values(cd))).data
    try:
        data.validate()
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    return data


def _with_model_data(cfg: RunConfig) -> RunConfig:
    """`cfg` whose `data` has the model's numbers and the global batch size."""
    try:
        data = dataclasses.replace(cfg.data, batch_size=cfg.train.batch_size).with_model(
            image_size=cfg.model.vision.image_size,
            num_image_slots=cfg.model.num_image_tokens,
            use_im_start_end=cfg.model.use_im_start_end,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, data=data)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Every key of `cfg` as a nested JSON-able dict in the ConfigDict's layout (for
    checkpoint metadata; `from_config_dict` reads it back)."""
    out: dict[str, Any] = {}
    for key, slot in _keys().items():
        _set_path(out, key.split("."), _jsonable(_get(cfg, slot.paths[0])))
    return out


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """`dataclasses.replace` over dotted attribute paths, e.g. replace(cfg, **{'train.steps': 3})."""
    return _assemble(cfg, {tuple(k.split(".")): v for k, v in changes.items()})
