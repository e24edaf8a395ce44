"""LoRA stage 2 through the real loop: what trains, what stays frozen, exact resume.

The LLaVA-style set-up on the tiny model: adapters on every linear of the decoder
with dropout, the projector at its own learning rate, the frozen base held in bf16.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from neva_jax.convert import checkpoint
from neva_jax.model import parts as model_parts
from neva_jax.run_config import ConfigError
from neva_jax.train import build, loop

LORA = {
    "model.peft.scheme": "lora",
    "model.peft.rank": 4,
    "model.peft.alpha": 8.0,
    "model.peft.dropout": 0.1,
    "model.peft.target_modules": ("all",),
    "train.projector_lr": 1e-3,
    "train.frozen_param_dtype": "bfloat16",
}
RUN = {"train.steps": 4, "train.log_every": 1, "checkpoint.every_steps": 2}


def _flag(value) -> str:
    return repr(value) if isinstance(value, tuple) else str(value)


def test_lora_trains_adapters_and_projector_only_and_resumes_after_sigkill(
    tmp_path,
    tiny_config,
    metrics_of,
    kill_at_step,
    init_params,
    bit_identical,
):
    cfg = tiny_config("stage2", **LORA, **RUN, **{"data.eval_files": ()})
    assert cfg.trained_parts == ("projector", model_parts.ADAPTERS)
    ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    loop.train(cfg, ref_dir)
    ref_rows = metrics_of(ref_dir)
    assert sorted(ref_rows) == [1, 2, 3, 4] and ref_rows[4]["loss"] < ref_rows[1]["loss"]

    # Frozen: the LLM's base weights and the vision tower bit-identical to the
    # initialisation (held in bf16); adapters and projector moved.
    init = jax.tree.map(np.asarray, init_params(cfg))
    params, meta = checkpoint.restore_params(ref_dir)
    assert meta["trained_parts"] == ["projector", "lora"]
    trained, frozen = model_parts.split_dict(params, cfg.trained_parts)
    init_trained, init_frozen = model_parts.split_dict(init, cfg.trained_parts)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(frozen))
    assert bit_identical(frozen, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), init_frozen))
    for name in ("projector", "llm"):
        pairs = zip(
            jax.tree.leaves(trained[name]), jax.tree.leaves(init_trained[name]), strict=True
        )
        for a, b in pairs:
            assert a.dtype == np.float32 and not np.array_equal(a, b)
    # Gradients and Adam moments exist for the adapters and the projector only: two
    # moments per trained parameter, of its shape, and nothing else but the counts.
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(ref_dir, "checkpoints/4/state")).tree
    moments = sorted(tuple(m.shape) for m in jax.tree.leaves(tree["opt_state"]) if m.shape)
    assert moments == sorted(2 * [tuple(x.shape) for x in jax.tree.leaves(trained)])
    n_adapters = len(jax.tree.leaves(trained["llm"]))
    assert n_adapters == 2 * 7 and len(jax.tree.leaves(trained)) == n_adapters + 4
    # The one restore path rebuilds the adapters (generate, eval, export, serving) and
    # reads the bf16 base back as the model's fp32 exactly.
    model, info = checkpoint.load_model(ref_dir)
    assert info.config.peft == cfg.model.peft
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))
    # A config without adapters would drop them: init_from refuses.
    plain = tiny_config("stage2")
    abstract, _ = build.param_shardings(plain.model, build.run_mesh(plain))
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        build.load_init_params(ref_dir, abstract)
    # Evaluating or resuming it without the same adapters is refused before anything is
    # built (eval used to restore the base alone and report its loss).
    plain_eval = tiny_config("stage2", **{"eval.checkpoint": ref_dir})
    for fn in (loop.evaluate, loop.train):
        with pytest.raises(ConfigError, match=r"config.model.peft.\*: .* has LoRA rank 4"):
            fn(plain_eval, ref_dir)

    # kill -9 right after step 2's checkpoint (a separate process), then resume.
    flags = [f"--config.{k}={_flag(v)}" for k, v in {**LORA, **RUN}.items()]
    kill_at_step(2, "stage2", run_dir, *flags)
    loop.train(cfg, run_dir)
    rows = metrics_of(run_dir)
    assert sorted(rows) == sorted(ref_rows)
    for step, ref in ref_rows.items():  # dropout masks included: the same losses
        assert rows[step]["loss"] == ref["loss"], step
        assert rows[step]["grad_norm"] == ref["grad_norm"], step
    final, _ = checkpoint.restore_params(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
