"""A tiny random llava-hf model (built from configs, saved with save_pretrained, with
the synthetic dataset's BPE tokenizer) and its import by the project's importer."""

from __future__ import annotations

import pytest

IMAGE_ID = 4  # <image> in the synthetic tokenizer
PAD_ID = 3
EOS_ID = 2


def build_llava_hf(out: str, *, init_std: float = 0.2, seed: int = 0) -> None:
    """Writes a tiny `LlavaForConditionalGeneration` folder with a tokenizer to `out`.

    `init_std` 0.2 (10x transformers' default) so that greedy decoding is not
    degenerate.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from neva_jax.data import synth

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        initializer_range=init_std,
    )
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        pad_token_id=PAD_ID,
        image_seq_length=16,
    )
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    synth.build_tokenizer(out)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("llava_hf"))
    build_llava_hf(out)
    return out


@pytest.fixture(scope="session")
def imported(llava_dir: str):
    from neva_jax.convert import hf

    return hf.import_llava(llava_dir)


@pytest.fixture(scope="session")
def llava_std_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same tiny model at transformers' default init (std 0.02)."""
    out = str(tmp_path_factory.mktemp("llava_hf_std"))
    build_llava_hf(out, init_std=0.02)
    return out


@pytest.fixture(scope="session")
def imported_std_init(llava_std_dir: str):
    """`llava_std_dir`, imported."""
    from neva_jax.convert import hf

    return hf.import_llava(llava_std_dir)
