"""Memory plan: per-device bytes of a training run under a mesh and remat policy.

    python -m neva_jax.main --config configs/llava_v15.py:stage2,size=13b --workdir /tmp/p \\
        --mode plan --config.plan.num_devices=8 --config.mesh.fsdp=8 --config.mesh.data=1 \\
        --config.plan.device_memory_gb=141

or `plan.plan_run(cfg, num_devices)` / `plan.estimate(...)` from Python. Nothing is allocated or
compiled: the model is built with `nnx.eval_shape` and every parameter's per-device
shard is its shape divided by the mesh axes that `sharding.LOGICAL_RULES` gives its
logical axes, exactly as the trainer places it (tests/scale checks this against real
arrays). Units: GB = 1e9 bytes.

State (exact, from the abstract model and optimizer):
- parameters: every parameter in `precision.param_dtype`, the frozen ones in
  `train.frozen_param_dtype` when it is set (e.g. a bf16 LLM base under LoRA);
- gradients: the trained parameters only (stage 1: projector; stage 2: + LLM, or
  + the LLM's LoRA adapters with `model.peft.scheme=lora`), in their dtype; twice
  that with `train.grad_accum_steps > 1` (accumulator + micro);
- optimizer state: AdamW's moments of the trained parameters (`tx.init` shapes),
  sharded like their parameters.

Activations (a model, per device; b = micro-batch rows per device = batch_size /
grad_accum_steps / (data*fsdp), T = data.max_seq_len, c = bytes of the compute dtype,
D/F/N/K/H the decoder's widths and heads, /t = divided by mesh.tensor):
- layers: kept for the backward pass, L*b*T*c times per token: `none` 6D +
  (2N+3K)H/t + 5F/t (residuals, norm outputs and statistics, q/k/v, rotated q/k,
  attention output, gate/up/activation/product); `selective` (matmul outputs saved)
  3D + (N+2K)H/t + 2F/t; `full` D (each layer's input only); LoRA adds each
  adapter's x @ A (its rank) to `none` and `selective`, and with dropout each
  adapter's dropped input (its input width) to `none`;
- peak of the backward pass, the larger of: the logits (2 float32 copies of
  b*T*V/t: logits and their gradient; with `train.logits_fraction` < 1 the step
  compiles both the capacity branch and the all-positions fallback: 3 copies at T
  plus 2 at the capacity) and one layer's backward pass: without flash attention its
  attention scores, N/t*T*(2c+4) bytes per token (the XLA path recomputes them there
  and keeps none across layers), plus its `none` activations recomputed (remat);
- vision + projector: the frozen tower runs forward only, one layer live at a time,
  plus the image features and projector activations kept for the projector's
  gradient; the batch arrays (images in float32);
- weight buffers: two decoder layers' weights in the compute dtype (all-gathered
  over fsdp: the current and the prefetched layer) and one layer's float32 weight
  gradient before its reduce-scatter (under LoRA: its adapters').
Checked against XLA's own buffer assignment of the real step (`compiled.memory_analysis()`,
float32 on CPU, XLA attention): -3.5 % (`none`), +7.1 % (`selective`), +6.3 % (`full`)
(tests/scale/test_plan.py holds it to 10 %); the bf16 and flash-attention terms are
not checked on a GPU yet. Not modelled: XLA
workspace, fragmentation, NCCL/cuDNN buffers; `plan.memory_fraction` (default 0.9)
of the device memory is taken as usable to leave room for them (the launchers raise
JAX's GPU preallocation to 0.95 with XLA_PYTHON_CLIENT_MEM_FRACTION).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from neva_jax import sharding
from neva_jax.model import parts as model_parts
from neva_jax.model.neva import Neva, NevaConfig
from neva_jax.run_config import RunConfig, mesh_shape
from neva_jax.train import optimizer as opt_lib
from neva_jax.train.step import capacity

GB = 1e9
REMAT_ORDER = ("none", "selective", "full")
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one optimizer step processes (global numbers; see the module docstring)."""

    batch_size: int  # global rows per optimizer step
    seq_len: int  # T
    images_per_row: int = 1  # M
    grad_accum_steps: int = 1
    flash_attention: bool = True  # cuDNN flash attention: no T x T scores kept
    logits_fraction: float = 1.0  # train.logits_fraction


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes of one configuration; `bytes` holds the parts, `detail` the split."""

    mesh: dict[str, int]
    remat: str
    workload: Workload
    params_total: int
    params_trained: int
    bytes: dict[str, int]  # parameters, gradients, optimizer, activations
    detail: dict[str, int]  # the activation terms

    @property
    def total(self) -> int:
        return int(sum(self.bytes.values()))

    @property
    def rows_per_device(self) -> int:
        w = self.workload
        return w.batch_size // w.grad_accum_steps // (self.mesh["data"] * self.mesh["fsdp"])

    def fits(self, device_bytes: float, fraction: float = 0.9) -> bool:
        return self.total <= device_bytes * fraction


# ----------------------------------------------------------------------------------------
# Parameters: abstract shapes and logical axes of the real model.


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """The model's parameters (ShapeDtypeStructs) and their PartitionSpecs, as nested dicts."""

    config: NevaConfig
    params: PyTree
    specs: PyTree


