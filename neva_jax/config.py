"""Experiment configuration: an ml_collections ConfigDict -> typed frozen dataclasses.

Experiment files (`configs/*.py`) build a ConfigDict with `get_config(arg)`. The
entry point converts it here, once, into `RunConfig` and validates it before any
model is built or any function compiled. Every problem is reported as a
`ConfigError` whose message is one line naming the key and what would fix it;
`neva_jax.main` turns it into exit status 2. No code below this module reads a
ConfigDict.

Key names follow NeMo's NeVA config where one exists (`model.llm.freeze`,
`model.vision_encoder.vision_select_layer`, ...), see DESIGN.md section 3.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
MODEL_TYPES = ("llama_2", "llama", "vicuna", "nvgpt")
SIGNALS = ("SIGTERM", "SIGKILL", "SIGINT")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: key, problem, fix."""


# ----------------------------------------------------------------------------------------
# Sections. Model defaults are the seed's NeVA (LLaMA-2-7B + CLIP-L/14 at 224 px).


@dataclasses.dataclass(frozen=True)
class LlmSection:
    """`model.llm`: the LLaMA-family decoder (NeMo names; see `model.llama.LlamaConfig`)."""

    from_pretrained: str = ""  # HF LLaMA/Vicuna folder (safetensors); "" = random init
    freeze: bool = True  # stage 1: True; stage 2: False
    model_type: str = "llama_2"
    vocab_size: int = 32064
    encoder_seq_length: int = 4096
    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_attention_heads: int = 32
    num_query_groups: int = 0  # GQA kv heads; 0 = num_attention_heads
    position_embedding_type: str = "rope"
    rope_theta: float = 10000.0
    normalization: str = "rmsnorm"
    layernorm_epsilon: float = 1e-5
    bias: bool = False
    activation: str = "swiglu"
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionSection:
    """`model.vision_encoder`: the CLIP ViT tower (NeMo names; see `model.clip.ClipConfig`)."""

    from_pretrained: str = ""  # HF CLIP folder (safetensors); "" = random init
    from_hf: bool = True
    freeze: bool = True
    image_size: int = 224
    patch_dim: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_layers: int = 24
    num_attention_heads: int = 16
    layernorm_epsilon: float = 1e-5
    activation: str = "quick_gelu"
    vision_select_layer: int = -2
    class_token_length: int = 1

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_dim) ** 2 + 1 - self.class_token_length


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`model`: the NeVA model: decoder, vision tower and projector."""

    llm: LlmSection = LlmSection()
    vision_encoder: VisionSection = VisionSection()
    projector: str = "mlp2x_gelu"
    use_im_start_end: bool = False
    scan_layers: bool = True


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """`mesh`: device mesh axes; -1 on one axis = all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RematSection:
    """`remat`: activation checkpointing of decoder blocks (NeMo's activations_checkpoint_*)."""

    policy: str = "none"
    num_layers: int = 0  # 0 = every layer


