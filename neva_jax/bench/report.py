"""Benchmark output: one JSON line per measurement, then a table of the figures and targets.

Every measurement is a flat dict with at least `bench` (train, decode, compile,
util, packing, target, env) and `name`; `Report.emit` prints it as one JSON line
at once (so a run that is cut short still leaves its figures) and keeps it for
the final table. A repeated figure `x` (the median) comes with `x_min`, `x_max`
and `x_spread` ((max - min) / median); the table shows them beside it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "NO", None: "-"}[v]
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


class Report:
    """Collects measurements, prints each as a JSON line, renders the final table."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.records: list[dict[str, Any]] = []

    def emit(self, bench: str, name: str, **fields: Any) -> dict[str, Any]:
        """Prints and keeps one measurement."""
        rec = {"bench": bench, "name": name, **fields}
        print(json.dumps(rec, default=float), file=self.out, flush=True)
        self.records.append(rec)
        return rec

    def target(
        self, name: str, value: float, goal: str, met: bool, **fields: Any
    ) -> dict[str, Any]:
        """A target line: the measured figure, the goal in words, whether it is met."""
        return self.emit("target", name, value=value, goal=goal, met=bool(met), **fields)

    def find(self, bench: str, name: str) -> dict[str, Any] | None:
        """The last measurement with this bench and name (None when absent)."""
        for rec in reversed(self.records):
            if rec["bench"] == bench and rec["name"] == name:
                return rec
        return None

    def table(self) -> str:
        """The measurements (key figures) and the targets as two aligned text tables."""
        keys = (
            "step_s",
            "cpu_s",
            "tokens_per_s",
            "compile_s",
            "e2e_s",
            "e2e_cpu_s",
            "ttft_s",
            "decode_tokens_per_s",
            "recompiles",
            "total_s",
            "tflops",
            "util",
            "mfu",
            "program_gib",
            "peak_gib",
            "error",
            "skipped",
            "real_tokens_per_s",
            "loss",
            "speedup",
            "speedup_cpu",
            "ratio",
            "decode_rate_ratio",
            "latency_ratio",
            "ttft_ratio",
            "greedy_token_agreement",
            "first_loss_abs_diff",
            "real_tokens_per_s_ratio",
            "peak_gflops",
            "weight_mb",
            "weight_read_ms",
            "our_step_ms",
            "hf_step_ms",
            "best_possible_rate_ratio",
        )
        lines = ["measurements:"]
        rows = [("bench", "name", "figures")]
        for rec in self.records:
            if rec["bench"] in ("target", "env"):
                continue
            figs = " ".join(_figure(rec, k) for k in keys if k in rec)
            rows.append((rec["bench"], rec["name"], figs))
        lines += _aligned(rows)
        lines.append("")
        lines.append("targets:")
        rows = [("target", "value", "goal", "met")]
        for rec in self.records:
            if rec["bench"] == "target":
                value = _fmt(rec["value"])
                if "spread" in rec:
                    value += f" (spread {rec['spread']:.1%})"
                rows.append((rec["name"], value, rec["goal"], _fmt(rec["met"])))
        lines += _aligned(rows)
        return "\n".join(lines)


def _figure(rec: dict[str, Any], key: str) -> str:
    """`key=median`, then `[min..max spread%]` when the figure was repeated."""
    text = f"{key}={_fmt(rec[key])}"
    if f"{key}_min" in rec and f"{key}_max" in rec:
        lo, hi = _fmt(rec[f"{key}_min"]), _fmt(rec[f"{key}_max"])
        text += f" [{lo}..{hi} {rec.get(f'{key}_spread', float('nan')):.0%}]"
    return text


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
