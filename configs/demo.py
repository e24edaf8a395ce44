"""The demo: a small NeVA that learns to answer questions about synthetic images on a CPU.

64x64 images of 1-4 shapes of one colour in one corner (`python -m neva_jax.data
synth`); a 2-layer ViT (8 px patches: 64 image tokens, width 64) frozen at its random
initialisation, an `mlp2x_gelu` projector and a 2-layer LLaMA-style decoder of width
128 with 4 heads, in float32 (docs/REFERENCE.md "Demo evidence"). Stage 1 aligns the projector on
captions (`plain`); stage 2 trains projector + decoder on four-question conversations
(`vicuna_v1`). `make demo` (`python -m neva_jax.demo`) runs:

    python -m neva_jax.data synth --out runs/demo/data --n-train 8000 --n-eval 200
    python -m neva_jax.main --config=configs/demo.py:stage1,data_dir=runs/demo/data \\
        --workdir=runs/demo/stage1
    python -m neva_jax.main --config=configs/demo.py:stage2,data_dir=runs/demo/data \\
        --workdir=runs/demo/stage2 --config.init_from=runs/demo/stage1

What it measures is in README.md ("The demo"): on this 2-core CPU (8,000 training
images, batch 32) greedy held-out answers reach 0.976-1.000 overall after 1,000 stage-2
steps, and `make demo` takes about 2.5 minutes with `.venv` in place. "where" (which of
the four corners) is the last type learnt. Stage 1 trains only the projector into a
random frozen decoder, so its caption loss moves little; it is there to run the real
two-stage path.

LoRA stage 2 (`python -m neva_jax.demo --lora`): the decoder stays frozen at its
random initialisation and learns through rank-32 adapters on all of its linear layers
(alpha 64) while the projector trains, both at the full stage 2's lr 2e-3 (5e-3 was
unstable past 200 steps). A frozen decoder must be able
to make confident predictions, which a pretrained LLM can; a random one's LM head
caps every logit near D * std (2.6 at LLaMA's init std 0.02, and LoRA then stalls at
a loss of 4.3), so the LoRA demo draws the decoder at `init_std=0.1` (docs/LORA.md):

    python -m neva_jax.main --config=configs/demo.py:stage1,data_dir=runs/demo/data,init_std=0.1 \
        --workdir=runs/demo/stage1
    python -m neva_jax.main --config=configs/demo.py:lora,data_dir=runs/demo/data,init_std=0.1 \
        --workdir=runs/demo/stage2 --config.init_from=runs/demo/stage1

Arguments (after the colon, comma-separated): 'stage1' | 'stage2' | 'lora',
`data_dir=DIR` (where `synth` wrote the data; default data/synthetic), `init_std=X`
(the decoder's init std, `model.llm.init_method_std`; default 0.02).
"""

import os

from neva_jax.config import default_config, parse_arg


def get_config(arg: str | None = None):
    """The demo config for `arg` (see the module docstring)."""
    a = parse_arg(arg, ("stage1", "stage2", "lora"), data_dir="data/synthetic", init_std=0.02)
    stage2 = a["variant"] in ("stage2", "lora")
    c = default_config()

    llm = c.model.llm
    llm.freeze = not stage2
    llm.vocab_size = 512
    llm.encoder_seq_length = 256
    llm.num_layers = 2
    llm.hidden_size = 128
    llm.ffn_hidden_size = 256
    llm.num_attention_heads = 4
    llm.init_method_std = a["init_std"]
    vis = c.model.vision_encoder
    vis.image_size = 64
    vis.patch_dim = 8
    vis.hidden_size = 64
    vis.ffn_hidden_size = 256
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
    # The longest sample of each stage (system prompt + 64 image slots + text); padding
    # to exactly that keeps the step cheap.
    data.max_seq_len = 128 if stage2 else 72
    data.read_threads = 2

    t = c.train
    t.steps = 1000 if stage2 else 150
    t.batch_size = 32
    t.lr = 2e-3 if stage2 else 1e-3
    t.min_lr = t.lr / 10
    # 40 / 15 warmup steps at these lengths; a ratio, so that fewer steps
    # (`python -m neva_jax.demo --stage1-steps 4`) warm up for fewer.
    t.warmup_ratio = 0.04 if stage2 else 0.1
    t.grad_clip = 1.0
    t.logits_fraction = 0.125 if stage2 else 0.25
    t.log_every = 20 if stage2 else 10
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 1
    c.eval.every_steps = 100 if stage2 else 50
    if a["variant"] == "lora":
        peft = c.model.peft
        peft.scheme, peft.rank, peft.alpha = "lora", 32, 64.0
        peft.target_modules = ("all_linear",)
    return c
