"""Timing tools shared by the benchmarks: thread set-up, interleaved medians, a compile
counter and the measured matmul peak.

Threads: `transformers` runs on `torch.set_num_threads(n)` intra-op threads; XLA's
CPU backend sizes its intra-op pool from the CPUs the process may run on, so
`configure_threads(n)` restricts the process's CPU affinity to n CPUs (before the
JAX backend starts) and sets torch to the same n. Both figures are printed.
The bench defaults to one thread: on a loaded machine (2 cores shared by several
people here) torch's OpenMP threads spin-wait for descheduled siblings, which made
`transformers` 2-3x slower at 2 threads than at 1 and inflated our ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# A program read from the persistent compilation cache (JAX_COMPILATION_CACHE_DIR) is
# not compiled, so it records this instead of the event above.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def configure_threads(n: int | None) -> dict[str, Any]:
    """Pins this process to n CPUs (all it may use when None) and torch to n threads.

    Call before the JAX backend starts. Returns what both sides will use.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if n is not None:
        if not 1 <= n <= len(cpus):
            raise ValueError(f"--threads={n}: this process may use {len(cpus)} CPUs")
        cpus = cpus[:n]
        os.sched_setaffinity(0, cpus)
    info: dict[str, Any] = {"xla_cpu_threads": len(os.sched_getaffinity(0)), "cpus": cpus}
    try:
        import torch

        torch.set_num_threads(len(cpus))
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        info["torch_threads"] = None
    return info


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds). `fn` must block until its result is ready."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@dataclasses.dataclass
class Timings:
    """Per-callable wall-clock seconds and process CPU seconds, one entry per call."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(fns: dict[str, Callable[[], Any]], *, steps: int, warmup: int = 1) -> Timings:
    """Times each blocking callable `steps` times after `warmup` calls, round-robin.

    Interleaving puts every side under the same background load (this machine is
    shared), so ratios of medians are fair even when absolute times drift. The
    process CPU time of each call is kept too: on a loaded machine it is the
    steadier figure (a descheduled thread accrues none), though a thread pool that
    spins while waiting counts its spinning.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = Timings({k: [] for k in fns}, {k: [] for k in fns})
    for _ in range(steps):
        for name, fn in fns.items():
            c0 = time.process_time()
            out.wall[name].append(timed(fn)[1])
            out.cpu[name].append(time.process_time() - c0)
    return out


def median(xs: Sequence[float]) -> float:
    """The median of `xs`."""
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median of `xs`: the run-to-run spread as a fraction of the figure."""
    return (max(xs) - min(xs)) / median(xs)


def summary(name: str, xs: Sequence[float]) -> dict[str, float]:
    """{name: median, name_min, name_max, name_spread} of the repeated figure `xs`."""
    return {
        name: median(xs),
        f"{name}_min": float(min(xs)),
        f"{name}_max": float(max(xs)),
        f"{name}_spread": spread(xs),
    }


def ratio_summary(name: str, num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """The ratio of medians median(num) / median(den) as `name`, with the spread of the
    per-repeat ratios num[i] / den[i] (each pair measured back to back, so under the
    same load): `name_min`, `name_max`, `name_spread` ((max - min) / ratio of medians).
    """
    pairs = [n / d for n, d in zip(num, den, strict=True)]
    ratio = median(num) / median(den)
    return {
        name: ratio,
        f"{name}_min": min(pairs),
        f"{name}_max": max(pairs),
        f"{name}_spread": (max(pairs) - min(pairs)) / ratio,
    }


class CompileCounter:
    """Counts the programs XLA compiles, or reads back from the persistent compilation
    cache, for any jitted function while it is active; `seconds` is the compile time."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration: float, **_: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def _hit(self, event: str, **_: Any) -> None:
        if event == CACHE_HIT_EVENT:
            self.count += 1

    @contextlib.contextmanager
    def active(self) -> Iterator[CompileCounter]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        jax.monitoring.register_event_listener(self._hit)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            jax.monitoring.unregister_event_listener(self._hit)


def jax_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of an [n, n] x [n, n] jitted matmul (chained 4x per call)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype) / n**0.5

    @jax.jit
    def chain(x: jax.Array) -> jax.Array:
        for _ in range(4):
            x = x @ b
        return x

    chain(a).block_until_ready()
    best = min(timed(lambda: chain(a).block_until_ready())[1] for _ in range(repeats))
    return 4 * 2.0 * n**3 / best


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an fp32 [n, n] x [n, n] torch matmul (4 chained per call)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n) / n**0.5

    def chain() -> None:
        x = a
        for _ in range(4):
            x = x @ b

    chain()
    best = min(timed(chain)[1] for _ in range(repeats))
    return 4 * 2.0 * n**3 / best


def weight_read_seconds(nbytes: int, width: int = 512, repeats: int = 9) -> float:
    """Median seconds of a jitted [1, width] x [width, n] float32 product over a matrix of
    `nbytes`: reading that many bytes of weights once, as a batch-1 decode step must.

    A working set larger than the last-level cache reads at the memory's bandwidth
    (here ~17 GB/s for 168 MB against ~25 GB/s for 65 MB), so size it as the model's.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = max(1, nbytes // 4 // width)
    w = jax.random.normal(jax.random.key(0), (width, n), jnp.float32)
    h = jnp.ones((1, width), jnp.float32)
    matvec = jax.jit(lambda h, w: h @ w)
    matvec(h, w).block_until_ready()
    runs = [timed(lambda: matvec(h, w).block_until_ready())[1] for _ in range(repeats)]
    return float(np.median(runs))


def stream_read_seconds(nbytes: int, repeats: int = 9) -> float:
    """Median seconds of numpy summing `nbytes` of float32: the same read as
    `weight_read_seconds` by code outside XLA, so the floor does not rest on XLA's
    matvec alone."""
    import numpy as np

    a = np.ones(max(1, nbytes // 4), np.float32)
    a.sum()
    return float(np.median([timed(a.sum)[1] for _ in range(repeats)]))
