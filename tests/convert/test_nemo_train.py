"""A NeMo checkpoint as `model.llm.from_pretrained` (as NeMo's NeVA configs allow): the
trainer imports it on the fly and starts from its weights."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from neva_jax.config import from_config_dict
from neva_jax.convert import checkpoint
from neva_jax.convert.nemo_import import import_nemo
from neva_jax.data import synth
from neva_jax.run_config import ConfigError
from neva_jax.train import build, loop

NEMO2 = Path(__file__).parent / "nemo_fixtures" / "nemo2_llama_ckpt"


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def test_tiny_run_starts_from_a_nemo2_llm(tmp_path, tiny_dict, clip_folder):
    """configs/tiny.py (its LLM is the NeMo 2 fixture's shape) with the fixture as
    model.llm.from_pretrained, its tokenizer (context/nemo_tokenizer) and a CLIP folder
    of the tiny tower: step 1 is reached with a finite loss, and the frozen LLM and tower
    are exactly the imported weights."""
    data = tmp_path / "data"
    synth.generate(str(data), n_train=16, n_eval=8)
    clip = clip_folder(32, 32, 8)  # the tiny config's tower
    cfg = from_config_dict(
        tiny_dict(
            str(data),
            "stage1",
            **{
                "model.llm.from_pretrained": str(NEMO2),
                "model.vision_encoder.from_pretrained": str(clip),
                "model.llm.vocab_size": 192,  # 128 NeMo tokens + <image>, <pad>: 130 -> 192
                "data.tokenizer": str(NEMO2 / "context" / "nemo_tokenizer"),
                "train.steps": 1,
                "train.warmup_steps": 0,
                "checkpoint.every_steps": 1,
                "data.eval_files": (),  # no evaluation: one compiled program
            },
        )
    )
    workdir = tmp_path / "run"
    summary = loop.train(cfg, str(workdir))
    assert summary["step"] == 1
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    params, meta = checkpoint.restore_params(str(workdir))
    assert meta["step"] == 1 and meta["trained_parts"] == ["projector"]
    expected = nnx.to_pure_dict(nnx.state(import_nemo(NEMO2, vision=clip).model, nnx.Param))
    for part in ("llm", "vision"):
        got, want = _flat(params[part]), _flat(expected[part])
        assert got.keys() == want.keys(), part
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, f"{part} {key}")


def test_a_nemo_llm_that_does_not_fit_the_config_is_a_config_error(tmp_path, tiny_dict, clip_dir):
    """What the config says against what the checkpoint holds, and an unreadable
    checkpoint: one-line ConfigErrors naming the key."""
    data = tmp_path / "data"
    data.mkdir()

    def parts(llm: Path, **changes) -> None:
        keys = {
            "model.llm.from_pretrained": str(llm),
            "model.vision_encoder.from_pretrained": str(clip_dir),
            "model.vision_encoder.hidden_size": 24,
            "model.vision_encoder.ffn_hidden_size": 48,
            "model.vision_encoder.image_size": 30,
            "model.vision_encoder.patch_dim": 6,
            **changes,
        }
        cfg = from_config_dict(tiny_dict(str(data), "stage1", **keys), check_environment=False)
        build.load_pretrained_parts(cfg, cfg.model, build.run_mesh(cfg))

    with pytest.raises(
        ConfigError, match=r"config.model.llm.vocab_size=512: .* has vocab_size=192; set it to 192"
    ):
        parts(NEMO2)
    cut = tmp_path / "cut.nemo"
    cut.write_bytes((NEMO2.parent / "tiny_llama_nemo1.nemo").read_bytes()[:4096])
    with pytest.raises(ConfigError, match=r"config.model.\*.from_pretrained: .*truncated"):
        parts(cut, **{"model.llm.vocab_size": 192})
