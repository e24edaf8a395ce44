"""The GPU-only code paths, lowered for the CUDA platform on this CPU-only machine.

What runs only on a GPU never executes in this suite, so a shape, dtype or sharding
error there would first show on a user's cluster. Each path is traced with the
choices `neva_jax.platform` makes for a GPU and lowered to StableHLO for CUDA
(`jit(...).trace(...).lower(lowering_platforms=("cuda",))`): tracing checks shapes and
dtypes, the lowering checks that every operation has a CUDA rule (the cuDNN flash
attention custom calls included). Nothing is compiled or run for CUDA: that needs a
GPU (`launch/gpu_bench.sh` runs the parity tests on one).

JAX asks the installed cuDNN for its version while it traces cuDNN attention and
refuses without one; the lowering itself does not use it. The tests answer that
question with a recent cuDNN version (9.10), the only thing they fake.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo

from neva_jax import platform, sharding
from neva_jax.data import pipeline
from neva_jax.eval import generate as gen_lib
from neva_jax.model import neva
from neva_jax.train import build
from neva_jax.train import state as state_lib
from neva_jax.train import step as step_lib

B, T, M = 2, 64, 1  # even lengths: cuDNN's rule for a mask (bias) in training


@pytest.fixture(autouse=True)
def cudnn_version(monkeypatch):
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def _gpu_config(dtype: str = "bfloat16") -> neva.NevaConfig:
    """The tiny NeVA with the run-time choices made for a GPU: cuDNN attention where the
    shape allows, XLA's weight-gradient form, bf16 compute over fp32 master weights."""
    runtime = platform.resolve_runtime("gpu", dtype=dtype, param_dtype="float32")
    assert runtime["attention_impl"] == "auto" and not runtime["row_major_weight_grads"]
    return neva.with_runtime(neva.tiny(), **runtime)


def _lower(fn, *args, **static) -> str:
    lowered = jax.jit(fn, static_argnames=tuple(static)).trace(*args, **static)
    return lowered.lower(lowering_platforms=("cuda",)).as_text()


def _batch(cfg: neva.NevaConfig, rows: int = B) -> dict[str, jax.ShapeDtypeStruct]:
    size = cfg.vision.image_size
    i32 = lambda: jax.ShapeDtypeStruct((rows, T), jnp.int32)  # noqa: E731
    return {
        "input_ids": i32(),
        "targets": i32(),
        "loss_mask": jax.ShapeDtypeStruct((rows, T), jnp.float32),
        "segment_ids": i32(),
        "positions": i32(),
        "images": jax.ShapeDtypeStruct((rows, M, size, size, 3), jnp.float32),
    }


@pytest.mark.parametrize("remat", ["none", "full"])
def test_stage2_train_step_lowers_for_cuda(remat):
    """The whole stage-2 step (vision frozen, projector + LLM trained, AdamW), bf16
    compute with fp32 master weights, cuDNN attention forward and backward."""
    cfg = neva.with_runtime(_gpu_config(), remat_policy=remat)
    parts = ("projector", "llm")
    tx = optax.adamw(1e-3)
    with nnx.use_eager_sharding(False):
        graphdef, abstract = state_lib.abstract(lambda: neva.Neva(cfg, rngs=nnx.Rngs(0)), parts, tx)
    assert {x.dtype for x in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.float32)}
    step = step_lib.make_train_step(
        graphdef, tx, optax.constant_schedule(1e-3), trained_parts=parts, logits_fraction=0.5
    )
    text = _lower(step, abstract, _batch(cfg))
    # cuDNN flash attention: the decoder's (its segment mask as a bias) forward and
    # backward, the frozen tower's forward only.
    assert "__cudnn$fmhaScaleBiasSoftmax" in text
    assert "__cudnn$fmhaScaleBiasSoftmaxBackward" in text
    assert "__cudnn$fmhaSoftmax" in text and "__cudnn$fmhaSoftmaxBackward" not in text
    assert "bf16" in text


def test_sharded_train_step_lowers_for_cuda():
    """The stage-2 step on a 2x2x2 (data x fsdp x tensor) mesh with the trainer's own
    shardings (parameters, optimizer state, batch), lowered for CUDA: the sharding
    annotations of the GPU program are checked too."""
    cfg = _gpu_config()
    parts = ("projector", "llm")
    tx = optax.adamw(1e-3)
    mesh = sharding.make_mesh(2, 2, 2)
    graphdef, abstract, shards = build.abstract_train_state(cfg, parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-3), trained_parts=parts),
        shards,
        batch_sh,
        build.replicated(mesh),
    )
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
        for k, v in _batch(cfg, rows=4).items()  # rows split over data x fsdp
    }
    with jax.set_mesh(mesh):
        text = step.trace(abstract, batch).lower(lowering_platforms=("cuda",)).as_text()
    # Sharded, cuDNN attention is a custom-partitioned call that XLA expands per shard
    # when it compiles (on a GPU).
    assert "CustomSPMDPartitioning" in text
    assert '"tensor"' in text and '"fsdp"' in text  # the program carries the mesh axes


def test_generation_decode_form_lowers_for_cuda():
    """`generate_tokens`' GPU form: weights sliced from the stacked layers in each step,
    bf16 compute; prefill with cuDNN attention (even bucket), decode steps over the cache."""
    cfg = _gpu_config()
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: neva.Neva(cfg, rngs=nnx.Rngs(0))))
    size = cfg.vision.image_size
    i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    knobs = {
        "temperature": f32(()),
        "top_k": i32(()),
        "top_p": f32(()),
        "repetition_penalty": f32(()),
    }
    args = (
        state,
        None,  # no per-layer weights made by the caller
        i32((B, T)),
        i32((B, T)),
        i32((B, T)),
        f32((B, M, size, size, 3)),
        i32(()),
        knobs,
        jax.random.key(0),
        i32((1,)),
        i32(()),
        i32(()),
    )
    static = dict(
        graphdef=graphdef, new_tokens_bucket=8, return_logits=False, per_layer_weights=False
    )
    text = _lower(gen_lib._generate_jit.__wrapped__, *args, **static)
    assert "__cudnn$fmhaScaleBiasSoftmax" in text  # the prefill; decode steps (T=1) use XLA
    assert "stablehlo.while" in text


def test_cpu_choices_differ_from_gpu_choices():
    """The two sides the tests above and the rest of the suite execute."""
    cpu, gpu = platform.resolve_runtime("cpu"), platform.resolve_runtime("gpu")
    assert cpu == {"attention_impl": "xla", "row_major_weight_grads": True, "scan_layers": False}
    assert gpu == {"attention_impl": "auto", "row_major_weight_grads": False, "scan_layers": True}
    for b in ("cpu", "gpu"):  # an explicit choice wins
        assert platform.resolve_runtime(b, scan_layers=True)["scan_layers"] is True
        assert platform.resolve_runtime(b, scan_layers=False)["scan_layers"] is False
    assert platform.per_layer_decode("cpu") and not platform.per_layer_decode("gpu")
    assert np.all(
        [
            platform.resolve_runtime(b, attention_impl="xla")["attention_impl"] == "xla"
            for b in ("cpu", "gpu")
        ]
    )
