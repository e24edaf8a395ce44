"""The typed run config: `RunConfig`, its sections, and the rules every run must satisfy.

`neva_jax.config` builds a `RunConfig` from an experiment's ConfigDict (NeMo key names)
and calls `check`. Each section checks its own fields when it is built; `check` holds
the rules across sections and about this machine. Every failure is a `ConfigError`
whose message is one line naming the key, the value and the fix, e.g.

    config.mesh.tensor=3: must divide model.llm.num_attention_heads=4; use one of 1, 2, 4

The architecture is the model's own `NevaConfig` (`RunConfig.model`); its fields check
themselves (model/schema.py).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from neva_jax.data.config import DataConfig
from neva_jax.data.conversation import MODEL_TYPE_TEMPLATES
from neva_jax.model import neva
from neva_jax.model.neva import NevaConfig
from neva_jax.model.parts import ADAPTERS
from neva_jax.model.schema import DTYPES

# NeMo's model types; each selects the `data.template` of a config that leaves it unset.
MODEL_TYPES = tuple(MODEL_TYPE_TEMPLATES)
# How the token losses are averaged (train/step.py): one mean over the global batch,
# or HF Trainer's / NeMo's mean of per-micro-batch, per-device token means.
LOSS_NORMALIZATIONS = ("global_tokens", "micro_batch")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: key, problem, fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def default_model() -> NevaConfig:
    """The default architecture (LLaMA-2-7B-Chat + CLIP-L/14 at 224 px + the `mlp2x_gelu`
    projector), bf16, attention `auto`: cuDNN flash attention on a GPU where the dtype
    and head size allow it, XLA elsewhere (`neva_jax.platform.resolve_runtime`)."""
    return neva.with_runtime(
        neva.llama2_7b_chat(projector="mlp2x_gelu"), dtype="bfloat16", attention_impl="auto"
    )


# ----------------------------------------------------------------------------------------
# Sections. Each checks its own fields; `check` holds the rules across sections.


@dataclasses.dataclass(frozen=True)
class LlmSettings:
    """`model.llm` keys that are not architecture: where the weights come from, training."""

    # HF LLaMA/Vicuna folder (safetensors) or NeMo checkpoint (.nemo, NeMo 2 folder,
    # imported on the fly); "" = random init
    from_pretrained: str = ""
    freeze: bool = True  # stage 1: True; stage 2: False
    model_type: str = "llama_2"  # NeMo's: selects data.template when that is unset
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        _check(
            self.model_type in MODEL_TYPES,
            f"config.model.llm.model_type={self.model_type!r}: expected one of NeMo's "
            f"{', '.join(MODEL_TYPES)} (it selects data.template when that is unset)",
        )
        for key in ("hidden_dropout", "attention_dropout"):
            _check(
                getattr(self, key) == 0.0,
                f"config.model.llm.{key}={getattr(self, key)}: dropout is not implemented; "
                "set 0.0 (LLaVA trains without it)",
            )


@dataclasses.dataclass(frozen=True)
class VisionSettings:
    """`model.vision_encoder` keys that are not architecture."""

    from_pretrained: str = ""  # HF CLIP folder (safetensors); "" = random init
    from_hf: bool = True  # NeMo's: False would name a NeMo CLIP checkpoint (not read)
    freeze: bool = True

    def __post_init__(self):
        _check(
            self.from_hf,
            "config.model.vision_encoder.from_hf=False: a NeMo CLIP checkpoint is not read; "
            "set True and give model.vision_encoder.from_pretrained a Hugging Face CLIP folder "
            "(e.g. openai/clip-vit-large-patch14-336, the tower NeMo's NeVA configs name)",
        )


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """`mesh`: device mesh axes; -1 on one axis = all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        free = [k for k in ("data", "fsdp", "tensor") if getattr(self, k) == -1]
        _check(len(free) <= 1, f"config.mesh: only one axis may be -1, got {', '.join(free)}")
        for k in ("data", "fsdp", "tensor"):
            v = getattr(self, k)
            _check(v == -1 or v >= 1, f"config.mesh.{k}={v}: must be >= 1 (or -1 = the rest)")


