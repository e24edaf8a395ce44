"""The rules a `RunConfig` must satisfy, checked before any model is built or compiled.

Each rule raises `ConfigError` with one line: the key, its value, what is wrong and
what would fix it, e.g.

    config.mesh.tensor=3: must divide model.llm.num_attention_heads=4; use one of 1, 2, 4

The model's and data's own config dataclasses check their fields too (`NevaConfig`,
`DataConfig.validate`); their messages are passed on, prefixed `config.`.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from neva_jax.config import (
    DTYPES,
    MODEL_TYPES,
    SIGNALS,
    ConfigError,
    MeshSection,
    RunConfig,
    to_jsonable,
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def mesh_shape(mesh: MeshSection, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in (data, fsdp, tensor) against the device count; raises ConfigError."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    _check(len(free) <= 1, f"config.mesh: only one axis may be -1, got {', '.join(free)}")
    for k, v in sizes.items():
        _check(v == -1 or v >= 1, f"config.mesh.{k}={v}: must be >= 1 (or -1 = the rest)")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v > 0 else 1
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


def neva_config(cfg: RunConfig, image_token_id: int | None = None) -> Any:
    """The model's `NevaConfig` for this run (architecture + run-time choices).

    `image_token_id` comes from the tokenizer; None uses the last vocabulary id (for
    validation before the tokenizer is loaded). Raises ConfigError naming the key.
    """
    from neva_jax.model import clip, llama, neva  # one-way: config -> model

    llm, vis = cfg.model.llm, cfg.model.vision_encoder
    runtime = dict(
        dtype=cfg.precision.compute_dtype,
        param_dtype=cfg.precision.param_dtype,
        attention_impl=cfg.attention.implementation,
        remat_policy=cfg.remat.policy,
        scan_layers=cfg.model.scan_layers,
    )
    skip = {
        "from_pretrained",
        "freeze",
        "model_type",
        "from_hf",
        "hidden_dropout",
        "attention_dropout",
    }
    try:
        llm_fields = {k: v for k, v in to_jsonable(llm).items() if k not in skip}
        llm_fields["num_query_groups"] = llm.num_query_groups or None
        vis_fields = {k: v for k, v in to_jsonable(vis).items() if k not in skip}
        return neva.NevaConfig(
            llm=llama.LlamaConfig(**llm_fields, **runtime),
            vision=clip.ClipConfig(**vis_fields, **runtime),
            projector=cfg.model.projector,
            image_token_id=llm.vocab_size - 1 if image_token_id is None else image_token_id,
            use_im_start_end=cfg.model.use_im_start_end,
        )
    except ValueError as e:
        msg = str(e).splitlines()[0]
        for name in ("remat_policy", "attention_impl"):
            key = {"remat_policy": "remat.policy", "attention_impl": "attention.implementation"}
            if msg.startswith(f"model.llm.{name}") or msg.startswith(
                f"model.vision_encoder.{name}"
            ):
                msg = f"{key[name]}{msg.split(name, 1)[1]}"
        if msg.startswith("model.image_token_id"):
            msg = msg.replace("model.image_token_id", "the tokenizer's <image> id", 1)
            msg += "; raise model.llm.vocab_size"
        raise ConfigError(f"config.{msg}" if not msg.startswith("config.") else msg) from None


def _validate_model(cfg: RunConfig, check_files: bool = True) -> None:
    llm = cfg.model.llm
    _check(
        llm.model_type in MODEL_TYPES,
        f"config.model.llm.model_type={llm.model_type!r}: expected one of {', '.join(MODEL_TYPES)}",
    )
    for key in ("hidden_dropout", "attention_dropout"):
        _check(
            getattr(llm, key) == 0.0,
            f"config.model.llm.{key}={getattr(llm, key)}: dropout is not implemented; set 0.0 "
            "(LLaVA trains without it)",
        )
    for key in ("compute_dtype", "param_dtype"):
        v = getattr(cfg.precision, key)
        _check(v in DTYPES, f"config.precision.{key}={v!r}: expected one of {', '.join(DTYPES)}")
    _check(
        cfg.remat.num_layers in (0, llm.num_layers),
        f"config.remat.num_layers={cfg.remat.num_layers}: remat applies to every layer; set 0",
    )
    _check(
        cfg.debug.signal in SIGNALS,
        f"config.debug.signal={cfg.debug.signal!r}: expected one of {', '.join(SIGNALS)}",
    )
    neva_config(cfg)  # the model's own checks (shapes, names, projector, ...)
    for key, path in (
        ("model.llm.from_pretrained", llm.from_pretrained),
        ("model.vision_encoder.from_pretrained", cfg.model.vision_encoder.from_pretrained),
        ("init_from", cfg.init_from),
    ):
        _check(
            not check_files or not path or os.path.exists(path),
            f"config.{key}={path!r}: no such file or folder; fix the path or set ''",
        )


def _validate_train(cfg: RunConfig) -> None:
    t = cfg.train
    _check(t.steps >= 1, f"config.train.steps={t.steps}: must be >= 1")
    _check(t.batch_size >= 1, f"config.train.batch_size={t.batch_size}: must be >= 1")
    _check(
        t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
        f"config.train.grad_accum_steps={t.grad_accum_steps}: must divide "
        f"train.batch_size={t.batch_size}",
    )
    _check(t.lr > 0, f"config.train.lr={t.lr}: must be > 0")
    _check(0 <= t.min_lr <= t.lr, f"config.train.min_lr={t.min_lr}: must be in [0, train.lr]")
    _check(
        0 <= t.warmup <= t.steps,
        f"config.train.warmup_steps: {t.warmup} warmup steps must be in [0, train.steps={t.steps}]",
    )
    _check(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay}: must be >= 0")
    _check(t.grad_clip >= 0, f"config.train.grad_clip={t.grad_clip}: must be >= 0 (0 = off)")
    _check(
        0 < t.logits_fraction <= 1,
        f"config.train.logits_fraction={t.logits_fraction}: must be in (0, 1]",
    )
    _check(t.log_every >= 1, f"config.train.log_every={t.log_every}: must be >= 1")
    _check(
        t.max_consecutive_nonfinite >= 1,
        f"config.train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}: must be >= 1",
    )
    c = cfg.checkpoint
    _check(c.keep >= 1, f"config.checkpoint.keep={c.keep}: must be >= 1")
    _check(c.every_steps >= 1, f"config.checkpoint.every_steps={c.every_steps}: must be >= 1")
    e = cfg.eval
    for key in ("every_steps", "steps", "batch_size"):
        _check(getattr(e, key) >= 0, f"config.eval.{key}={getattr(e, key)}: must be >= 0")


def _validate_mesh(cfg: RunConfig, num_devices: int) -> None:
    llm, vis = cfg.model.llm, cfg.model.vision_encoder
    # Axis sizes against the shapes first: that message says more than a device count.
    by_axis = {
        "tensor": (
            ("model.llm.num_attention_heads", llm.num_attention_heads),
            ("model.llm.num_query_groups (kv heads)", llm.kv_heads),
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
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    _check(
        micro % (data * fsdp) == 0,
        f"config.train.batch_size={cfg.train.batch_size}: each of the "
        f"{cfg.train.grad_accum_steps} micro-batches ({micro}) must divide over "
        f"mesh.data*mesh.fsdp={data * fsdp} devices",
    )
    if cfg.eval.batch_size:
        _check(
            cfg.eval.batch_size % (data * fsdp) == 0,
            f"config.eval.batch_size={cfg.eval.batch_size}: must be a multiple of "
            f"mesh.data*mesh.fsdp={data * fsdp}",
        )


def _validate_data(cfg: RunConfig, check_files: bool = True) -> None:
    """The data package's own checks (files, template, lengths) plus model cross-checks."""
    vis = cfg.model.vision_encoder
    data = cfg.data.with_model(
        image_size=vis.image_size,
        num_image_slots=vis.num_image_tokens,
        use_im_start_end=cfg.model.use_im_start_end,
    )
    try:
        data.validate(check_files=check_files)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    _check(
        data.max_seq_len <= cfg.model.llm.encoder_seq_length,
        f"config.data.max_seq_len={data.max_seq_len}: exceeds model.llm.encoder_seq_length="
        f"{cfg.model.llm.encoder_seq_length}; lower it or raise the model's",
    )


