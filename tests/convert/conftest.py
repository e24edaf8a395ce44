"""Fixtures shared by the NeMo conversion tests."""

import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP vision folder (the tower of an LLM-only NeMo import)."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
    )
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    return folder