@functools.lru_cache(maxsize=8)
def abstract_model(ncfg: NevaConfig) -> AbstractModel:
    """`Neva(ncfg)` under `nnx.eval_shape` (nothing allocated), with each parameter's spec."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Neva(ncfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = jax.tree.map(
        lambda v: partition_spec(v.get_metadata().get("out_sharding") or (), v.get_value().ndim),
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return AbstractModel(ncfg, nnx.to_pure_dict(state), nnx.to_pure_dict(specs))


def partition_spec(axes: Sequence[str | None], ndim: int) -> PartitionSpec:
    """The PartitionSpec the trainer gives a parameter with logical `axes` (LOGICAL_RULES)."""
    if not axes:
        return PartitionSpec(*([None] * ndim))
    return nn.logical_to_mesh_axes(tuple(axes), sharding.LOGICAL_RULES)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh: Mapping[str, int]) -> tuple:
    """Per-device shape of an array of `shape` split by `spec` over `mesh` (padded up)."""
    out = []
    for i, n in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        ways = int(np.prod([mesh[a] for a in names])) if names else 1
        out.append(-(-int(n) // ways))
    return tuple(out)


def _leaf_bytes(x: Any, spec: PartitionSpec, mesh: Mapping[str, int]) -> int:
    return int(np.prod(shard_shape(x.shape, spec, mesh))) * np.dtype(x.dtype).itemsize


def param_bytes_per_device(am: AbstractModel, mesh: Mapping[str, int]) -> dict[str, int]:
    """{top-level part: per-device bytes} of the parameters, e.g. {'llm': ..., 'vision': ...}."""
    per_leaf = jax.tree.map(lambda x, s: _leaf_bytes(x, s, mesh), am.params, am.specs)
    return {part: int(sum(jax.tree.leaves(tree))) for part, tree in per_leaf.items()}


def _count(tree: PyTree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------
# The estimate.


def state_bytes(
    am: AbstractModel,
    parts: Sequence[str],
    tx: optax.GradientTransformation,
    mesh: Mapping[str, int],
    grad_accum_steps: int = 1,
    frozen_dtype: str = "",
) -> dict[str, int]:
    """Per-device bytes of parameters, gradients and optimizer state (exact shapes).

    `frozen_dtype` (`train.frozen_param_dtype`): the frozen parameters' dtype, "" = as built.
    """
    trained, frozen = model_parts.split_dict(am.params, parts)
    trained_specs, frozen_specs = model_parts.split_dict(am.specs, parts)
    if frozen_dtype:
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype), frozen)

    def total(tree: PyTree, specs: PyTree) -> int:
        return int(
            sum(jax.tree.leaves(jax.tree.map(lambda x, s: _leaf_bytes(x, s, mesh), tree, specs)))
        )

    grads = total(trained, trained_specs)
    opt_bytes = opt_lib.map_param_leaves(
        lambda x, s: _leaf_bytes(x, s, mesh),
        jax.eval_shape(tx.init, trained),
        trained_specs,
        lambda x: _leaf_bytes(x, PartitionSpec(), mesh),
    )
    return {
        "parameters": grads + total(frozen, frozen_specs),
        "gradients": int(grads * (2 if grad_accum_steps > 1 else 1)),
        "optimizer": int(sum(jax.tree.leaves(opt_bytes))),
    }


def activation_bytes(
    ncfg: NevaConfig, workload: Workload, mesh: Mapping[str, int], remat: str
) -> dict[str, int]:
    """The activation terms of the module docstring, per device, in bytes."""
    llm, vis = ncfg.llm, ncfg.vision
    t = mesh["tensor"]
    b = workload.batch_size // workload.grad_accum_steps // (mesh["data"] * mesh["fsdp"])
    rows = workload.batch_size // (mesh["data"] * mesh["fsdp"])  # whole step's batch
    T, c = workload.seq_len, np.dtype(llm.compute_dtype).itemsize
    D, F, L, V = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers, llm.vocab_size
    N, K, H = llm.num_attention_heads, llm.num_kv_heads, llm.head_size
    none = (6 * D + (2 * N + 3 * K) * H / t + 5 * F / t) * c
    # Without flash attention a layer's backward pass holds its [T, S] scores (logits,
    # probabilities, their gradients): the XLA path keeps none of them across layers.
    scores = N / t * T * (2 * c + 4) if not workload.flash_attention else 0.0
    lora_r, lora_in = _adapter_widths(ncfg)
    none += (lora_r + lora_in) * c
    kept = {
        "none": none,
        "selective": (3 * D + (N + 2 * K) * H / t + 2 * F / t + lora_r) * c,
        "full": D * c,
    }[remat]
    tokens = b * T
    cap = capacity(T, workload.logits_fraction)
    logits = b * V / t * 4 * (2 * T if cap >= T else 3 * T + 2 * cap)
    M, P, E = workload.images_per_row, ncfg.num_image_tokens, vis.hidden_size
    S = P + vis.class_token_length
    vis_c = np.dtype(vis.compute_dtype).itemsize
    vis_layer = S * (4 * E + 2 * vis.ffn_hidden_size / t) * vis_c
    if not workload.flash_attention:
        vis_layer += vis.num_attention_heads / t * S * S * (2 * vis_c + 4)
    am = abstract_model(ncfg)
    layer_params = _count(am.params["llm"]["layers"]) / L / t
    # One layer's float32 weight gradient: under LoRA only the adapters have one.
    layer_grads = layer_params
    if ncfg.peft.enabled:
        adapters, _ = model_parts.split_dict(am.params["llm"], (model_parts.ADAPTERS,))
        layer_grads = _count(adapters) / L
    pixels = vis.image_size**2 * 3 * 4
    return {
        "layers": int(L * tokens * kept),
        "backward_peak": int(max(logits, tokens * (scores + (none if remat != "none" else 0)))),
        "vision_projector": int(b * M * (vis_layer + P * (E + 2 * D) * c)),
        "batch": int(rows * (T * 5 * 4 + M * pixels)),
        "weight_buffers": int(layer_params * 2 * c + layer_grads * 4),
    }


def _adapter_widths(ncfg: NevaConfig) -> tuple[int, int]:
    """Per token and layer, the LoRA adapters' kept widths: (sum of ranks: x @ A, the
    inputs that dropout copies: 0 without dropout)."""
    peft, llm = ncfg.peft, ncfg.llm
    widths = {"o": llm.num_attention_heads * llm.head_size, "down": llm.ffn_hidden_size}
    names = [p for p in peft.projections if p != "gate" or llm.activation == "swiglu"]
    dropped = sum(widths.get(p, llm.hidden_size) for p in names) if peft.dropout > 0 else 0
    return peft.rank * len(names), dropped


def estimate(
    ncfg: NevaConfig,
    parts: Sequence[str],
    tx: optax.GradientTransformation,
    mesh: Mapping[str, int],
    workload: Workload,
    remat: str | None = None,
    frozen_dtype: str = "",
) -> Estimate:
    """Per-device bytes of training `ncfg` (trained `parts`) on `mesh` (axis sizes);
    `frozen_dtype` as in `state_bytes`."""
    mesh = {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}
    remat = remat or ncfg.llm.remat_policy
    am = abstract_model(ncfg)
    state = state_bytes(am, parts, tx, mesh, workload.grad_accum_steps, frozen_dtype)
    detail = activation_bytes(ncfg, workload, mesh, remat)
    trained, _ = model_parts.split_dict(am.params, parts)
    return Estimate(
        mesh=mesh,
        remat=remat,
        workload=workload,
        params_total=_count(am.params),
        params_trained=_count(trained),
        bytes={**state, "activations": int(sum(detail.values()))},
        detail=detail,
    )


# ----------------------------------------------------------------------------------------
# From a run config: the configured layout, and the layouts that would fit.


def _uses_flash(ncfg: NevaConfig) -> bool:
    """`attention.implementation` on the target GPU: cudnn, or auto with a 16-bit dtype."""
    impl = ncfg.llm.attention_impl
    sixteen = np.dtype(ncfg.llm.compute_dtype).itemsize == 2
    ok_head = ncfg.llm.head_size % 8 == 0 and ncfg.llm.head_size <= 128
    return impl == "cudnn" or (impl == "auto" and sixteen and ok_head)


def run_parts(cfg: RunConfig) -> tuple[NevaConfig, optax.GradientTransformation, Workload]:
    """(model config, optimizer, workload) of a `RunConfig`."""
    ncfg = cfg.model
    workload = Workload(
        batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_seq_len,
        images_per_row=cfg.data.max_images_per_row,
        grad_accum_steps=cfg.train.grad_accum_steps,
        flash_attention=_uses_flash(ncfg),
        logits_fraction=cfg.train.logits_fraction,
    )
    return ncfg, opt_lib.make_optimizer(cfg.train), workload


def plan_run(cfg: RunConfig, num_devices: int) -> Estimate:
    """The estimate of `cfg` as configured (`mesh.*`) on `num_devices`."""
    ncfg, tx, workload = run_parts(cfg)
    mesh = dict(zip(sharding.MESH_AXES, mesh_shape(cfg.mesh, num_devices), strict=True))
    return estimate(
        ncfg,
        cfg.trained_parts,
        tx,
        mesh,
        workload,
        ncfg.llm.remat_policy,
        cfg.train.frozen_param_dtype,
    )


def _meshes(n: int, ncfg: NevaConfig) -> list[dict[str, int]]:
    """Candidate layouts of n devices: tensor in {1, 2, 4, 8} dividing the heads, the
    rest all fsdp or all data."""
    out = []
    for t in (1, 2, 4, 8):
        if n % t or ncfg.llm.num_kv_heads % t or ncfg.vision.num_attention_heads % t:
            continue
        for fsdp in sorted({1, n // t}):
            if ncfg.llm.hidden_size % fsdp == 0 and ncfg.vision.hidden_size % fsdp == 0:
                out.append({"data": n // t // fsdp, "fsdp": fsdp, "tensor": t})
    return out


def _candidates(cfg: RunConfig, num_devices: int, *, shrink_batch: bool):
    """Estimates over layouts x remat x (accumulation steps | smaller batches)."""
    ncfg, tx, base = run_parts(cfg)
    for mesh, remat in itertools.product(_meshes(num_devices, ncfg), REMAT_ORDER):
        dp = mesh["data"] * mesh["fsdp"]
        if shrink_batch:  # no accumulation, 1 .. batch_size/dp rows per device
            sizes = [(r * dp, 1) for r in range(1, max(base.batch_size // dp, 1) + 1)]
        else:
            sizes = [
                (base.batch_size, a)
                for a in range(1, base.batch_size + 1)
                if base.batch_size % a == 0 and (base.batch_size // a) % dp == 0
            ]
        for batch, accum in sizes:
            w = dataclasses.replace(base, batch_size=batch, grad_accum_steps=accum)
            yield estimate(
                ncfg, cfg.trained_parts, tx, mesh, w, remat, cfg.train.frozen_param_dtype
            )


def suggest(cfg: RunConfig, num_devices: int, device_bytes: float, fraction: float = 0.9) -> list:
    """Layouts that fit `train.batch_size`, best first: fewest accumulation steps, then
    least remat, least tensor, least fsdp (each costs speed)."""
    found = [
        e
        for e in _candidates(cfg, num_devices, shrink_batch=False)
        if e.fits(device_bytes, fraction)
    ]
    return sorted(
        found,
        key=lambda e: (
            e.workload.grad_accum_steps,
            REMAT_ORDER.index(e.remat),
            e.mesh["tensor"],
            e.mesh["fsdp"],
        ),
    )


def largest_batch(
    cfg: RunConfig, num_devices: int, device_bytes: float, fraction: float = 0.9
) -> Estimate | None:
    """The largest `train.batch_size` without accumulation that fits (ties: less remat);
    for when nothing fits at the configured batch."""
    fits = [
        e
        for e in _candidates(cfg, num_devices, shrink_batch=True)
        if e.fits(device_bytes, fraction)
    ]
    return max(
        fits, key=lambda e: (e.workload.batch_size, -REMAT_ORDER.index(e.remat)), default=None
    )


def min_devices(
    cfg: RunConfig, device_bytes: float, fraction: float = 0.9, limit: int = 4096
) -> int:
    """The fewest devices (a power of two) on which some layout fits at all (0: none)."""
    n = 1
    while n <= limit:
        if largest_batch(cfg, n, device_bytes, fraction) is not None:
            return n
        n *= 2
    return 0


def overrides(est: Estimate) -> str:
    """The `--config.*` flags that select `est`'s layout and batch."""
    m, w = est.mesh, est.workload
    return (
        f"--config.mesh.data={m['data']} --config.mesh.fsdp={m['fsdp']} "
        f"--config.mesh.tensor={m['tensor']} --config.remat.policy={est.remat} "
        f"--config.train.batch_size={w.batch_size} "
        f"--config.train.grad_accum_steps={w.grad_accum_steps}"
    )


