"""GPU harness: LLaVA-1.5-7B train step MFU on one accelerator (run by launch/gpu_bench.sh).

`python -m neva_jax.bench.gpu [--batch 2] [--seq-len 2048] [--configs ...] [--budget-s 270]`

The LLaVA-1.5-7B shape (Vicuna-7B + CLIP-L/14-336 + mlp2x_gelu) with random
weights (no downloads): bf16 compute, fp32 master weights and Adam moments,
`scan_layers`, packed rows of `--seq-len` tokens (samples of 576 image slots
plus 64-320 text tokens, first-fit, up to 3 images per row; the answer half of
each sample's text is trained). Each config `stage:attention:remat` is one
compiled train step, timed over `--steps` steps after 2 warm-up steps, and
prints model TFLOP/s (docs/REFERENCE.md "FLOP convention"), MFU against the 790 TFLOP/s bf16
peak measured on an H200, tokens/s (all positions and real tokens), the
program's memory (XLA's memory analysis) and the device's peak memory so far.
The parameters are created once and handed from config to config (the step
donates its state), so one device holds one model at a time. Configs that do not
fit the time budget are skipped and reported as such.
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import argparse
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neva_jax.bench import flops as flops_lib
from neva_jax.bench import jax_side, shapes, timing
from neva_jax.bench.report import Report
from neva_jax.model.neva import NevaConfig, with_runtime

H200_PEAK_BF16 = 790e12  # measured dense bf16 matmul peak (docs/REFERENCE.md)
DEFAULT_CONFIGS = (
    "1:cudnn:selective",
    "2:cudnn:full",
    "2:cudnn:selective",
    "2:xla:full",
)
MAX_IMAGES_PER_ROW = 3
STAGE2_MFU_GOAL = 0.50
STAGE1_MFU_GOAL = 0.55


def packed_batch(cfg: NevaConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic packed rows in the docs/CONTRACTS.md layout (see the module docstring)."""
    rng = np.random.default_rng(seed)
    P, s = cfg.num_image_tokens, cfg.vision.image_size
    out = {
        "input_ids": np.zeros((batch, seq_len), np.int32),
        "targets": np.zeros((batch, seq_len), np.int32),
        "loss_mask": np.zeros((batch, seq_len), np.float32),
        "segment_ids": np.zeros((batch, seq_len), np.int32),
        "positions": np.zeros((batch, seq_len), np.int32),
        "images": np.zeros((batch, MAX_IMAGES_PER_ROW, s, s, 3), np.float32),
    }
    hi = min(320, seq_len - P)
    lo = min(64, hi // 2)
    for r in range(batch):
        used = 0
        for seg in range(1, MAX_IMAGES_PER_ROW + 1):
            text = int(rng.integers(lo, hi + 1))
            n = text + P
            if used + n > seq_len:
                break
            ids = shapes.prompt_ids(rng, cfg, text)
            sl = slice(used, used + n)
            out["input_ids"][r, sl] = ids
            out["targets"][r, used : used + n - 1] = ids[1:]
            out["loss_mask"][r, used + n - 1 - text // 2 : used + n - 1] = 1.0
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            out["images"][r, seg - 1] = rng.normal(size=(s, s, 3))
            used += n
    return out


def init_params(cfg: NevaConfig, seed: int = 0) -> dict[str, Any]:
    """All parameters, random, created on the default device inside one jit."""
    from flax import nnx

    def init() -> dict[str, Any]:
        return nnx.to_pure_dict(nnx.state(jax_side.random_model(cfg, seed), nnx.Param))

    return jax.jit(init)()


def run_config(
    report: Report,
    base: NevaConfig,
    params: dict[str, Any],
    batch: dict[str, np.ndarray],
    *,
    stage: int,
    attention: str,
    remat: str,
    steps: int,
    logits_fraction: float,
) -> dict[str, Any]:
    """Compiles and times one config; returns the (updated) parameters for the next one."""
    from neva_jax.model import parts as model_parts
    from neva_jax.train import state as state_lib
    from neva_jax.train import step as step_lib

    cfg = with_runtime(
        base,
        dtype="bfloat16",
        param_dtype="float32",
        attention_impl=attention,
        remat_policy=remat,
        scan_layers=True,
    )
    parts = jax_side.STAGE_PARTS[stage]
    tx, schedule = jax_side.optimizer()
    graphdef, abstract = state_lib.abstract(lambda: jax_side.random_model(cfg), parts, tx)
    trained, frozen = model_parts.split_dict(params, parts)
    del params
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trained,
        frozen=frozen,
        other=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract.other),
        opt_state=jax.jit(tx.init)(trained),
        nonfinite_count=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
    fn = step_lib.make_train_step(
        graphdef, tx, schedule, trained_parts=parts, logits_fraction=logits_fraction
    )
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    lowered, lower_s = timing.timed(
        lambda: jax.jit(fn, donate_argnums=(0,)).lower(state, device_batch)
    )
    compiled, compile_s = timing.timed(lowered.compile)
    mem = compiled.memory_analysis()

    losses: list[float] = []

    def step() -> None:
        nonlocal state
        state, metrics = compiled(state, device_batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    for _ in range(2):
        step()
    times = [timing.timed(step)[1] for _ in range(steps)]
    step_s = timing.median(times)
    B, T = batch["input_ids"].shape
    images = float(np.mean(np.sum(np.any(batch["images"] != 0, axis=(2, 3, 4)), axis=1)))
    f = flops_lib.step_flops(cfg, B, T, stage=stage, images_per_row=images)
    real = int(np.sum(batch["segment_ids"] > 0))
    stats = jax.devices()[0].memory_stats() or {}
    report.emit(
        "gpu",
        f"stage{stage}_{attention}_{remat}",
        stage=stage,
        attention=attention,
        remat=remat,
        batch=B,
        seq_len=T,
        step_s=step_s,
        steps_s=times,
        compile_s=lower_s + compile_s,
        tflops=f.total / step_s / 1e12,
        mfu=f.total / step_s / H200_PEAK_BF16,
        tokens_per_s=B * T / step_s,
        real_tokens_per_s=real / step_s,
        program_gib=_program_bytes(mem) / 2**30,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        loss=losses[-1],
    )
    return model_parts.merge_dicts(state.params, state.frozen)


def _program_bytes(mem: Any) -> float:
    """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled program."""
    if mem is None:
        return 0.0
    return float(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m neva_jax.bench.gpu", description=__doc__.split("\n")[0]
    )
    p.add_argument("--shape", default="llava_v15_7b", choices=("llava_v15_7b", "tiny"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="override the decoder depth (0 = preset)")
    p.add_argument("--logits-fraction", type=float, default=0.5)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="stage:attention:remat,...")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip configs past this")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    report = Report()
    dev = jax.devices()[0]
    report.emit("env", "setup", jax=jax.__version__, device=dev.device_kind, backend=dev.platform)
    if args.shape == "tiny":
        shape = shapes.tiny()
        base = shape.model
    else:
        shape = shapes.llava_v15_7b(batch_size=args.batch, seq_len=args.seq_len)
        base = shape.model
    if args.layers:
        import dataclasses

        base = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_layers=args.layers))
    batch = packed_batch(base, args.batch, args.seq_len)
    report.emit(
        "env",
        "batch",
        real_tokens=int(np.sum(batch["segment_ids"] > 0)),
        trained_tokens=int(batch["loss_mask"].sum()),
        samples=int(sum(len(set(r[r > 0].tolist())) for r in batch["segment_ids"])),
    )
    if dev.platform == "gpu":
        report.emit(
            "util", "matmul_peak_bf16", tflops=timing.jax_matmul_peak(8192, "bfloat16") / 1e12
        )
    params, init_s = timing.timed(lambda: jax.block_until_ready(init_params(base)))
    report.emit("env", "init", seconds=init_s, layers=base.llm.num_layers)
    for spec in args.configs.split(","):
        stage, attention, remat = spec.split(":")
        if attention == "cudnn" and dev.platform != "gpu":
            report.emit("gpu", spec, skipped="cuDNN needs a GPU")
            continue
        if time.perf_counter() - t0 > args.budget_s:
            report.emit("gpu", spec, skipped=f"past the {args.budget_s:.0f} s budget")
            continue
        try:
            params = run_config(
                report, base, params, batch, stage=int(stage), attention=attention,
                remat=remat, steps=args.steps, logits_fraction=args.logits_fraction,
            )  # fmt: skip
        except Exception as e:  # an OOM or unsupported kernel: report it, try the next config
            report.emit("gpu", spec, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(params)):
                params = init_params(base)  # the failed step consumed the donated parameters
    for stage, goal in ((2, STAGE2_MFU_GOAL), (1, STAGE1_MFU_GOAL)):
        mfus = [
            r["mfu"]
            for r in report.records
            if r["bench"] == "gpu" and r.get("stage") == stage and "mfu" in r
        ]
        if mfus:
            report.target(
                f"GPU stage {stage} MFU (best config)", max(mfus), f">= {goal}", max(mfus) >= goal
            )
    report.emit("env", "done", wall_s=time.perf_counter() - t0)
    print()
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
