"""`--mode plan`: the memory plan from the command line, for the tiny config and for
LLaVA-1.5-13B stage 2 on 1 and 8 H200s (nothing is allocated or compiled)."""

import importlib.util
import os
import sys

import pytest
from absl import flags

from neva_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAVA = os.path.join(ROOT, "configs", "llava_v15.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(autouse=True)
def reset_flags():
    yield
    flags.FLAGS.unparse_flags()


def plan(capsys, monkeypatch, tmp_path, config: str, *extra: str) -> str:
    argv = ["neva_jax.main", f"--config={config}", f"--workdir={tmp_path}", "--mode=plan", *extra]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads --config.* overrides here
    flags.FLAGS.unparse_flags()
    main_lib.main(main_lib.parse_flags(argv))
    return capsys.readouterr().out


def test_tiny_plan_on_this_machine(capsys, monkeypatch, tmp_path, synth_dir):
    out = plan(capsys, monkeypatch, tmp_path, f"{TINY}:stage2,data_dir={synth_dir}")
    assert "mesh data=8 fsdp=1 tensor=1 (8 devices)" in out
    for part in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert f"\n  {part}" in out
    assert "set --config.plan.device_memory_gb" in out  # CPU: no memory limit to compare


def _llava_13b_stage2(arg: str = "stage2,size=13b", **plan_keys):
    """configs/llava_v15.py:`arg` as a ConfigDict (its data need not exist)."""
    spec = importlib.util.spec_from_file_location("llava_v15", LLAVA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config(f"{arg},data_dir=/nonexistent")
    cd.plan.device_memory_gb = 141.0
    for key, value in plan_keys.items():
        section, name = key.split("__")
        cd[section][name] = value
    return cd


def test_llava_13b_stage2_needs_more_than_one_h200(capsys):
    main_lib._plan(_llava_13b_stage2(plan__num_devices=1))
    one = capsys.readouterr().out
    assert "does NOT fit" in one and "it needs 2 devices" in one
    main_lib._plan(_llava_13b_stage2(plan__num_devices=8, mesh__data=1, mesh__fsdp=8))
    eight = capsys.readouterr().out
    assert "mesh data=1 fsdp=8 tensor=1 (8 devices), remat=full" in eight
    assert "\nfits: " in eight and "fastest layout that fits" in eight


def test_llava_lora_on_one_h200(capsys):
    """LoRA stage 2 (bf16 base, fp32 adapters): 7B fits one H200 at the recipe's batch,
    13B with two accumulation steps (cuDNN attention: what the default `auto` picks on a
    GPU in bf16, as in the README table)."""
    one = dict(plan__num_devices=1, mesh__data=1)
    main_lib._plan(_llava_13b_stage2("lora,size=7b", **one))
    seven = capsys.readouterr().out
    assert "parameters 7.383 B, trained 0.341 B" in seven and "\nfits: 100.4 GB" in seven
    assert "flash attention" in seven
    main_lib._plan(_llava_13b_stage2("lora,size=7b", attention__implementation="xla", **one))
    assert "does NOT fit" in capsys.readouterr().out  # the T x T scores of XLA attention
    main_lib._plan(_llava_13b_stage2("lora,size=13b", **one))
    thirteen = capsys.readouterr().out
    assert "does NOT fit" in thirteen
    assert "--config.train.batch_size=48 --config.train.grad_accum_steps=2" in thirteen


def test_lora_state_bytes_are_exact():
    """Per-device bytes of parameters (frozen ones in bf16), gradients and Adam moments
    (adapters + projector, two lr groups) equal those of the real abstract state."""
    import dataclasses

    import jax
    import numpy as np

    from neva_jax import sharding
    from neva_jax.model import lora, neva
    from neva_jax.run_config import TrainSection
    from neva_jax.train import build
    from neva_jax.train import optimizer as opt_lib
    from neva_jax.train import plan as plan_lib

    peft = lora.PeftConfig(scheme="lora", rank=4, target_modules=("all",))
    ncfg = dataclasses.replace(neva.tiny(), peft=peft)
    tx = opt_lib.make_optimizer(TrainSection(lr=1e-3, projector_lr=1e-4))
    parts, sizes = ("projector", "lora"), {"data": 2, "fsdp": 2, "tensor": 2}
    _, abstract, _ = build.abstract_train_state(
        ncfg, parts, tx, sharding.make_mesh(2, 2, 2), "bfloat16"
    )

    def per_device(tree) -> int:
        return sum(
            int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )

    got = plan_lib.state_bytes(plan_lib.abstract_model(ncfg), parts, tx, sizes, 1, "bfloat16")
    assert got["parameters"] == per_device(abstract.params) + per_device(abstract.frozen)
    assert got["gradients"] == per_device(abstract.params)
    assert got["optimizer"] == per_device(abstract.opt_state)
    assert {x.dtype.name for x in jax.tree.leaves(abstract.frozen)} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree.leaves(abstract.params)} == {"float32"}


def test_bad_plan_value_is_a_one_line_error(capsys, monkeypatch, tmp_path, synth_dir):
    with pytest.raises(SystemExit) as e:
        plan(
            capsys,
            monkeypatch,
            tmp_path,
            f"{TINY}:stage2,data_dir={synth_dir}",
            "--config.plan.memory_fraction=1.5",
        )
    assert e.value.code == main_lib.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.plan.memory_fraction=1.5") and len(err.splitlines()) == 1


@pytest.mark.parametrize("remat", ["none", "selective", "full"])
def test_activation_model_matches_xla_buffer_assignment(remat):
    """Gradients + activations of the plan vs the temporaries XLA allocates for the real
    train step (float32 on one CPU device, where buffer sizes are what they are on GPUs;
    XLA attention)."""
    import jax
    import jax.numpy as jnp

    from neva_jax import sharding
    from neva_jax.data import pipeline
    from neva_jax.model import clip, llama, neva
    from neva_jax.run_config import TrainSection
    from neva_jax.train import build, plan
    from neva_jax.train import optimizer as opt_lib
    from neva_jax.train import step as step_lib

    b, t, v = 16, 128, 8192
    run = dict(dtype="float32", remat_policy=remat, attention_impl="xla")
    ncfg = neva.NevaConfig(
        llm=llama.LlamaConfig(
            vocab_size=v,
            hidden_size=256,
            ffn_hidden_size=688,
            num_layers=2,
            num_attention_heads=8,
            encoder_seq_length=t,
            **run,
        ),
        vision=clip.ClipConfig(
            image_size=56,
            patch_dim=14,
            hidden_size=128,
            ffn_hidden_size=256,
            num_layers=2,
            num_attention_heads=4,
            **run,
        ),
        image_token_id=v - 1,
    )
    parts, train = ("projector", "llm"), TrainSection()
    tx = opt_lib.make_optimizer(train)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, abstract, shards = build.abstract_train_state(ncfg, parts, tx, mesh)
    batch_sh = build.batch_shardings(mesh, pipeline.BATCH_KEYS)
    shapes = {k: ((b, t), jnp.int32) for k in pipeline.BATCH_KEYS}
    shapes["loss_mask"] = ((b, t), jnp.float32)
    shapes["images"] = ((b, 1, 56, 56, 3), jnp.float32)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh[k]) for k, (s, d) in shapes.items()}
    fn = step_lib.make_train_step(
        graphdef, tx, opt_lib.learning_rate_schedule(train), trained_parts=parts
    )
    step = step_lib.jit_train_step(fn, shards, batch_sh, build.replicated(mesh))
    with jax.set_mesh(mesh):
        temp = step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
    workload = plan.Workload(batch_size=b, seq_len=t, flash_attention=False)
    est = plan.estimate(ncfg, parts, tx, {"data": 1, "fsdp": 1, "tensor": 1}, workload)
    predicted = est.bytes["gradients"] + est.bytes["activations"]
    assert abs(predicted - temp) <= 0.1 * temp, (remat, predicted, temp)
