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

Arguments: 'stage1' | 'stage2', `size=7b|13b`, `data_dir=DIR`, `init=PATH`.
"""

from neva_jax.config import ConfigError, default_config, llava_recipe, model_preset, parse_arg


def get_config(arg: str | None = None):
    """The LLaVA-1.5 config for `arg` (see the module docstring)."""
    a = parse_arg(arg, variant="stage1", size="7b", data_dir="/data/llava", init="")
    if a["size"] not in ("7b", "13b"):
        raise ConfigError(f"configs/llava_v15.py: size={a['size']!r}; use 7b or 13b")
    c = default_config()
    model_preset(c, f"llava_v15_{a['size']}")
    llava_recipe(c, stage2=a["variant"] == "stage2", data_dir=a["data_dir"], init=a["init"])
    if a["variant"] == "stage2":
        c.data.template = "vicuna_v1"
    return c