@dataclasses.dataclass(frozen=True)
class RematSection:
    """`remat`: the policy is the model's `remat_policy` (`remat.policy`); this the rest."""

    num_layers: int = 0  # NeMo's activations_checkpoint_num_layers; 0 = every layer


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`train`: steps, batch, optimizer, schedule and failure policy."""

    steps: int = 100
    batch_size: int = 8  # global, across all devices and accumulation steps
    grad_accum_steps: int = 1
    lr: float = 1e-3
    projector_lr: float = 0.0  # the projector's peak lr (LLaVA mm_projector_lr); 0 = train.lr
    min_lr: float = 0.0
    warmup_steps: int = -1  # -1 = ceil(steps * warmup_ratio), as transformers
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    # global_tokens: one token mean over the global batch; micro_batch: the mean of the
    # token means of each micro-batch on each data-parallel device (HF Trainer, NeMo).
    loss_normalization: str = "global_tokens"
    logits_fraction: float = 1.0  # LM-head capacity per row, fraction of T (speed only)
    log_every: int = 10
    max_consecutive_nonfinite: int = 5  # K: this many non-finite steps in a row stop the run
    peak_flops_per_device: float = 0.0  # measured peak for MFU; 0 = the built-in table or none
    frozen_param_dtype: str = ""  # frozen parameters held in this dtype; "" = precision.param_dtype

    @property
    def warmup(self) -> int:
        """Warmup steps: `warmup_steps`, else ceil(steps * warmup_ratio) (transformers'
        `TrainingArguments.get_warmup_steps`, the same float expression: 2181 x 0.03 -> 66)."""
        if self.warmup_steps >= 0:
            return self.warmup_steps
        return math.ceil(self.steps * self.warmup_ratio)

    def __post_init__(self):
        _check(self.steps >= 1, f"config.train.steps={self.steps}: must be >= 1")
        _check(self.batch_size >= 1, f"config.train.batch_size={self.batch_size}: must be >= 1")
        _check(
            self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0,
            f"config.train.grad_accum_steps={self.grad_accum_steps}: must divide "
            f"train.batch_size={self.batch_size}",
        )
        _check(self.lr > 0, f"config.train.lr={self.lr}: must be > 0")
        _check(
            self.projector_lr >= 0,
            f"config.train.projector_lr={self.projector_lr}: must be >= 0 (0 = train.lr)",
        )
        _check(
            self.frozen_param_dtype in ("", *DTYPES),
            f"config.train.frozen_param_dtype={self.frozen_param_dtype!r}: expected '' (= "
            f"precision.param_dtype) or one of {', '.join(DTYPES)}",
        )
        _check(
            0 <= self.min_lr <= self.lr,
            f"config.train.min_lr={self.min_lr}: must be in [0, train.lr]",
        )
        _check(
            0 <= self.warmup <= self.steps,
            f"config.train.warmup_steps: {self.warmup} warmup steps must be in "
            f"[0, train.steps={self.steps}]",
        )
        _check(self.weight_decay >= 0, f"config.train.weight_decay={self.weight_decay}: >= 0")
        for key in ("adam_b1", "adam_b2"):  # b2 = 1 never updates the second moment: NaN
            value = getattr(self, key)
            _check(0 <= value < 1, f"config.train.{key}={value}: must be in [0, 1)")
        _check(self.adam_eps > 0, f"config.train.adam_eps={self.adam_eps}: must be > 0")
        _check(
            self.peak_flops_per_device >= 0,
            f"config.train.peak_flops_per_device={self.peak_flops_per_device}: must be >= 0 "
            "(0 = the built-in table)",
        )
        _check(
            self.loss_normalization in LOSS_NORMALIZATIONS,
            f"config.train.loss_normalization={self.loss_normalization!r}: use one of "
            f"{', '.join(LOSS_NORMALIZATIONS)}",
        )
        _check(self.grad_clip >= 0, f"config.train.grad_clip={self.grad_clip}: >= 0 (0 = off)")
        _check(
            0 < self.logits_fraction <= 1,
            f"config.train.logits_fraction={self.logits_fraction}: must be in (0, 1]",
        )
        _check(self.log_every >= 1, f"config.train.log_every={self.log_every}: must be >= 1")
        _check(
            self.max_consecutive_nonfinite >= 1,
            f"config.train.max_consecutive_nonfinite={self.max_consecutive_nonfinite}: >= 1",
        )


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """`eval`: periodic evaluation during training and `--mode eval`."""

    every_steps: int = 0  # 0 = only at the end of training
    # Per evaluation: `steps` x train.batch_size samples (eval.batch_size set: `steps`
    # batches of it); 0 = the whole eval set.
    steps: int = 0
    # 0 = train.batch_size // train.grad_accum_steps (one micro-batch), `steps` scaled so
    # that accumulation does not change what is evaluated
    batch_size: int = 0
    checkpoint: str = ""  # --mode eval: a workdir or step folder; "" = the newest in --workdir

    def __post_init__(self):
        for key in ("every_steps", "steps", "batch_size"):
            v = getattr(self, key)
            _check(v >= 0, f"config.eval.{key}={v}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """`checkpoint`: Orbax checkpointing of the training state."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _check(self.keep >= 1, f"config.checkpoint.keep={self.keep}: must be >= 1")
        _check(
            self.every_steps >= 1, f"config.checkpoint.every_steps={self.every_steps}: must be >= 1"
        )


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

    def __post_init__(self):
        n, i = self.num_processes, self.process_id
        _check(n >= 0, f"config.distributed.num_processes={n}: must be >= 0")
        _check(
            self.initialization_timeout >= 1,
            f"config.distributed.initialization_timeout={self.initialization_timeout}: must be "
            ">= 1 (seconds)",
        )
        _check(
            i >= -1 and (not n or i < n),
            f"config.distributed.process_id={i}: must be in [0, num_processes) "
            "(-1 = from the environment)",
        )


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """`plan`: what `--mode plan` (`neva_jax.train.plan`) estimates memory for."""

    num_devices: int = 0  # 0 = the devices this process sees
    device_memory_gb: float = 0.0  # per device, GB = 1e9 bytes; 0 = the device's own limit
    memory_fraction: float = 0.9  # share of device memory the estimate may fill

    def __post_init__(self):
        _check(self.num_devices >= 0, f"config.plan.num_devices={self.num_devices}: must be >= 0")
        _check(
            self.device_memory_gb >= 0,
            f"config.plan.device_memory_gb={self.device_memory_gb}: >= 0",
        )
        _check(
            0 < self.memory_fraction <= 1,
            f"config.plan.memory_fraction={self.memory_fraction}: must be in (0, 1]",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole experiment, typed; `neva_jax.config.to_dict` gives it back as ConfigDict keys.

    `model` is the architecture and its run-time choices; `llm` and `vision_encoder`
    hold the `model.llm.*` / `model.vision_encoder.*` keys that are not architecture
    (where the weights come from, what trains). `model.image_token_id` is the tokenizer's `<image>` id, known once the tokenizer
    is loaded (`model_for_tokenizer`); until then it is the last vocabulary id.
    `data` has the model's fields filled in (image size, image slots, start/end
    tokens) and `train.batch_size` as its batch size.
    """

    model: NevaConfig = dataclasses.field(default_factory=default_model)
    llm: LlmSettings = LlmSettings()
    vision_encoder: VisionSettings = VisionSettings()
    mesh: MeshSection = MeshSection()
    remat: RematSection = RematSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seed: int = 0
    init_from: str = ""  # a training workdir / step folder / imported model folder
    distributed: DistributedSection = DistributedSection()
    plan: PlanSection = PlanSection()

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """What trains (`model.parts`): the projector always; the LLM unless frozen, through
        its LoRA adapters alone (`ADAPTERS`) with `model.peft.scheme=lora`; the vision
        tower unless frozen."""
        parts = ["projector"]
        if not self.llm.freeze:
            parts.append(ADAPTERS if self.model.peft.enabled else "llm")
        if not self.vision_encoder.freeze:
            parts.append("vision")
        return tuple(parts)


def mesh_shape(mesh: MeshSection, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in (data, fsdp, tensor) against the device count; raises ConfigError."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = 1
    for v in sizes.values():
        fixed *= v if v > 0 else 1
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        _check(
            num_devices % fixed == 0,
            f"config.mesh: {fixed} devices in fixed axes do not divide the {num_devices} "
            "available; change mesh.tensor/mesh.fsdp",
        )
        sizes[free[0]] = num_devices // fixed
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    _check(
        total == num_devices,
        f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} "
        f"= {total} but {num_devices} devices are available; set mesh.data=-1 or match the count",
    )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _check_mesh(cfg: RunConfig, num_devices: int) -> None:
    llm, vis = cfg.model.llm, cfg.model.vision
    # Axis sizes against the shapes first: that message says more than a device count.
    by_axis = {
        "tensor": (
            ("model.llm.num_attention_heads", llm.num_attention_heads),
            ("model.llm.num_query_groups (kv heads)", llm.num_kv_heads),
            ("model.llm.ffn_hidden_size", llm.ffn_hidden_size),
            ("model.llm.vocab_size", llm.vocab_size),
            ("model.vision_encoder.num_attention_heads", vis.num_attention_heads),
            ("model.vision_encoder.ffn_hidden_size", vis.ffn_hidden_size),
        ),
        "fsdp": (
            ("model.llm.hidden_size", llm.hidden_size),
            ("model.vision_encoder.hidden_size", vis.hidden_size),
        ),
    }
    for axis, dims in by_axis.items():
        size = getattr(cfg.mesh, axis)
        for key, n in dims:
            _check(
                size < 1 or n % size == 0,
                f"config.mesh.{axis}={size}: must divide {key}={n}; use one of {_divisors(n)}",
            )
    data, fsdp, _ = mesh_shape(cfg.mesh, num_devices)
    t = cfg.train
    micro = t.batch_size // t.grad_accum_steps
    _check(
        micro % (data * fsdp) == 0,
        f"config.train.batch_size={t.batch_size}: each of the {t.grad_accum_steps} "
        f"micro-batches ({micro}) must divide over mesh.data*mesh.fsdp={data * fsdp} devices",
    )
    _check(
        cfg.eval.batch_size % (data * fsdp) == 0,
        f"config.eval.batch_size={cfg.eval.batch_size}: must be a multiple of "
        f"mesh.data*mesh.fsdp={data * fsdp}",
    )


def check(cfg: RunConfig, num_devices: int, check_environment: bool = True) -> None:
    """The rules across sections (each section checks its own fields); raises ConfigError.

    `check_environment=False` skips the rules about this machine (paths exist, cuDNN).
    """
    _check(
        cfg.remat.num_layers in (0, cfg.model.llm.num_layers),
        f"config.remat.num_layers={cfg.remat.num_layers}: remat applies to every layer; set 0",
    )
    for key, path in (
        ("model.llm.from_pretrained", cfg.llm.from_pretrained),
        ("model.vision_encoder.from_pretrained", cfg.vision_encoder.from_pretrained),
        ("init_from", cfg.init_from),
    ):
        _check(
            not check_environment or not path or os.path.exists(path),
            f"config.{key}={path!r}: no such file or folder; fix the path or set ''",
        )
    _check(
        not (cfg.init_from and (cfg.llm.from_pretrained or cfg.vision_encoder.from_pretrained)),
        f"config.init_from={cfg.init_from!r}: also set model.*.from_pretrained, whose weights "
        "init_from's (every parameter) would replace; set one of them",
    )
    _check(
        not (cfg.model.peft.enabled and cfg.llm.freeze),
        "config.model.peft.scheme='lora': with model.llm.freeze=True no adapter trains; set "
        "model.llm.freeze=False (stage 2) or model.peft.scheme=none",
    )
    _check_mesh(cfg, num_devices)
    try:
        cfg.data.validate(check_files=check_environment)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    _check(
        cfg.data.max_seq_len <= cfg.model.llm.encoder_seq_length,
        f"config.data.max_seq_len={cfg.data.max_seq_len}: exceeds model.llm.encoder_seq_length="
        f"{cfg.model.llm.encoder_seq_length}; lower it or raise the model's",
    )
    if cfg.model.llm.attention_impl == "cudnn" and check_environment:
        _check(
            jax.default_backend() == "gpu",
            "config.attention.implementation='cudnn': needs a GPU backend, this one is "
            f"{jax.default_backend()!r}; use 'auto' or 'xla'",
        )


def check_architecture(
    source: str, ours: NevaConfig, theirs: NevaConfig, *, unset_takes_it: bool = True
) -> None:
    """Raises ConfigError naming the first architecture field where the run's model
    (`ours`) and the one saved at `source` (`theirs`) differ (`neva.NOT_ARCHITECTURE`
    lists the fields that may). `unset_takes_it`: an unset key would take the source's
    value (init_from, a checkpoint), so the message offers that fix too."""
    for key, a, b in neva.architecture_differences(ours, theirs):
        name = key.rpartition(".")[2]
        fix = f"set it to {b!r}" + (
            " or leave it unset (None) to take it" if unset_takes_it else ""
        )
        raise ConfigError(f"config.{key}={a!r}: {source} has {name}={b!r}; {fix}")


def model_for_tokenizer(cfg: RunConfig, image_token_id: int, vocab_in_use: int) -> NevaConfig:
    """`cfg.model` with the tokenizer's `<image>` id and size (`tokenizer_vocab_size`: the
    rows past it are padding, masked in the loss and generation); checks the vocabulary
    covers the tokenizer."""
    vocab = cfg.model.llm.vocab_size
    _check(
        vocab_in_use <= vocab,
        f"config.model.llm.vocab_size={vocab}: the tokenizer uses {vocab_in_use} ids; raise "
        f"it to at least {vocab_in_use}",
    )
    return dataclasses.replace(
        cfg.model, image_token_id=image_token_id, tokenizer_vocab_size=vocab_in_use
    )
