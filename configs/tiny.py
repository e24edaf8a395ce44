"""Tiny NeVA on the bundled synthetic data: seconds per stage on a CPU (tests, CI).

A 2-layer width-64 LLaMA-style decoder (4 heads, 2 kv heads), a 2-layer width-32
ViT on 32 px images (8 px patches: 16 image tokens) and an `mlp2x_gelu`
projector, in float32. Stage 1 (`plain` captions) trains the projector; stage 2
(`vicuna_v1` Q&A) trains projector + LLM from the stage-1 checkpoint.

    python -m neva_jax.data synth --out /tmp/neva_synth --n-train 512 --n-eval 64
    python -m neva_jax.main --config configs/tiny.py:stage1,data_dir=/tmp/neva_synth \\
        --workdir /tmp/tiny_stage1
    python -m neva_jax.main --config configs/tiny.py:stage2,data_dir=/tmp/neva_synth \\
        --workdir /tmp/tiny_stage2 --config.init_from=/tmp/tiny_stage1
    python -m neva_jax.main --config configs/tiny.py:stage2,data_dir=/tmp/neva_synth \\
        --workdir /tmp/tiny_stage2 --mode eval

Arguments (after the colon, comma-separated): `stage1` | `stage2`, `data_dir=DIR`
(where `synth` wrote the data; default `data/synthetic`).
"""

import os

from neva_jax.config import default_config, parse_arg


def get_config(arg: str | None = None):
    """The tiny config; `arg` = 'stage1' or 'stage2' plus optional `data_dir=DIR`."""
    a = parse_arg(arg, ("stage1", "stage2"), data_dir="data/synthetic")
    stage2 = a["variant"] == "stage2"
    c = default_config()
    c.seed = 0

    llm = c.model.llm
    llm.freeze = not stage2
    llm.vocab_size = 512
    llm.encoder_seq_length = 128
    llm.num_layers = 2
    llm.hidden_size = 64
    llm.ffn_hidden_size = 128
    llm.num_attention_heads = 4
    llm.num_query_groups = 2
    vis = c.model.vision_encoder
    vis.image_size = 32
    vis.patch_dim = 8
    vis.hidden_size = 32
    vis.ffn_hidden_size = 64
    vis.num_layers = 2
    vis.num_attention_heads = 4
    c.model.projector = "mlp2x_gelu"
    c.precision.compute_dtype = "float32"

    d, data = a["data_dir"], c.data
    data.train_files = (os.path.join(d, "stage2.json" if stage2 else "stage1.json"),)
    data.eval_files = (os.path.join(d, "stage2_eval.json" if stage2 else "stage1_eval.json"),)
    data.image_folder = os.path.join(d, "images")
    data.tokenizer = os.path.join(d, "tokenizer")
    data.template = "vicuna_v1" if stage2 else "plain"
    data.max_seq_len = 96 if stage2 else 32
    data.read_threads = 1
    data.prefetch_buffer_size = 2

    t = c.train
    t.steps = 40 if stage2 else 20
    t.batch_size = 8
    t.lr = 3e-3 if stage2 else 1e-2
    t.min_lr = t.lr / 10
    t.warmup_steps = 2
    t.grad_clip = 1.0
    t.logits_fraction = 0.25
    t.log_every = 5
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.eval.steps = 4
    return c
