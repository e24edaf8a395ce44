"""LLaVA-1.5: Vicuna-7B/13B v1.5 + CLIP ViT-L/14 at 336 px (576 image tokens) + mlp2x_gelu.

LLaVA-1.5's recipe (`neva_jax.config.llava_recipe`): stage 1 `plain` captions,
projector only, batch 256, lr 1e-3; stage 2 `vicuna_v1` instructions with `pad`
aspect, projector + LLM, lr 2e-5; 1 epoch each, warmup 3 %, cosine, no decay.

Once: import the Hugging Face folders (here 7B; use vicuna-13b-v1.5 and `size=13b`)

    python -m neva_jax.convert import-hf --llm /models/vicuna-7b-v1.5 \\
        --vision /models/clip-vit-large-patch14-336 --projector mlp2x_gelu /models/llava_v15_7b

Stage 1:

    python -m neva_jax.main \\
        --config configs/llava_v15.py:stage1,data_dir=/data/llava,init=/models/llava_v15_7b \\
        --workdir /runs/llava_v15_7b_stage1

Stage 2:

    python -m neva_jax.main \\
        --config configs/llava_v15.py:stage2,data_dir=/data/llava,init=/runs/llava_v15_7b_stage1 \\
        --workdir /runs/llava_v15_7b_stage2 --config.mesh.fsdp=8

LoRA stage 2 instead (LLaVA's finetune_lora.sh: rank 128, alpha 256, dropout 0.05 on
every linear of the LLM but lm_head, lr 2e-4, projector at 2e-5; the LLM frozen and
held in bf16; docs/LORA.md):

    python -m neva_jax.main \\
        --config configs/llava_v15.py:lora,data_dir=/data/llava,init=/runs/llava_v15_7b_stage1 \\
        --workdir /runs/llava_v15_7b_lora

Arguments: 'stage1' | 'stage2' | 'lora', `size=7b|13b`, `data_dir=DIR`, `init=PATH`.
"""

from neva_jax.config import (
    ConfigError,
    default_config,
    llava_recipe,
    lora_recipe,
    model_preset,
    parse_arg,
)


def get_config(arg: str | None = None):
    """The LLaVA-1.5 config for `arg` (see the module docstring)."""
    a = parse_arg(arg, ("stage1", "stage2", "lora"), size="7b", data_dir="/data/llava", init="")
    if a["size"] not in ("7b", "13b"):
        raise ConfigError(f"configs/llava_v15.py: size={a['size']!r}; use 7b or 13b")
    c = default_config()
    model_preset(c, f"llava_v15_{a['size']}")
    stage2 = a["variant"] in ("stage2", "lora")
    llava_recipe(c, stage2=stage2, data_dir=a["data_dir"], init=a["init"])
    if stage2:
        c.data.template = "vicuna_v1"
    if a["variant"] == "lora":
        lora_recipe(c, "llava")
    return c
