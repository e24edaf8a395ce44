"""Fixtures shared by the conversion tests; the NeMo ones are built once per session
(each NeMo-written fixture imported once, one compiled LLM forward per input shape)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

NEMO_FIXTURES = Path(__file__).parent / "nemo_fixtures"
# name: (NeMo-written checkpoint, its Hugging Face source)
NEMO_CASES = {
    "nemo2": ("nemo2_llama_ckpt", "tiny_llama_hf"),
    "nemo2_bf16": ("nemo2_llama_ckpt_bf16", "tiny_llama_hf_bf16"),
    "nemo1": ("tiny_llama_nemo1.nemo", "tiny_llama_hf"),
}
NEMO_VOCAB = 128  # the fixtures' tokenizer size


@pytest.fixture(scope="session")
def nemo_fixtures() -> Path:
    """The NeMo-written checkpoints and their Hugging Face sources."""
    return NEMO_FIXTURES


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """clip_folder(width, image_size, patch_size) -> a tiny random CLIP vision folder (2
    layers, 4 heads, FFN 2 x width), written once per shape."""
    made = {}

    def make(width: int, image_size: int, patch_size: int) -> Path:
        key = (width, image_size, patch_size)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("clip")
            torch.manual_seed(0)
            config = transformers.CLIPVisionConfig(
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=patch_size,
            )
            transformers.CLIPVisionModel(config).save_pretrained(made[key])
        return made[key]

    return make


@pytest.fixture(scope="session")
def clip_dir(clip_folder):
    """The CLIP folder of LLM-only NeMo imports (width 24, 30 px, 6 px patches)."""
    return clip_folder(24, 30, 6)


@pytest.fixture(scope="session")
def llm_logits():
    """llm_logits(model, ids, n=128) -> the LLM's logits over the first n tokens: one jitted
    program, so models of one structure and inputs of one shape compile once."""

    @jax.jit
    def run(graphdef, state, x):
        return nnx.merge(graphdef, state).llm(x)

    def logits(model, ids: np.ndarray, n: int = NEMO_VOCAB) -> np.ndarray:
        return np.asarray(run(*nnx.split(model), jnp.asarray(ids)))[..., :n]

    return logits


@pytest.fixture(scope="session")
def nemo_imported(clip_dir):
    """{case: import_nemo(checkpoint, vision=clip_dir)} for the NeMo-written fixtures."""
    from neva_jax.convert.nemo_import import import_nemo

    return {
        name: import_nemo(NEMO_FIXTURES / src, vision=clip_dir)
        for name, (src, _) in NEMO_CASES.items()
    }


@pytest.fixture(scope="session")
def nemo_model_dirs(nemo_imported, clip_dir, tmp_path_factory):
    """{case: model folder}: nemo1 written by the `import-nemo` CLI (in process), the
    NeMo 2 cases saved from `nemo_imported` as the CLI saves them."""
    from neva_jax.convert.__main__ import main
    from neva_jax.convert.checkpoint import save_imported

    root = tmp_path_factory.mktemp("nemo_models")
    out = {}
    for name, (src, _) in NEMO_CASES.items():
        out[name] = root / name
        if name == "nemo1":
            args = ["import-nemo", str(NEMO_FIXTURES / src), str(out[name])]
            assert main([*args, "--vision", str(clip_dir)]) == 0
        else:
            save_imported(out[name], nemo_imported[name])
    return out
