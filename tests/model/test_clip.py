"""The CLIP vision tower: parity with transformers' CLIPVisionModel through our importer.

Axis letters: B batch, P image tokens, E vision width, C channels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from neva_jax.convert import hf
from neva_jax.model import clip

IMAGE, PATCH, E = 30, 6, 32  # 5x5 = 25 patches: a size other than 224


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough to matter, random norm scales and biases too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def _vision_config(**kw) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=E,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
        attn_implementation="eager",
        **kw,
    )


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """(folder, pixels [B, C, H, W], all hidden states) of a tiny random CLIPVisionModel."""
    model = transformers.CLIPVisionModel(_vision_config()).eval()
    _randomize(model, 0)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    pixels = np.random.default_rng(0).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return folder, pixels, [h.numpy() for h in out.hidden_states]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def _features(folder, pixels, **kw) -> np.ndarray:
    tower, _ = hf.import_clip(folder, **kw)
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # channels-last
    return np.asarray(_forward(*nnx.split(tower), images))


@pytest.mark.parametrize("select_layer", [-1, -2, 0])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_selected_hidden_states_match_transformers(hf_clip, select_layer, strategy):
    folder, pixels, hidden = hf_clip
    drop = 1 if strategy == "default" else 0
    ours = _features(folder, pixels, vision_select_layer=select_layer, class_token_length=drop)
    ref = hidden[select_layer][:, drop:]
    diff = float(np.abs(ours - ref).max())
    print(f"CLIP layer {select_layer} {strategy}: max abs diff {diff:.2e}")
    assert ours.shape == ref.shape == (2, 25 + 1 - drop, E)
    assert diff <= 1e-5


def test_unrolled_layers_equal_scanned(hf_clip):
    folder, pixels, _ = hf_clip
    a = _features(folder, pixels, scan_layers=True)
    b = _features(folder, pixels, scan_layers=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_full_clip_model_folder_imports_its_vision_tower(tmp_path):
    """openai/clip-* folders are full CLIPModels: `vision_model.*` plus an unused text tower."""
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=_vision_config().to_dict(),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    _randomize(model, 1)
    model.save_pretrained(tmp_path)
    pixels = np.random.default_rng(1).normal(size=(1, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[
            -2
        ]
    ours = _features(tmp_path, pixels)
    assert float(np.abs(ours - ref.numpy()[:, 1:]).max()) <= 1e-5


def test_config_mapping_and_presets():
    cfg = clip.from_hf_config(
        {
            "vision_config": {
                "image_size": 336,
                "patch_size": 14,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
            }
        },
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    assert cfg == clip.clip_l14_336(class_token_length=0)
    assert clip.clip_l14_336().num_image_tokens == 576
    assert clip.clip_l14_224().num_image_tokens == 256
    assert cfg.num_image_tokens == 577
    assert clip.clip_l14_224().num_blocks_used == 23
    with pytest.raises(ValueError, match="vision_select_layer"):
        clip.tiny(vision_select_layer=5)
    with pytest.raises(ValueError, match="image_size"):
        clip.tiny(image_size=30)
