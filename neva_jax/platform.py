"""Backend-dependent choices, made once at the edge of the program.

Model code never asks which backend it runs on: a branch on `jax.default_backend()`
inside a layer would run only one side in the (CPU-only) test suite. Instead the
places that build a model to run it here (the trainer, `load_model`, generation)
resolve these choices once and pass them down as plain config fields or arguments,
and tests run every side on CPU by passing them explicitly:

| choice | CPU | GPU / other | where it is used |
|---|---|---|---|
| `attention_impl` `auto` | `xla` | `auto` (cuDNN where the shape allows) | `attention.select_implementation` |
| `row_major_weight_grads` | True | False | `layers.Dense`, `Llama.logits` |
| `scan_layers` `None` | False (unrolled) | True (`lax.scan`) | `layers.apply_stacked` |
| decode weights | per layer (sliced once per call) | stacked (sliced per step) | `eval.generate.generate_tokens` |

Why these: XLA:CPU runs a weight gradient written as one 2-D matmul of the flattened
input and output gradient near its matmul peak, but the form XLA picks on its own for
a contraction over batch and length (a transposed copy of the larger operand, then a
generic dot) about 15% slower per step; GPU matmul libraries take transposed operands
as they are. On CPU a
decode step that slices each layer's weights out of the stacked [L, ...] arrays
copies them every step; slicing them once per call costs a second copy of the LLM's
weights for the call's duration, which an accelerator serving a 7B model may not
have room for. A scan over the stacked layers keeps compile time independent of depth,
which a 32-layer model on an accelerator needs; on CPU it costs about 6% of the
bench's train step, as the scan writes every layer's saved activations into [L, ...]
buffers and reads them back, which the unrolled program never does (CPU runs are
small models, where compile time hardly grows with depth).
"""

from __future__ import annotations

from typing import Any

import jax


def backend_name(backend: str | None = None) -> str:
    """`backend`, or the platform JAX computes on by default ('cpu', 'gpu', 'tpu')."""
    return backend or jax.default_backend()


def resolve_runtime(backend: str | None = None, **runtime: Any) -> dict[str, Any]:
    """Run-time model fields (`neva.RUNTIME_FIELDS`) for a model that runs on `backend`.

    Explicit `runtime` values win, except that `attention_impl='auto'` (the default)
    becomes `xla` on every backend but a GPU, where cuDNN exists, and that
    `scan_layers=None` (the default) becomes False on CPU, True elsewhere.
    """
    backend = backend_name(backend)
    out = {"attention_impl": "auto", "row_major_weight_grads": backend == "cpu", **runtime}
    if out.get("scan_layers") is None:
        out["scan_layers"] = backend != "cpu"
    if out["attention_impl"] == "auto" and backend != "gpu":
        out["attention_impl"] = "xla"
    return out


def per_layer_decode(backend: str | None = None) -> bool:
    """Whether generation slices the LLM's per-layer weights once per call (CPU)."""
    return backend_name(backend) == "cpu"