def _validate_scale(cfg: RunConfig) -> None:
    d, p = cfg.distributed, cfg.plan
    _check(
        d.num_processes >= 0, f"config.distributed.num_processes={d.num_processes}: must be >= 0"
    )
    _check(
        d.process_id >= -1 and (not d.num_processes or d.process_id < d.num_processes),
        f"config.distributed.process_id={d.process_id}: must be in [0, num_processes) "
        "(-1 = from the environment)",
    )
    _check(p.num_devices >= 0, f"config.plan.num_devices={p.num_devices}: must be >= 0")
    _check(p.device_memory_gb >= 0, f"config.plan.device_memory_gb={p.device_memory_gb}: >= 0")
    _check(
        0 < p.memory_fraction <= 1,
        f"config.plan.memory_fraction={p.memory_fraction}: must be in (0, 1]",
    )


def validate(
    cfg: RunConfig, num_devices: int | None = None, *, check_environment: bool = True
) -> None:
    """Checks every rule that needs no model; raises `ConfigError` (one line).

    `check_environment=False` skips the rules about this machine (paths exist, cuDNN).
    """
    _validate_model(cfg, check_environment)
    _validate_train(cfg)
    _validate_scale(cfg)
    if num_devices is None:
        num_devices = jax.device_count()
    _validate_mesh(cfg, num_devices)
    _validate_data(cfg, check_environment)
    if cfg.attention.implementation == "cudnn" and check_environment:
        _check(
            jax.default_backend() == "gpu",
            "config.attention.implementation='cudnn': needs a GPU backend, this one is "
            f"{jax.default_backend()!r}; use 'auto' or 'xla'",
        )
