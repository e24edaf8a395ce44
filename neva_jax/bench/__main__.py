"""`python -m neva_jax.bench [train|decode|compile|util|packing|all|serve] [flags]`.

Prints one JSON line per measurement, then a table of the figures and targets.
See `neva_jax/bench/__init__.py` for what each sub-command measures. Each
side-by-side figure is repeated (`--repeats`, interleaved ours / transformers) and
printed as median [min..max spread]; ratios are ratios of medians. Both sides run
in this one process, so under the same allocator (`neva_jax.allocator`; the `env`
line and the table say which). Examples:

    python -m neva_jax.bench all                    # the CPU comparison, under 10 minutes
    python -m neva_jax.bench train --repeats 9      # train step only, more repeats
    python -m neva_jax.bench train --lora           # LoRA stage 2: ours vs our full vs peft
    python -m neva_jax.bench all --shape tiny --repeats 2 --skip-unrolled   # seconds
    NEVA_JAX_ALLOCATOR=system python -m neva_jax.bench train   # without a caching allocator
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import argparse
import os
import sys
import time

SUITES = ("train", "util", "decode", "compile", "packing")
EXTRA = ("serve",)  # not in `all`: run on its own


def _sizes(p: argparse.ArgumentParser, flag: str, value: str, count: int | None = None) -> tuple:
    """'1,8' -> (1, 8): positive integers (`count` of them when given), else a usage error."""
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or (count is not None and len(sizes) != count):
        what = f"{count} " if count else ""
        p.error(f"{flag} {value!r}: expected {what}comma-separated positive integers, e.g. 1,8")
    return sizes


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m neva_jax.bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("suite", nargs="?", default="all", choices=(*SUITES, *EXTRA, "all"))
    p.add_argument("--shape", default="bench", choices=("bench", "tiny"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of BOTH sides (XLA via CPU affinity, torch.set_num_threads). "
        "Default 1: on a shared machine a multi-threaded torch spin-waits for descheduled "
        "OpenMP threads and the ratio then measures the load, not the code",
    )
    p.add_argument(
        "--repeats",
        "--steps",
        dest="repeats",
        type=int,
        default=5,
        help="timed runs of each figure per side (train steps, decode calls), interleaved "
        "ours / transformers; figures are medians with min, max and spread",
    )
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
    p.add_argument("--clients", default="1,4,16", help="serve: comma-separated client counts")
    p.add_argument(
        "--serve-tokens",
        type=int,
        default=64,
        help="serve: mean tokens per answer (varied 1/4-7/4)",
    )
    args = p.parse_args(argv)
    args.decode_batches = _sizes(p, "--decode-batches", args.decode_batches)
    args.depths = _sizes(p, "--depths", args.depths, count=2)
    args.clients = _sizes(p, "--clients", args.clients)
    for flag in ("repeats", "threads", "new_tokens", "serve_tokens", "lora_rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.lora and args.suite not in ("train", "all"):
        p.error(f"--lora is a train option; {args.suite} does not take it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # Threads first: XLA sizes its CPU pool from the affinity when its backend starts.
    from neva_jax.bench import timing

    threads = timing.configure_threads(args.threads)

    import jax

    # Compile times are figures here: a program read back from a persistent compilation
    # cache (JAX_COMPILATION_CACHE_DIR) would be timed as a file read.
    jax.config.update("jax_enable_compilation_cache", False)

    from neva_jax import allocator
    from neva_jax.bench import shapes
    from neva_jax.bench.report import Report

    if args.repeats < 1:
        raise SystemExit(f"error: --repeats={args.repeats}: must be at least 1")
    report = Report()
    memory = allocator.in_use()
    report.emit(
        "env",
        "setup",
        allocator=memory["name"],
        allocator_detail=memory["detail"],
        repeats=args.repeats,
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
            repeats=args.repeats,
            warmup=args.warmup,
            logits_fraction=args.logits_fraction,
        )
    elif "train" in suites:
        from neva_jax.bench.train_bench import run_train

        train_result = run_train(
            report,
            shape,
            repeats=args.repeats,
            warmup=args.warmup,
            logits_fraction=args.logits_fraction,
        )
    if "util" in suites:
        from neva_jax.bench.train_bench import run_util

        run_util(report, shape, train_result, logits_fraction=args.logits_fraction)
    if "decode" in suites:
        from neva_jax.bench.decode_bench import run_decode

        run_decode(
            report,
            shape,
            batches=args.decode_batches,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    if "compile" in suites:
        from neva_jax.bench.compile_bench import run_compile

        run_compile(report, shape, depths=args.depths, unrolled=not args.skip_unrolled)
    if "packing" in suites:
        from neva_jax.bench.packing_bench import run_packing

        run_packing(report, shape, repeats=args.repeats, logits_fraction=args.logits_fraction)
    if "serve" in suites:
        from neva_jax.bench.serve_bench import run_serve

        run_serve(report, shape, clients=args.clients, new_tokens=args.serve_tokens)
    report.emit("env", "done", wall_s=time.perf_counter() - t0)
    print()
    print(f"allocator (both sides, one process): {memory['name']}: {memory['detail']}")
    print(f"figures: median [min..max spread] of {args.repeats} interleaved runs per side")
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
