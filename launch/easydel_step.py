"""EasyDeL 0.3.0 stage-2 LLaVA train-step timing on CPU (fp32): the peer row of the
README's Performance table, on the bench shape (`neva_jax.bench.shapes.bench`).

Not part of the package or the tests: EasyDeL pins its own jax (0.9.x through
ejkernel), so it runs in a venv of its own, one core, under the allocator our bench
uses:

    python3 -m venv /tmp/edl && /tmp/edl/bin/pip install torch==2.13.0 easydel==0.3.0 pillow
    eval "$(.venv/bin/python -m neva_jax.allocator --env)"
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 /tmp/edl/bin/python launch/easydel_step.py --steps 7
    taskset -c 1 .venv/bin/python -m neva_jax.bench train --repeats 5   # right after

EasyDeL adds an XLA compile cache under $HOME: point HOME at a scratch folder.

Model: easydel.modules.llava.LlavaForConditionalGeneration (EasyDeL's own NNX LLaVA,
CLIP vision tower + LLaMA LM), built from easydel LlavaConfig with dict sub-configs.
Step: easydel.trainers.trainer._fn.training_step (the function EasyDeL's Trainer jits),
compiled the way Trainer.configure_functions does it (ejit == jax.jit here, static
loss_config / scheduler / step_partition_spec / grad-accum / STE, donate_argnums=(0,),
in/out shardings = state shardings + replicated), on an easydel EasyDeLState.

Freezing: EasyDeL 0.3.0's `TrainingArguments.frozen_parameters` is declared but not
used anywhere in the trainers, so the vision tower is frozen by splitting the NNX
model ourselves: graphstate = nnx.Param outside `vision_tower` (LLM + lm_head +
projector), graphother = everything else (vision tower params, ...). EasyDeLState
.merge() applies stop_gradient to graphother and training_step takes value_and_grad
w.r.t. graphstate only, and the optimizer state is built for graphstate only.

Optimizer: eformer OptimizerFactory.create (what TrainingArguments.get_optimizer_and_scheduler
calls) with optimizer='adamw', constant lr 2e-5, weight_decay 0, clip_grad 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--loss-block",
        default="none",
        help="LossConfig.chunk_block_size: 'none' = plain dense CE (no remat anywhere); "
        "'4096' = EasyDeL's default blockwise-vocab CE (jax.checkpoint per vocab block)",
    )
    args = ap.parse_args()

    import easydel
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib
    import optax
    import transformers
    from easydel.infra.base_state import EasyDeLState
    from easydel.infra.etils import EasyDeLGradientCheckPointers
    from easydel.infra.loss_utils import LossConfig
    from easydel.modules.llava import LlavaConfig, LlavaForConditionalGeneration
    from easydel.trainers.trainer._fn import training_step
    from easydel.utils.compiling_utils import ejit
    from eformer.optimizers import OptimizerFactory, SchedulerConfig
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    versions = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "easydel": getattr(easydel, "__version__", "?"),
        "transformers": transformers.__version__,
        "optax": optax.__version__,
    }
    print("versions", json.dumps(versions), flush=True)
    print(
        "devices",
        jax.devices(),
        "LD_PRELOAD=",
        os.environ.get("LD_PRELOAD"),
        "XLA_FLAGS=",
        os.environ.get("XLA_FLAGS"),
        "affinity=",
        sorted(os.sched_getaffinity(0)),
        flush=True,
    )

    f32 = jnp.float32
    text_config = dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    vision_config = dict(
        model_type="clip_vision_model",
        image_size=224,
        patch_size=14,
        num_channels=3,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=31999,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=256,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    # EasyDeL runtime knobs; add_basic_configurations propagates them to sub_configs.
    config.add_basic_configurations(
        attn_mechanism="vanilla",
        attn_dtype=f32,
        kvdtype=f32,
        attn_softmax_dtype=f32,
        gradient_checkpointing=EasyDeLGradientCheckPointers.NONE,
        sharding_axis_dims=(1, 1, 1, 1, 1),
        scan_attention_layers=False,
        use_scan_mlp=False,
    )
    for name, c in (
        ("llava", config),
        ("text", config.text_config),
        ("vision", config.vision_config),
    ):
        print(
            f"config[{name}] attn_mechanism={c.attn_mechanism} attn_dtype={c.attn_dtype} "
            f"attn_softmax_dtype={c.attn_softmax_dtype} gradient_checkpointing={c.gradient_checkpointing} "
            f"scan_layers={getattr(c, 'scan_layers', None)} hidden_act={getattr(c, 'hidden_act', None)}",
            flush=True,
        )

    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration(
        config=config, dtype=f32, param_dtype=f32, precision=None, rngs=nnx.Rngs(0)
    )
    print(
        f"model built in {time.perf_counter() - t0:.1f}s: {type(model).__module__}.{type(model).__name__}",
        flush=True,
    )

    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    graphdef, graphstate, graphother = nnx.split(model, trainable, ...)

    def count(tree):
        return sum(
            int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")
        )

    vis_params = nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("vision_tower")))
    print(
        f"trainable params {count(graphstate):,}  frozen vision params {count(vis_params):,}  "
        f"graphother leaves {count(graphother):,}",
        flush=True,
    )
    dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(graphstate)}
    print("trainable dtypes", dtypes, flush=True)
    del model

    scheduler_config = SchedulerConfig(
        scheduler_type=None,
        steps=1000,
        learning_rate=2e-5,
        learning_rate_end=None,
        warmup_steps=None,
    )
    tx, scheduler = OptimizerFactory.create(
        optimizer_type="adamw", scheduler_config=scheduler_config, clip_grad=1.0, weight_decay=0.0
    )
    state = EasyDeLState.create(
        graphdef=graphdef, graphstate=graphstate, graphother=graphother, tx=tx, init_opt_state=True
    )
    print(
        f"opt_state params {count(state.opt_state):,} (adam mu+nu over trainable only)", flush=True
    )

    # ---- synthetic batch, laid out like neva_jax.bench.shapes.make_batch / hf_inputs
    B, P, text_tokens, n_train = 4, 256, 128, 64
    T = P + text_tokens
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(B):
        t = rng.integers(5, 32000, size=text_tokens).astype(np.int32)
        t = np.where(t == 31999, 5, t).astype(np.int32)
        t[0] = 1
        rows.append(np.concatenate([t[:5], np.full(P, 31999, np.int32), t[5:]]))
    ids = np.stack(rows)
    pixels = rng.normal(size=(B, 3, 224, 224)).astype(np.float32)  # NCHW like transformers
    labels = np.full_like(ids, -100)
    labels[:, T - n_train :] = ids[:, T - n_train :]  # EasyDeL (like HF) shifts labels itself
    assert (labels != -100).sum() == B * n_train
    batch = {
        "input_ids": jnp.asarray(ids),
        # no attention_mask: with one, EasyDeL's fixed_cross_entropy uses it as the loss
        # weight mask and normalises by all 1532 shifted positions instead of the 256
        # trained ones; without it (as in HF's no-padding case) mask = labels != -100.
        "pixel_values": jnp.asarray(pixels),
        "labels": jnp.asarray(labels),
    }

    # TrainingArguments default is LossConfig(): NUM_REAL_TARGET_TOKENS, ignore_index -100,
    # chunk_block_size=4096 (blockwise-vocab CE whose block body is jax.checkpoint-ed).
    loss_config = LossConfig(
        chunk_block_size=None if args.loss_block == "none" else int(args.loss_block)
    )
    print("loss_config chunk_block_size =", loss_config.chunk_block_size, flush=True)
    step_partition_spec = PartitionSpec(("dp", "fsdp"), "sp")  # TrainingArguments default
    mesh = state.model.mesh
    print("mesh", mesh, flush=True)
    empty_sharding = NamedSharding(spec=PartitionSpec(), mesh=mesh)
    state_shardings = state.shardings
    step_fn = ejit(
        training_step,
        static_argnums=(2, 3, 4, 5, 6),
        in_shardings=(state_shardings, empty_sharding),
        out_shardings=(state_shardings, empty_sharding),
        donate_argnums=(0,),
    )
    static = (loss_config, scheduler, step_partition_spec, 1, None)

    def run(state):
        with mesh:
            state, metrics = compiled(state, batch)
        jax.block_until_ready((metrics.loss, state.graphstate, state.opt_state))
        return state, metrics

    with mesh:
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch, *static)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    print(f"lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s", flush=True)
    hlo = compiled.as_text()
    print(
        "compiled HLO: custom-calls",
        hlo.count("custom-call"),
        "while loops",
        hlo.count(" while("),
        flush=True,
    )

    t0 = time.perf_counter()
    state, metrics = run(state)
    print(
        f"first call (incl. dispatch) {time.perf_counter() - t0:.2f}s loss={float(metrics.loss):.5f}",
        flush=True,
    )
    for i in range(args.warmup - 1):
        t0 = time.perf_counter()
        state, metrics = run(state)
        print(
            f"warmup {i + 2}: {time.perf_counter() - t0:.3f}s loss={float(metrics.loss):.5f}",
            flush=True,
        )

    times, cpus, losses = [], [], []
    for i in range(args.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        state, metrics = run(state)
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        times.append(dt)
        cpus.append(dc)
        losses.append(float(metrics.loss))
        print(f"step {i + 1}: {dt:.3f}s (process cpu {dc:.3f}s) loss={losses[-1]:.5f}", flush=True)
    res = {
        "label": args.label,
        "loss_block": args.loss_block,
        "times": [round(t, 4) for t in times],
        "median": round(statistics.median(times), 4),
        "min": round(min(times), 4),
        "max": round(max(times), 4),
        "cpu_times": [round(t, 4) for t in cpus],
        "cpu_median": round(statistics.median(cpus), 4),
        "losses": losses,
        "versions": versions,
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }
    print("RESULT", json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