def device_memory_bytes(configured_gb: float) -> float:
    """`plan.device_memory_gb` in bytes, else the first device's own limit, else 0."""
    if configured_gb > 0:
        return configured_gb * GB
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return float((stats or {}).get("bytes_limit", 0))


def report(cfg: RunConfig, num_devices: int, device_bytes: float, fraction: float = 0.9) -> str:
    """What `--mode plan` prints: the configured layout, then what fits if it does not."""
    lines = [format_estimate(plan_run(cfg, num_devices), device_bytes, fraction)]
    if not device_bytes:
        lines.append("no device memory to compare with: set --config.plan.device_memory_gb")
        return "\n".join(lines)
    fitting = suggest(cfg, num_devices, device_bytes, fraction)
    if fitting:
        best = fitting[0]
        lines.append(f"fastest layout that fits ({best.total / GB:.1f} GB): {overrides(best)}")
        return "\n".join(lines)
    lines.append(
        f"no layout of {num_devices} devices fits train.batch_size={cfg.train.batch_size}, "
        "whatever the remat policy and grad_accum_steps"
    )
    small = largest_batch(cfg, num_devices, device_bytes, fraction)
    if small is not None:
        lines.append(f"largest batch that fits ({small.total / GB:.1f} GB): {overrides(small)}")
    else:
        lines.append(
            f"not even one row fits; it needs {min_devices(cfg, device_bytes, fraction)} devices"
        )
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / GB:8.2f}"