@dataclasses.dataclass(frozen=True)
class PrecisionSection:
    """`precision`: compute dtype and master-weight dtype (NeMo's bf16 + O2)."""

    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class AttentionSection:
    """`attention`: fused attention kernel choice."""

    implementation: str = "auto"


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`train`: steps, batch, optimizer, schedule and failure policy."""

    steps: int = 100
    batch_size: int = 8  # global, across all devices and accumulation steps
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = -1  # -1 = warmup_ratio * steps
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    logits_fraction: float = 1.0  # LM-head capacity per row, fraction of T (speed only)
    log_every: int = 10
    max_consecutive_nonfinite: int = 5  # K: this many non-finite steps in a row stop the run
    peak_flops_per_device: float = 0.0  # measured peak for MFU; 0 = the built-in table or none

    @property
    def warmup(self) -> int:
        if self.warmup_steps >= 0:
            return self.warmup_steps
        return int(self.warmup_ratio * self.steps)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """`eval`: periodic evaluation during training and `--mode eval`."""

    every_steps: int = 0  # 0 = only at the end of training
    steps: int = 0  # batches per evaluation; 0 = the whole eval set
    batch_size: int = 0  # 0 = train.batch_size // train.grad_accum_steps
    checkpoint: str = ""  # --mode eval: a workdir or step folder; "" = the newest in --workdir


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """`checkpoint`: Orbax checkpointing of the training state."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DebugSection:
    """`debug`: test hooks, off by default."""

    inject_nan_steps: tuple[int, ...] = ()  # the loss of these (0-based) steps is NaN
    signal_at_step: int = 0  # send `signal` to this process after this many steps (0 = off)
    signal: str = "SIGTERM"


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """`distributed`: a multi-process launch (`neva_jax.distributed`); unset = the environment.

    Unset values come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
    else SLURM or Open MPI (auto-detected), else one process.
    """

    coordinator_address: str = ""  # host:port where process 0 serves the coordinator
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment
    initialization_timeout: int = 300  # seconds to wait for every process to connect


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """`plan`: what `--mode plan` (`neva_jax.train.plan`) estimates memory for."""

    num_devices: int = 0  # 0 = the devices this process sees
    device_memory_gb: float = 0.0  # per device, GB = 1e9 bytes; 0 = the device's own limit
    memory_fraction: float = 0.9  # share of device memory the estimate may fill


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole experiment, typed. `data` is the data package's own `DataConfig`."""

    model: ModelSection
    mesh: MeshSection
    remat: RematSection
    precision: PrecisionSection
    attention: AttentionSection
    train: TrainSection
    eval: EvalSection
    checkpoint: CheckpointSection
    debug: DebugSection
    data: Any
    seed: int = 0
    init_from: str = ""  # a training workdir / step folder / imported model folder
    distributed: DistributedSection = DistributedSection()
    plan: PlanSection = PlanSection()

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """Top-level submodules that train: projector always; llm/vision unless frozen."""
        parts = ["projector"]
        if not self.model.llm.freeze:
            parts.append("llm")
        if not self.model.vision_encoder.freeze:
            parts.append("vision")
        return tuple(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict (for checkpoint metadata)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = to_jsonable(v)
        return out


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "mesh": MeshSection,
    "remat": RematSection,
    "precision": PrecisionSection,
    "attention": AttentionSection,
    "train": TrainSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "debug": DebugSection,
    "distributed": DistributedSection,
    "plan": PlanSection,
}


# ----------------------------------------------------------------------------------------
# Conversion


