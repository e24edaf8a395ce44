"""`python -m neva_jax.bench [train|decode|compile|util|packing|all] [flags]`.

Prints one JSON line per measurement, then a table of the figures and targets.
See `neva_jax/bench/__init__.py` for what each sub-command measures. Examples:

    python -m neva_jax.bench all                    # the CPU comparison, under 10 minutes
    python -m neva_jax.bench train --steps 5        # train step only, more steps
    python -m neva_jax.bench train --lora           # LoRA stage 2: ours vs our full vs peft
    python -m neva_jax.bench all --shape tiny --steps 1 --skip-unrolled   # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SUITES = ("train", "util", "decode", "compile", "packing")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m neva_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("suite", nargs="?", default="all", choices=(*SUITES, "all"))
    p.add_argument("--shape", default="bench", choices=("bench", "tiny"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of BOTH sides (XLA via CPU affinity, torch.set_num_threads). "
        "Default 1: on a shared machine a multi-threaded torch spin-waits for descheduled "
        "OpenMP threads and the ratio then measures the load, not the code",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps (or calls) per figure")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument(
        "--logits-fraction",
        type=float,
        default=0.17,
        help="train.logits_fraction of our step: LM head only at trained positions, up to "
        "this fraction of each row (the bench rows train 64 of 384 tokens, 0.167); a row "
        "with more falls back to all positions, so it changes speed, never the result",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="train: LoRA stage 2 (ours) vs our full stage 2 vs transformers + peft "
        "(neva_jax/bench/lora_bench.py) instead of stages 1 and 2",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="train --lora: adapter rank")
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, help="train --lora: adapter dropout (LLaVA's)"
    )
    p.add_argument("--new-tokens", type=int, default=64, help="decode: new tokens per call")
    p.add_argument("--decode-batches", default="1,8", help="decode: comma-separated batch sizes")
    p.add_argument("--depths", default="4,32", help="compile: the two decoder depths to compare")
    p.add_argument("--skip-unrolled", action="store_true", help="compile: scan_layers only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # Threads first: XLA sizes its CPU pool from the affinity when its backend starts.
    from neva_jax.bench import timing

    threads = timing.configure_threads(args.threads)

    import jax

    from neva_jax.bench import shapes
    from neva_jax.bench.report import Report

    report = Report()
    report.emit(
        "env",
        "setup",
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=jax.device_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        suite=args.suite,
        shape=args.shape,
        **{k: v for k, v in threads.items() if k != "cpus"},
        torch=_torch_version(),
    )
    shape = shapes.bench() if args.shape == "bench" else shapes.tiny()
    suites = SUITES if args.suite == "all" else (args.suite,)
    t0 = time.perf_counter()
    train_result = None
    if "train" in suites and args.lora:
        from neva_jax.bench.lora_bench import run_lora

        run_lora(
            report,
            shape,
            rank=args.lora_rank,
            dropout=args.lora_dropout,
            steps=args.steps,
            warmup=args.warmup,
            logits_fraction=args.logits_fraction,
        )
    elif "train" in suites:
        from neva_jax.bench.train_bench import run_train

        train_result = run_train(
            report,
            shape,
            steps=args.steps,
            warmup=args.warmup,
            logits_fraction=args.logits_fraction,
        )
    if "util" in suites:
        from neva_jax.bench.train_bench import run_util

        run_util(report, shape, train_result, logits_fraction=args.logits_fraction)
    if "decode" in suites:
        from neva_jax.bench.decode_bench import run_decode

        batches = tuple(int(b) for b in args.decode_batches.split(","))
        run_decode(report, shape, batches=batches, new_tokens=args.new_tokens, repeats=args.steps)
    if "compile" in suites:
        from neva_jax.bench.compile_bench import run_compile

        lo, hi = (int(d) for d in args.depths.split(","))
        run_compile(report, shape, depths=(lo, hi), unrolled=not args.skip_unrolled)
    if "packing" in suites:
        from neva_jax.bench.packing_bench import run_packing

        run_packing(report, shape, steps=args.steps, logits_fraction=args.logits_fraction)
    report.emit("env", "done", wall_s=time.perf_counter() - t0)
    print()
    print(report.table())
    return 0


def _torch_version() -> str | None:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
