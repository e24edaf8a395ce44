"""Stage 1 then stage 2 of the tiny model on the synthetic data, through `loop.train`."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from neva_jax.convert import checkpoint
from neva_jax.data.dataset import DataError
from neva_jax.train import loop
from neva_jax.train import optimizer as opt_lib


def _falls(rows) -> bool:
    losses = [rows[s]["loss"] for s in sorted(rows)]
    return np.mean(losses[-2:]) < np.mean(losses[:2])


def test_stage1_then_stage2(tmp_path, tiny_config, metrics_of, init_params, bit_identical):
    _initial_params, _same = init_params, bit_identical
    w1, w2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    common = {"train.steps": 6, "train.log_every": 1, "checkpoint.every_steps": 6}
    cfg1 = tiny_config("stage1", **common)
    summary1 = loop.train(cfg1, w1)
    rows1 = metrics_of(w1)
    assert sorted(rows1) == list(range(1, 7)) and _falls(rows1)
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "accuracy"):
        assert np.isfinite(rows1[6][key])
    assert "eval/loss" in summary1 and summary1["step"] == 6
    assert os.path.isdir(os.path.join(w1, "tokenizer"))
    with open(os.path.join(w1, "data_report.json")) as f:
        assert json.load(f)["samples_skipped"] == 0

    # Stage 1: LLM and vision bit-identical to their initialisation; optimizer state
    # only for the projector.
    init = _initial_params(cfg1)
    p1, meta = checkpoint.restore_params(w1)
    assert meta["trained_parts"] == ["projector"] and meta["step"] == 6
    assert _same(p1["llm"], init["llm"]) and _same(p1["vision"], init["vision"])
    assert not _same(p1["projector"], init["projector"])
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(w1, "checkpoints/6/state")).tree
    projector = opt_lib.largest_leaf(p1["projector"])
    opt_sizes = [int(np.prod(m.shape)) for m in jax.tree.leaves(tree["opt_state"])]
    assert opt_sizes and max(opt_sizes) <= projector

    # Stage 2 from the stage-1 workdir: vision bit-identical, LLM and projector change.
    cfg2 = tiny_config("stage2", init_from=w1, **common)
    loop.train(cfg2, w2)
    rows2 = metrics_of(w2)
    assert _falls(rows2)
    p2, meta2 = checkpoint.restore_params(w2)
    assert meta2["trained_parts"] == ["projector", "llm"]
    assert _same(p2["vision"], p1["vision"])
    assert not _same(p2["llm"], p1["llm"]) and not _same(p2["projector"], p1["projector"])

    # --mode eval restores the newest checkpoint and writes eval/* at its step.
    out = loop.evaluate(cfg2, w2)
    assert np.isfinite(out["eval/loss"]) and 0 <= out["eval/accuracy"] <= 1
    # eval.steps covers the same samples whatever the accumulation (it covered half with 2)
    assert cfg2.eval.steps and cfg2.train.grad_accum_steps == 1
    accum = dataclasses.replace(  # tensor=2: a micro-batch of 4 rows over 4 data shards
        cfg2,
        train=dataclasses.replace(cfg2.train, grad_accum_steps=2),
        eval=dataclasses.replace(cfg2.eval, checkpoint=w2),
        mesh=dataclasses.replace(cfg2.mesh, tensor=2),
    )
    out2 = loop.evaluate(accum, str(tmp_path / "eval_accum"))
    assert out2["eval/tokens"] == out["eval/tokens"]
    np.testing.assert_allclose(out2["eval/loss"], out["eval/loss"], rtol=1e-6)
    model, info = checkpoint.load_model(w2)
    assert info.step == 6 and str(info.tokenizer_path) == os.path.join(w2, "tokenizer")
    assert _same(nnx.to_pure_dict(nnx.state(model, nnx.Param)), p2)
    # ... and a model folder (import-hf/import-nemo/save_model write those), which has no
    # training step: its line is step 0 (it was a KeyError after evaluating).
    folder = tmp_path / "model"
    checkpoint.save_model(folder, model, tokenizer=str(info.tokenizer_path))
    cfg_mf = dataclasses.replace(cfg2, eval=dataclasses.replace(cfg2.eval, checkpoint=str(folder)))
    assert loop.evaluate(cfg_mf, str(tmp_path / "eval_mf")) == out
    with open(tmp_path / "eval_mf" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0]


def test_nan_steps_are_skipped_then_k_in_a_row_stop(tmp_path, tiny_config, metrics_of, nan_batch):
    cfg = tiny_config(
        "stage1",
        **{
            "train.steps": 6,
            "train.log_every": 1,
            "train.max_consecutive_nonfinite": 2,
            "data.eval_files": (),  # no eval set: periodic evaluation is skipped
            "eval.every_steps": 2,
        },
    )

    def nan_at_some_steps(step, batch):  # 0-based: steps 2, 4 and 5
        return nan_batch(batch) if step in (1, 3, 4) else batch

    with pytest.raises(loop.NonFiniteError) as e:
        loop.train(cfg, str(tmp_path), hooks=loop.Hooks(before_step=(nan_at_some_steps,)))
    assert str(e.value).startswith("train: 2 consecutive non-finite steps (loss=nan) up to step 5")
    assert "raise train.max_consecutive_nonfinite" in str(e.value)
    rows = metrics_of(str(tmp_path))
    assert rows[2]["nonfinite_count"] == 1 and np.isnan(rows[2]["loss"])
    assert rows[3]["nonfinite_count"] == 1 and np.isfinite(rows[3]["loss"])
    assert rows[4]["nonfinite_count"] == 2
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert not any("eval/loss" in json.loads(line) for line in f)
    with pytest.raises(loop.ConfigError, match=r"config\.data\.eval_files is empty"):
        loop.evaluate(cfg, str(tmp_path))


def test_nemo_style_config_trains(tmp_path, tiny_config, metrics_of):
    """NeMo's knobs as a NeMo NeVA config writes them: `activation: fast-swiglu`,
    `rotary_percentage: 0.5`, `model_type: v1` (which selects the vicuna_v1 template)."""
    cfg = tiny_config(
        "stage2",
        **{
            "model.llm.activation": "fast-swiglu",
            "model.llm.rotary_percentage": 0.5,
            "model.llm.model_type": "v1",
            "data.template": None,
            "data.eval_files": (),
            "train.steps": 2,
            "train.log_every": 1,
            "checkpoint.every_steps": 2,
        },
    )
    assert cfg.data.template == "vicuna_v1"
    summary = loop.train(cfg, str(tmp_path))
    rows = metrics_of(str(tmp_path))
    assert summary["step"] == 2 and all(np.isfinite(rows[s]["loss"]) for s in (1, 2))
    saved = checkpoint.read_config(str(tmp_path)).llm
    assert (saved.activation, saved.rotary_percentage) == ("swiglu", 0.5)
    # Resuming that workdir with another architecture stops before anything compiles.
    other = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, llm=dataclasses.replace(cfg.model.llm, rotary_percentage=1.0)
        ),
    )
    with pytest.raises(loop.ConfigError) as e:
        loop.train(
            dataclasses.replace(other, train=dataclasses.replace(cfg.train, steps=4)), str(tmp_path)
        )
    assert str(e.value) == (
        f"config.model.llm.rotary_percentage=1.0: the checkpoint to resume ({tmp_path}) has "
        "rotary_percentage=0.5; set it to 0.5"
    )


def test_unusable_train_or_eval_data_is_an_error(tmp_path, tiny_config, synth_dir):
    """An eval set with no usable sample used to report eval/loss 0.0, a small unusable
    train set ended with status 0, a corrupt eval file was found after training."""
    with open(os.path.join(synth_dir, "stage1_eval.json")) as f:
        records = json.load(f)[:8]
    for r in records:
        r["image"] = "missing/" + r["image"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(records))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"id": 1,\n')
    quick = {"train.steps": 2, "checkpoint.every_steps": 1}
    with pytest.raises(
        DataError,
        match=r"eval_files: no sample could be evaluated: 8 of 8 .*"
        r"image_missing 8",
    ):
        loop.train(
            tiny_config("stage1", **quick, **{"data.eval_files": (str(missing),)}),
            str(tmp_path / "a"),
        )
    with pytest.raises(DataError, match=r"train_files: no sample could be used: 8 of 8 skipped"):
        loop.train(
            tiny_config(
                "stage1",
                **quick,
                **{
                    "data.train_files": (str(missing),),
                    "data.num_epochs": 1,
                    "data.eval_files": (),
                },
            ),
            str(tmp_path / "b"),
        )
    with pytest.raises(DataError, match=r"corrupt\.json: invalid JSON"):
        loop.train(
            tiny_config("stage1", **quick, **{"data.eval_files": (str(corrupt),)}),
            str(tmp_path / "c"),
        )
    assert not os.path.exists(tmp_path / "c" / "checkpoints" / "1")  # before any step


def test_sigterm_writes_the_steps_since_the_last_line(
    tmp_path, tiny_config, metrics_of, signal_driver
):
    """With log_every=4, SIGTERM at step 3: step 3's line holds steps 1-3 (they were lost:
    the resumed run's step-4 line averaged step 4 alone). The folder holds the line of an
    attempt that died before its first checkpoint: a fresh start drops it."""
    import signal

    driver, _ = signal_driver
    w = str(tmp_path / "run")
    os.makedirs(w)
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    cfg = tiny_config("stage1", **{"train.steps": 8, "train.log_every": 4, "data.eval_files": ()})
    hooks = loop.Hooks(after_step=(driver.signal_at(3, signal.SIGTERM),))
    assert loop.train(cfg, w, hooks=hooks) == {"step": 3, "stopped": "SIGTERM"}
    assert sorted(metrics_of(w)) == [3]


def test_resume_with_other_trained_parts_or_optimizer_is_one_line(tmp_path, tiny_config):
    """It was an Orbax tree-structure traceback after the model was built."""
    from neva_jax.run_config import ConfigError

    w = str(tmp_path / "run")
    common = {"train.steps": 2, "data.eval_files": ()}
    loop.train(tiny_config("stage1", **common), w)
    with pytest.raises(
        ConfigError,
        match=r"checkpoint trained projector; this config trains "
        r"projector, llm .* --config.init_from=",
    ):
        loop.train(tiny_config("stage2", **{**common, "train.steps": 4}), w)
    with pytest.raises(ConfigError, match="the optimizer state of its checkpoint does not fit"):
        loop.train(tiny_config("stage1", **{**common, "train.steps": 4, "train.grad_clip": 0.0}), w)


def test_finite_data_ends_the_run_with_a_checkpoint(tmp_path, tiny_config, metrics_of):
    """data.num_epochs=1 runs out before train.steps: the run ends at the last full batch
    with its metrics line and checkpoint (it used to end in a StopIteration traceback,
    nothing saved)."""
    w = str(tmp_path / "run")
    changes = {"data.num_epochs": 1, "train.steps": 1000, "checkpoint.every_steps": 1000}
    summary = loop.train(tiny_config("stage1", **changes, **{"data.eval_files": ()}), w)
    last = summary["step"]
    assert 0 < last < 1000
    assert checkpoint.complete_steps(os.path.join(w, "checkpoints")) == [last]
    assert max(metrics_of(w)) == last
