"""Train step, ours vs `transformers`, side by side; and utilisation against the matmul peak.

Both sides start from identical weights (ours imported from the `transformers`
folder) and run the same batch; the first step's losses are printed side by side
as a check that they compute the same thing. Steps are interleaved (one of
theirs, one of ours, ...) so both see the same background load. Each figure is
repeated `repeats` times after `warmup` steps: the median, min, max and spread
((max - min) / median) are printed, and the ratio is the ratio of medians with the
spread of the per-pair ratios. Our compile time is reported apart.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from typing import Any

from neva_jax.bench import flops as flops_lib
from neva_jax.bench import jax_side, shapes, timing
from neva_jax.bench.hf_side import HFSide
from neva_jax.bench.report import Report
from neva_jax.bench.shapes import BenchShape

STAGE2_SPEEDUP_GOAL = 1.3
STAGE2_SPREAD_GOAL = 0.10
STAGE1_COST_GOAL = 0.5


@dataclasses.dataclass
class TrainResult:
    """Median step seconds per (stage, side) and the model FLOPs per step per stage."""

    step_s: dict[tuple[int, str], float] = dataclasses.field(default_factory=dict)
    flops: dict[int, float] = dataclasses.field(default_factory=dict)


def run_train(
    report: Report,
    shape: BenchShape,
    *,
    stages: tuple[int, ...] = (2, 1),
    repeats: int = 3,
    warmup: int = 1,
    logits_fraction: float = 1.0,
) -> TrainResult:
    """Measures the stages' train steps of both sides and prints figures and targets."""
    result = TrainResult()
    hf = HFSide(shape)
    initial = copy.deepcopy(hf.model.state_dict())
    with tempfile.TemporaryDirectory(prefix="neva_bench_") as folder:
        hf.save(folder)
        model = jax_side.import_model(folder, **_runtime(shape))
    batch = shapes.make_batch(shape)
    hf_batch = hf.tensors(shapes.hf_inputs(batch))
    tokens = shape.tokens_per_step
    for stage in stages:
        hf.model.load_state_dict(initial)  # both sides start each stage from the same weights
        hf.set_stage(stage)
        ours = jax_side.OursTrain(model, stage, logits_fraction=logits_fraction)
        ours.compile(batch)
        hf_loss, hf_first = timing.timed(lambda: hf.train_step(hf_batch))
        our_loss, our_first = timing.timed(ours.step)
        times = timing.interleaved(
            {"hf": lambda: hf.train_step(hf_batch), "ours": ours.step},
            steps=repeats,
            warmup=max(warmup - 1, 0),
        )
        f = flops_lib.step_flops(shape.model, shape.batch_size, shape.seq_len, stage=stage)
        result.flops[stage] = f.total
        for side, first, loss, params in (
            ("hf", hf_first, hf_loss, hf.num_params()),
            ("ours", our_first, our_loss, ours.num_params()),
        ):
            wall = timing.summary("step_s", times.wall[side])
            step_s = wall["step_s"]
            result.step_s[(stage, side)] = step_s
            extra: dict[str, Any] = {}
            if side == "ours":
                extra = {
                    "compile_s": ours.lower_s + ours.compile_s,
                    "lower_s": ours.lower_s,
                    "logits_fraction": logits_fraction,
                }
            report.emit(
                "train",
                f"stage{stage}_{side}",
                shape=shape.name,
                stage=stage,
                side=side,
                **wall,
                **timing.summary("cpu_s", times.cpu[side]),
                steps_s=times.wall[side],
                first_step_s=first,
                tokens_per_s=tokens / step_s,
                tflops=f.total / step_s / 1e12,
                model_flops_per_step=f.total,
                loss=loss,
                trainable_params=params[0],
                total_params=params[1],
                **extra,
            )
        ratio = timing.ratio_summary("speedup", times.wall["hf"], times.wall["ours"])
        report.emit(
            "train",
            f"stage{stage}_ratio",
            **ratio,
            **timing.ratio_summary("speedup_cpu", times.cpu["hf"], times.cpu["ours"]),
            first_loss_abs_diff=abs(hf_loss - our_loss),
        )
        if stage == 2:
            speedup, spread = ratio["speedup"], ratio["speedup_spread"]
            report.target(
                "train stage 2 tokens/s vs transformers (median)",
                speedup,
                f">= {STAGE2_SPEEDUP_GOAL}x, spread <= {STAGE2_SPREAD_GOAL:.0%}",
                speedup >= STAGE2_SPEEDUP_GOAL and spread <= STAGE2_SPREAD_GOAL,
                spread=spread,
            )
        del ours
    if {1, 2} <= set(stages):
        for side in ("ours", "hf"):
            cost = result.step_s[(1, side)] / result.step_s[(2, side)]
            report.emit("train", f"stage1_over_stage2_{side}", ratio=cost)
        cost = result.step_s[(1, "ours")] / result.step_s[(2, "ours")]
        report.target(
            "train stage 1 time / stage 2 time (ours)",
            cost,
            f"<= {STAGE1_COST_GOAL}",
            cost <= STAGE1_COST_GOAL,
        )
    return result


def _runtime(shape: BenchShape) -> dict[str, Any]:
    """The run-time model fields of `shape` (to apply to an imported model)."""
    llm = shape.model.llm
    return {
        "dtype": llm.dtype,
        "param_dtype": llm.param_dtype,
        "attention_impl": llm.attention_impl,
        "remat_policy": llm.remat_policy,
        "scan_layers": llm.scan_layers,
    }


def run_util(
    report: Report, shape: BenchShape, train: TrainResult | None, *, logits_fraction: float = 1.0
) -> None:
    """Model FLOP/s of each side's train step over the measured fp32 matmul peak."""
    if train is None or not train.step_s:
        train = run_train(
            report, shape, stages=(2,), repeats=2, warmup=1, logits_fraction=logits_fraction
        )
    dtype = shape.model.llm.dtype
    peak_jax = timing.jax_matmul_peak(dtype=dtype)
    peak_torch = timing.torch_matmul_peak()
    peak = max(peak_jax, peak_torch)
    report.emit(
        "util",
        "matmul_peak",
        dtype=dtype,
        jax_gflops=peak_jax / 1e9,
        torch_gflops=peak_torch / 1e9,
        peak_gflops=peak / 1e9,
    )
    for (stage, side), step_s in sorted(train.step_s.items()):
        util = flops_lib.utilisation(train.flops[stage], step_s, peak)
        report.emit(
            "util",
            f"stage{stage}_{side}",
            stage=stage,
            side=side,
            tflops=train.flops[stage] / step_s / 1e12,
            util=util,
        )
    if (2, "ours") in train.step_s:
        util = flops_lib.utilisation(train.flops[2], train.step_s[(2, "ours")], peak)
        hf_util = flops_lib.utilisation(train.flops[2], train.step_s[(2, "hf")], peak)
        report.target(
            "train stage 2 model FLOP/s / fp32 matmul peak (ours)",
            util,
            f"reported (transformers: {hf_util:.2f})",
            True,
        )