def format_estimate(est: Estimate, device_bytes: float = 0.0, fraction: float = 0.9) -> str:
    """A table of the per-device bytes, and the verdict against `device_bytes` if given."""
    m, w = est.mesh, est.workload
    n_dev = m["data"] * m["fsdp"] * m["tensor"]
    lines = [
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({n_dev} devices), "
        f"remat={est.remat}, {est.rows_per_device} rows x {w.seq_len} tokens per device "
        f"per micro-batch (batch {w.batch_size}, grad_accum_steps {w.grad_accum_steps}), "
        f"{'flash' if w.flash_attention else 'XLA'} attention",
        f"parameters {est.params_total / 1e9:.3f} B, trained {est.params_trained / 1e9:.3f} B",
        "per device                GB",
    ]
    for key, value in est.bytes.items():
        lines.append(f"  {key:<20}{_gb(value)}")
    for key, value in est.detail.items():
        lines.append(f"    {key:<18}{_gb(value)}")
    lines.append(f"  {'total':<20}{_gb(est.total)}")
    if device_bytes:
        usable = device_bytes * fraction
        verdict = "fits" if est.fits(device_bytes, fraction) else "does NOT fit"
        lines.append(
            f"{verdict}: {est.total / GB:.1f} GB of {usable / GB:.1f} GB usable "
            f"({device_bytes / GB:.0f} GB x {fraction})"
        )
    return "\n".join(lines)