def to_jsonable(v: Any) -> Any:
    """Dataclasses, tuples and mappings as plain JSON-able dicts and lists."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: to_jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple | list):
        return [to_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {k: to_jsonable(x) for k, x in v.items()}
    return v


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    head, _, last = key.rpartition(".")
    close = difflib.get_close_matches(last, known, n=1)
    hint = f"did you mean {head + '.' if head else ''}{close[0]}?" if close else ""
    return ConfigError(
        f"config.{key}: unknown key; {hint or 'known keys: ' + ', '.join(sorted(known))}"
    )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks/converts one leaf value to the field's annotated type."""
    origin = typing.get_origin(annotation)
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
    elif origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, tuple | list):
            (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
            return tuple(_coerce(key, v, item) for v in value)
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    article = "an" if name[:1] in "aeiou" else "a"
    raise ConfigError(f"config.{key}={value!r}: expected {article} {name}")


def _build(cls: type, cd: Mapping[str, Any], prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in cd.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(full, list(fields))
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config.{full}: expected a section (a ConfigDict)")
            kwargs[key] = _build(ann, value, full + ".")
        else:
            kwargs[key] = _coerce(full, value, ann)
    return cls(**kwargs)


def _as_mapping(cd: Any) -> Mapping[str, Any]:
    if isinstance(cd, ml_collections.ConfigDict):
        return cd.to_dict()
    if isinstance(cd, Mapping):
        return cd
    raise ConfigError(f"config: expected a ConfigDict, got {type(cd).__name__}")


def _data_fields() -> dict[str, dataclasses.Field]:
    """DataConfig fields an experiment sets (the global batch size is `train.batch_size`)."""
    from neva_jax.data.config import DataConfig  # one-way: config -> data

    return {f.name: f for f in dataclasses.fields(DataConfig) if f.name != "batch_size"}


def _build_data(cd: Mapping[str, Any] | None, train: TrainSection) -> Any:
    """Converts `config.data` into the data package's `DataConfig`."""
    from neva_jax.data.config import DataConfig

    cd = dict(cd or {})
    known = list(_data_fields())
    for key in cd:
        if key == "batch_size":
            raise ConfigError("config.data.batch_size: set train.batch_size (the global batch)")
        if key not in known:
            raise _unknown_key(f"data.{key}", known)
    try:
        data = _build(DataConfig, {k: v for k, v in cd.items() if v is not None}, "data.")
        return dataclasses.replace(data, batch_size=train.batch_size)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.data: {e}") from None


def _section_dict(cls: type, fields: Mapping[str, dataclasses.Field] | None = None) -> Any:
    out = ml_collections.ConfigDict()
    for name, f in (fields or {f.name: f for f in dataclasses.fields(cls)}).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            out[name] = _section_dict(type(default))
        elif default is None:
            out[name] = ml_collections.FieldReference(None, field_type=str)
        else:
            out[name] = default
    return out


def default_config() -> ml_collections.ConfigDict:
    """A ConfigDict holding every key with its default; experiment files start from it.

    With `lock_config=True` only existing keys can be set, so every knob must be here.
    """
    from neva_jax.data.config import DataConfig

    cd = ml_collections.ConfigDict()
    for name, cls in _SECTIONS.items():
        cd[name] = _section_dict(cls)
    cd.data = _section_dict(DataConfig, _data_fields())
    cd.seed = 0
    cd.init_from = ""
    return cd


def model_preset(cd: ml_collections.ConfigDict, name: str) -> None:
    """Copies a `neva_jax.model.neva.PRESETS` architecture into `cd.model` (in place)."""
    from neva_jax.model import neva

    preset = neva.PRESETS[name]()
    for section, sub in ((cd.model.llm, preset.llm), (cd.model.vision_encoder, preset.vision)):
        for key, value in dataclasses.asdict(sub).items():
            if key in section and key not in ("dtype", "param_dtype"):
                section[key] = value if value is not None else 0
    cd.model.projector = preset.projector


def llava_recipe(cd: ml_collections.ConfigDict, *, stage2: bool, data_dir: str, init: str) -> None:
    """LLaVA-1.5's two-stage hyperparameters (DESIGN.md section 4) on `cd` (in place).

    Stage 1: `plain` captions (LLaVA-Pretrain 558K), projector only, batch 256, lr 1e-3.
    Stage 2: instruction data (llava_v1_5_mix665k), projector + LLM, lr 2e-5, packed
    rows of 2048 tokens (48 rows ~ LLaVA's 128 samples per step).
    Both: 1 epoch, warmup 3 %, cosine to 0, no weight decay, bf16 compute, fp32 master
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
    vis = cd.model.vision_encoder
    image_tokens = (vis.image_size // vis.patch_dim) ** 2
    # Stage 1 rows are one image + a short caption; stage 2 packs ~3 samples per row.
    data.max_seq_len = 2048 if stage2 else image_tokens + 128
    data.packing = stage2
    data.group_by_modality_length = stage2  # LLaVA-1.5 stage 2: all-image or all-text batches
    data.max_images_per_row = 3 if stage2 else 1
    data.num_workers = 8
    t = cd.train
    # One epoch: 558,128 captions / 256; 665,298 conversations packed ~2.8 per row / 48
    # rows (~134 samples per step, LLaVA's 128); data_report.json shows the real packing.
    t.batch_size, t.lr, t.steps = (48, 2e-5, 5000) if stage2 else (256, 1e-3, 2181)
    t.warmup_ratio, t.min_lr, t.weight_decay, t.grad_clip = 0.03, 0.0, 0.0, 1.0
    t.logits_fraction = 0.5 if stage2 else 0.125  # speed only; exact either way
    cd.remat.policy = "full" if stage2 else "selective"
    cd.checkpoint.every_steps = 500
    cd.checkpoint.keep = 2


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """`get_config` arguments: 'stage1,data_dir=/x' -> {'variant': 'stage1', 'data_dir': '/x'}.

    The first bare word is the variant; `key=value` pairs override `defaults`
    (values keep the type of the default). An unknown key is a ConfigError.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            out["variant"] = key
            continue
        if key not in defaults:
            raise ConfigError(f"config argument {key!r}: unknown; known: {', '.join(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


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
    top = dict(_as_mapping(cd))
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = top.pop(name, {}) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"config.{name}: expected a section (a ConfigDict)")
        kwargs[name] = _build(cls, section, name + ".")
    kwargs["data"] = _build_data(top.pop("data", {}), kwargs["train"])
    for name in ("seed", "init_from"):
        if name in top:
            kwargs[name] = _coerce(name, top.pop(name), typing.get_type_hints(RunConfig)[name])
    if top:
        known = [*_SECTIONS, "data", "seed", "init_from"]
        raise _unknown_key(sorted(top)[0], known)
    cfg = RunConfig(**kwargs)
    from neva_jax.config_checks import validate  # the rules need model/data configs

    validate(cfg, num_devices, check_environment=check_environment)
    return cfg


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """`dataclasses.replace` over dotted keys, e.g. replace(cfg, **{'train.steps': 3})."""
    for key, value in changes.items():
        cfg = _replace_path(cfg, key.split("."), value)
    return cfg


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(
        obj, **{path[0]: _replace_path(getattr(obj, path[0]), path[1:], value)}
    )
