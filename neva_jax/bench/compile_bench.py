"""Compile time of the stage-2 train step against depth, with and without `scan_layers`.

The step is lowered and compiled from abstract shapes (nothing is allocated), so
a 32-layer model costs no memory. With `scan_layers` the decoder is one
`lax.scan` body whatever the depth, so its compile time should barely grow; the
unrolled variant grows with the number of layers.
"""

from __future__ import annotations

import dataclasses

from neva_jax.bench import jax_side, shapes
from neva_jax.bench.report import Report
from neva_jax.bench.shapes import BenchShape
from neva_jax.model.neva import NevaConfig

SCAN_GROWTH_GOAL = 1.5


def with_layers(cfg: NevaConfig, num_layers: int, scan: bool) -> NevaConfig:
    """`cfg` with `num_layers` decoder layers and `scan_layers=scan` (both towers)."""
    llm = dataclasses.replace(cfg.llm, num_layers=num_layers, scan_layers=scan)
    vision = dataclasses.replace(cfg.vision, scan_layers=scan)
    return dataclasses.replace(cfg, llm=llm, vision=vision)


def run_compile(
    report: Report,
    shape: BenchShape,
    *,
    depths: tuple[int, int] = (4, 32),
    unrolled: bool = True,
) -> dict[tuple[int, bool], float]:
    """Compile seconds per (layers, scan); prints them and the scan growth target."""
    batch = shapes.make_batch(shape)
    out: dict[tuple[int, bool], float] = {}
    for scan in (True, False) if unrolled else (True,):
        for layers in depths:
            cfg = with_layers(shape.model, layers, scan)
            secs = jax_side.abstract_compile_seconds(cfg, batch, stage=2)
            out[(layers, scan)] = secs["total_s"]
            report.emit(
                "compile",
                f"layers{layers}_{'scan' if scan else 'unrolled'}",
                layers=layers,
                scan_layers=scan,
                **secs,
            )
    lo, hi = depths
    growth = out[(hi, True)] / out[(lo, True)]
    report.target(
        f"compile {hi} layers / {lo} layers (scan_layers)",
        growth,
        f"<= {SCAN_GROWTH_GOAL}",
        growth <= SCAN_GROWTH_GOAL,
    )
    return out
