"""LoRA stage 2 (`bench train --lora`): ours with adapters vs our full stage 2 vs PEFT.

Three train steps on the same weights and batch, interleaved step by step:
- `ours_lora`: our step with LoRA adapters on every linear of the decoder (LLaVA's
  finetune_lora targets, rank `rank`, alpha 2 * rank, dropout 0.05 unless `dropout`
  says otherwise), the projector
  trained fully and the rest frozen (`trained_parts` = projector + adapters);
- `ours_full`: our stage-2 step (projector + the whole LLM);
- `peft`: `transformers` + Hugging Face `peft` (`get_peft_model` with the same
  targets, the projector as `modules_to_save`), `torch.optim.AdamW`, clipping 1.0.
Our adapters are imported from PEFT's folder (`import-hf --adapter`), so both LoRA
sides start from the same A (and B = 0); the first losses are printed side by side.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

from neva_jax import platform
from neva_jax.bench import jax_side, shapes, timing
from neva_jax.bench.hf_side import LR, HFSide
from neva_jax.bench.report import Report
from neva_jax.bench.shapes import BenchShape
from neva_jax.model import lora
from neva_jax.model.parts import ADAPTERS

DROPOUT = 0.05
LORA_FASTER_GOAL = 1.0  # LoRA step faster than our full stage 2
PEFT_SPEEDUP_GOAL = 1.0  # ours ahead of transformers + peft


def _wrap_with_peft(hf: HFSide, rank: int, dropout: float) -> Any:
    """Wraps `hf.model` with `peft.get_peft_model` (LLaVA's targets) and gives `hf` an
    AdamW over the trainable parameters, so that `hf.train_step` is PEFT's step and
    `hf.num_params` counts PEFT's trainable parameters; returns the PEFT model."""
    import peft
    import torch

    names = "|".join(lora.HF_NAMES.values())
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=dropout,
        target_modules=rf".*language_model.*\.({names})",
        modules_to_save=["multi_modal_projector"],
    )
    hf.model = peft.get_peft_model(hf.model, config)
    hf.model.train()
    trainable = [p for p in hf.model.parameters() if p.requires_grad]
    hf.optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    return hf.model


def run_lora(
    report: Report,
    shape: BenchShape,
    *,
    rank: int = 16,
    dropout: float = DROPOUT,
    repeats: int = 3,
    warmup: int = 1,
    logits_fraction: float = 1.0,
) -> dict[str, float]:
    """Measures the three steps `repeats` times each (interleaved); prints the median
    [min..max spread] of each and the two ratios of medians with their spread; returns
    the median step seconds."""
    from neva_jax.bench.train_bench import _runtime

    # This backend's choices, as the trainer makes them (`loop.prepare`): on CPU the
    # row-major weight gradients of `layers.contract`, for the kernels and the adapters.
    runtime = platform.resolve_runtime(**_runtime(shape))
    hf = HFSide(shape)
    hf.set_stage(2)
    initial = copy.deepcopy(hf.model.state_dict())
    peft_model = _wrap_with_peft(hf, rank, dropout)
    batch = shapes.make_batch(shape)
    hf_batch = hf.tensors(shapes.hf_inputs(batch))
    with tempfile.TemporaryDirectory(prefix="neva_bench_lora_") as folder:
        base, adapter = f"{folder}/base", f"{folder}/adapter"
        peft_model.save_pretrained(adapter)
        plain = HFSide(shape)
        plain.model.load_state_dict(initial)
        plain.save(base)
        del plain
        lora_model = jax_side.import_model(base, adapter=adapter, **runtime)
        full_model = jax_side.import_model(base, **runtime)
    ours = {
        "ours_lora": jax_side.OursTrain(
            lora_model, 2, logits_fraction=logits_fraction, parts=("projector", ADAPTERS)
        ),
        "ours_full": jax_side.OursTrain(full_model, 2, logits_fraction=logits_fraction),
    }
    for side in ours.values():
        side.compile(batch)
    first = {name: timing.timed(side.step) for name, side in ours.items()}
    first["peft"] = timing.timed(lambda: hf.train_step(hf_batch))
    fns = {name: side.step for name, side in ours.items()}
    fns["peft"] = lambda: hf.train_step(hf_batch)
    times = timing.interleaved(fns, steps=repeats, warmup=max(warmup - 1, 0))
    tokens = shape.tokens_per_step
    step_s = {name: timing.median(times.wall[name]) for name in fns}
    for name in fns:
        extra: dict[str, Any] = {}
        if name in ours:
            side = ours[name]
            trainable, total = side.num_params()
            extra = {"compile_s": side.lower_s + side.compile_s}
        else:
            trainable, total = hf.num_params()
        report.emit(
            "train_lora",
            name,
            shape=shape.name,
            rank=rank,
            dropout=dropout,
            **timing.summary("step_s", times.wall[name]),
            **timing.summary("cpu_s", times.cpu[name]),
            steps_s=times.wall[name],
            first_step_s=first[name][1],
            tokens_per_s=tokens / step_s[name],
            loss=first[name][0],
            trainable_params=trainable,
            total_params=total,
            **extra,
        )
    full = timing.ratio_summary("full_over_lora", times.wall["ours_full"], times.wall["ours_lora"])
    peft = timing.ratio_summary("peft_over_ours", times.wall["peft"], times.wall["ours_lora"])
    full_over_lora, peft_over_ours = full["full_over_lora"], peft["peft_over_ours"]
    report.emit(
        "train_lora",
        "ratios",
        **full,
        **peft,
        first_loss_abs_diff=abs(first["peft"][0] - first["ours_lora"][0]),
    )
    report.target(
        "LoRA stage 2 step: our full stage 2 time / our LoRA time",
        full_over_lora,
        f"> {LORA_FASTER_GOAL}x",
        full_over_lora > LORA_FASTER_GOAL,
    )
    report.target(
        "LoRA stage 2 step: transformers + peft time / ours",
        peft_over_ours,
        f"> {PEFT_SPEEDUP_GOAL}x",
        peft_over_ours > PEFT_SPEEDUP_GOAL,
    )
    return step_s
