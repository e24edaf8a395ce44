"""Metrics: `metrics.jsonl`, TensorBoard, the progress line, and model FLOPs / MFU.

`metrics.jsonl` holds one JSON object per line. A training line is written every
`train.log_every` steps and averages the steps since the previous one: `step`
(updates taken, 1-based), `loss`, `accuracy` (argmax accuracy on trained tokens),
`grad_norm` (before clipping), `trained_tokens`, `tokens` (non-padding input tokens
of the global batch, image slots included), `step_time_sec`; plus `tokens_per_sec`
(the window's tokens / its wall time), `learning_rate` and `nonfinite_count` (skipped
steps so far) of its last step, and `mfu` when the device's peak is known. Evaluation
lines carry `step` and `eval/loss`, `eval/accuracy`, `eval/tokens`. After a resume
the lines past the restored step are dropped, so each step appears once; a step has at
most one eval line (evaluating it again replaces it).

Model FLOPs follow docs/REFERENCE.md "FLOP convention": the LLM counts 6N per token when its
weights train and 4N when frozen (N = its matmul parameters, LM head included,
input embedding excluded; LoRA adapters count 6x theirs when they train), plus
causal attention 6*S*d*L (4*S*d*L frozen); the
vision tower counts its forward pass only unless it trains; the projector 6x its
parameters per image token. MFU is reported only against a measured peak.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from neva_jax.model.parts import ADAPTERS

METRICS_FILE = "metrics.jsonl"

# Peak dense bf16 FLOP/s per device MEASURED on these machines (docs/REFERENCE.md
# "Measured peaks").
# Other devices get no MFU unless `peak_flops_per_device` is given.
MEASURED_PEAK_FLOPS = {"H200": 790e12}


def measured_peak_flops(device: jax.Device | None = None) -> float | None:
    """The measured peak for `device`'s kind, or None (then MFU is omitted)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return None
    for name, peak in MEASURED_PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peak
    return None


def _matmul_params(tree: Any, skip: tuple[str, ...] = ()) -> int:
    """Parameters of leaves with ndim >= 2 (per layer for stacked layers) outside `skip`."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if any(s in names for s in skip):
            continue
        shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
        if len(shape) >= 2 and not any("norm" in n for n in names):
            total += int(np.prod(shape))
    return total


def model_flops_per_step(
    params: Mapping[str, Any],
    *,
    trained_parts: tuple[str, ...],
    tokens: int,
    seq_len: int,
    images: int,
    image_tokens: int,
    num_layers: int,
    hidden_size: int,
) -> float:
    """Model FLOPs of one optimizer step (docs/REFERENCE.md "FLOP convention").

    `params` is the full nested parameter dict (arrays or ShapeDtypeStructs) with
    top-level `llm`, `projector`, `vision`; `tokens` the non-padding tokens of the
    global batch; `images` the real images; `image_tokens` the image slots filled.
    """
    llm_n = _matmul_params(params.get("llm", {}), skip=("embed", "pos_embed", ADAPTERS))
    adapters_n = _matmul_params(params.get("llm", {})) - _matmul_params(
        params.get("llm", {}), skip=(ADAPTERS,)
    )
    llm_trains = "llm" in trained_parts
    per_token = (6 if llm_trains else 4) * llm_n
    per_token += (6 if llm_trains or ADAPTERS in trained_parts else 4) * adapters_n
    per_token += (6 if llm_trains else 4) * seq_len * hidden_size * num_layers
    flops = float(per_token) * tokens
    vis_n = _matmul_params(params.get("vision", {}))
    patches_per_image = image_tokens / max(images, 1)
    flops += (6 if "vision" in trained_parts else 2) * vis_n * patches_per_image * images
    flops += 6 * _matmul_params(params.get("projector", {})) * image_tokens
    return flops


def _same_eval(line: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    """Whether `line` is an evaluation of `row`'s step."""
    return line.get("step") == row["step"] and any(k.startswith("eval/") for k in line)


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Removes lines with `step` > `step` (after a resume from that step)."""
        if self.enabled:
            self._drop(lambda line: line.get("step", 0) > step)

    def _drop(self, unwanted: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrites the file without the lines `unwanted` picks (when it picks any)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = [ln for ln in lines if not unwanted(json.loads(ln))]
        if len(kept) < len(lines):
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes one line `{"step": step, **values}` (floats) and the TensorBoard scalars.

        An evaluation of a step that already has one (`--mode eval` again, a finished run
        started again) replaces that line, so each step keeps one eval line."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            v = np.asarray(v)
            row[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
        if any(k.startswith("eval/") for k in row):
            self._drop(lambda line: _same_eval(line, row))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        """Flushes TensorBoard."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Progress:
    """A one-line progress report: step, loss, lr, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, *, stream: Any = None, enabled: bool | None = None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.start = time.time()
        self.isatty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, row: Mapping[str, Any], *, first_step: int = 0) -> None:
        """Prints the line for `step` (on a terminal in place, else one line per call)."""
        if not self.enabled:
            return
        done = max(step - first_step, 1)
        eta = (time.time() - self.start) / done * (self.total - step)
        parts = [f"step {step}/{self.total}", f"loss {row['loss']:.4f}"]
        parts.append(f"lr {row['learning_rate']:.2e}")
        parts.append(f"tok/s {row['tokens_per_sec']:,.0f}")
        if "mfu" in row:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        if row.get("nonfinite_count"):
            parts.append(f"skipped {row['nonfinite_count']}")
        parts.append(f"eta {eta:,.0f}s")
        line = "  ".join(parts)
        if self.isatty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the in-place line."""
        if self.enabled and self.isatty:
            self.stream.write("\n")
            self.stream.flush()
