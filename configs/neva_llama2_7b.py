"""NeVA, the seed recipe: LLaMA-2-7B-Chat + CLIP ViT-L/14 (224 px) + a linear projector.

Sequence length 4096 (the model's), `llava_llama_2` chat template in stage 2,
LLaVA-1.5 hyperparameters (`neva_jax.config.llava_recipe`), bf16 compute with fp32
master weights, full activation checkpointing in stage 2. One H200 fits stage 1;
stage 2 wants FSDP over several GPUs (see `--mode plan` / README).

Once: import the Hugging Face folders into a neva-jax model folder

    python -m neva_jax.convert import-hf --llm /models/Llama-2-7b-chat-hf \\
        --vision /models/clip-vit-large-patch14 --projector linear /models/neva_llama2_7b

Stage 1 (projector only; LLaVA-Pretrain under /data/llava/LLaVA-Pretrain):

    python -m neva_jax.main \\
        --config configs/neva_llama2_7b.py:stage1,data_dir=/data/llava,init=/models/neva_llama2_7b \\
        --workdir /runs/neva_llama2_7b_stage1

Stage 2 (projector + LLM from the stage-1 workdir; llava_v1_5_mix665k.json and its
image folders coco/ gqa/ ocr_vqa/ textvqa/ vg/ under /data/llava):

    python -m neva_jax.main \\
        --config configs/neva_llama2_7b.py:stage2,data_dir=/data/llava,init=/runs/neva_llama2_7b_stage1 \\
        --workdir /runs/neva_llama2_7b_stage2 --config.mesh.fsdp=8

LoRA stage 2 instead (NeMo NeVA's PEFT: adapters of rank 32 on attention_qkv, alpha 32,
lr 2e-4, projector at 2e-5; the LLM frozen and held in bf16; docs/LORA.md):

    python -m neva_jax.main \\
        --config configs/neva_llama2_7b.py:lora,data_dir=/data/llava,init=/runs/neva_llama2_7b_stage1 \\
        --workdir /runs/neva_llama2_7b_lora

Evaluate the newest checkpoint: the same command with `--mode eval`.
"""

from neva_jax.config import default_config, llava_recipe, lora_recipe, model_preset, parse_arg


def get_config(arg: str | None = None):
    """`arg`: 'stage1' | 'stage2' | 'lora', plus `data_dir=DIR` and `init=PATH` (init_from)."""
    a = parse_arg(arg, ("stage1", "stage2", "lora"), data_dir="/data/llava", init="")
    c = default_config()
    model_preset(c, "llama2_7b_chat")
    stage2 = a["variant"] in ("stage2", "lora")
    llava_recipe(c, stage2=stage2, data_dir=a["data_dir"], init=a["init"])
    c.data.template = "llava_llama_2" if stage2 else "plain"
    if a["variant"] == "lora":
        lora_recipe(c, "nemo")
    return c
