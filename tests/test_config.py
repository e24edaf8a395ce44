"""Config conversion and validation: one-line ConfigErrors naming the key, before compiling."""

import dataclasses
import importlib.util
import os

import pytest

from neva_jax import config as config_lib
from neva_jax import run_config
from neva_jax.config import ConfigError, from_config_dict, parse_arg
from neva_jax.data import synth
from neva_jax.run_config import MeshSection, TrainSection, mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("tiny", "demo", "neva_llama2_7b", "neva_llama2_13b", "llava_v15")


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=8, n_eval=4)
    return out


def tiny(data_dir, variant="stage1", **changes):
    """The tiny config as a plain dict (so any key or type can be set) with `changes`."""
    cd = load("tiny", f"{variant},data_dir={data_dir}").to_dict()
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        target = cd
        for part in filter(None, section.split(".")):
            target = target[part]
        target[name] = value
    return cd


def error(data_dir, **changes) -> str:
    with pytest.raises(ConfigError) as e:
        from_config_dict(tiny(data_dir, **changes))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_tiny_stages(data_dir):
    s1 = from_config_dict(tiny(data_dir, "stage1"))
    s2 = from_config_dict(tiny(data_dir, "stage2"))
    assert s1.trained_parts == ("projector",)
    assert s2.trained_parts == ("projector", "llm")
    assert s1.data.template == "plain" and s2.data.template == "vicuna_v1"
    assert s1.data.batch_size == s1.train.batch_size
    assert s1.model.llm.num_kv_heads == 2
    assert config_lib.to_dict(s1)["model"]["llm"]["freeze"] is True
    assert from_config_dict(load("tiny", f"stage1,data_dir={data_dir}")) == s1


LORA_CONFIGS = ("demo", "neva_llama2_7b", "neva_llama2_13b", "llava_v15")


@pytest.mark.parametrize(
    ("name", "variant"),
    [(n, v) for n in CONFIGS for v in ("stage1", "stage2")] + [(n, "lora") for n in LORA_CONFIGS],
)
def test_every_config_file_builds(name, variant):
    cd = load(name, variant)
    assert cd.model.llm.freeze is (variant == "stage1")
    recipe = name in ("neva_llama2_7b", "neva_llama2_13b", "llava_v15")  # LLaVA / NeMo's
    assert cd.train.loss_normalization == ("micro_batch" if recipe else "global_tokens")
    assert (cd.model.peft.scheme == "lora") is (variant == "lora")
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
        docstring = f.read().split('"""')[1]
    assert "python -m neva_jax.main" in docstring  # the exact commands
    assert f"configs/{name}.py:{variant}" in docstring


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"mesh.tensor": 3}, "config.mesh.tensor=3: must divide model.llm.num_attention_heads=4"),
        ({"mesh.tensor": 4}, "config.mesh.tensor=4: must divide model.llm.num_query_groups"),
        ({"data.template": "nope"}, "config.data.template='nope': unknown"),
        ({"mesh.data": 3}, "config.mesh: data*fsdp*tensor = 3*1*1 = 3 but 8 devices"),
        ({"train.batch_size": 4}, "config.train.batch_size=4"),
        ({"train.stpes": 3}, "config.train.stpes: unknown key; did you mean train.steps?"),
        ({"model.llm.hiden_size": 3}, "did you mean model.llm.hidden_size?"),
        ({"train.steps": "ten"}, "config.train.steps='ten': expected an int"),
        ({"train.min_lr": 1.0}, "config.train.min_lr=1.0: must be in [0, train.lr]"),
        ({"remat.policy": "most"}, "config.remat.policy='most'"),
        ({"model.projector": "mlp"}, "projector"),
        ({"precision.compute_dtype": "fp8"}, "config.precision.compute_dtype='fp8'"),
        ({"data.tokenizer": "/no/such"}, "config.data.tokenizer='/no/such': no such folder"),
        ({"data.batch_size": 8}, "config.data.batch_size: set train.batch_size"),
        ({"init_from": "/no/such"}, "config.init_from='/no/such': no such file or folder"),
        ({"attention.implementation": "cudnn"}, "needs a GPU backend"),
        ({"model.llm.hidden_dropout": 0.1}, "dropout is not implemented"),
        ({"data.max_seq_len": 8}, "config.data.max_seq_len=8"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(data_dir, changes, expected):
    assert expected in error(data_dir, **changes)


def test_lora_recipes_and_peft_keys(data_dir):
    """LLaVA's finetune_lora.sh and NeMo's NeVA PEFT numbers; `model.peft.*` keys."""
    llava = from_config_dict(load("llava_v15", "lora"), check_environment=False)
    peft, t = llava.model.peft, llava.train
    assert (peft.rank, peft.scale, peft.dropout, peft.a_init) == (128, 2.0, 0.05, "kaiming")
    assert len(peft.projections) == 7 and (t.lr, t.projector_lr) == (2e-4, 2e-5)
    assert t.frozen_param_dtype == "bfloat16" and llava.trained_parts == ("projector", "lora")
    nemo = from_config_dict(load("neva_llama2_13b", "lora"), check_environment=False).model.peft
    assert (nemo.rank, nemo.scale, nemo.projections, nemo.a_init) == (
        32,
        1.0,
        ("q", "k", "v"),
        "xavier",
    )
    cfg = from_config_dict(
        tiny(data_dir, "stage2", **{"model.peft.scheme": "lora", "model.peft.alpha": 4})
    )
    assert (
        cfg.model.peft.scale == 4 / 32 and config_lib.to_dict(cfg)["model"]["peft"]["alpha"] == 4.0
    )
    assert error(data_dir, **{"model.peft.scheme": "lora"}).startswith(
        "config.model.peft.scheme='lora': with model.llm.freeze=True no adapter trains"
    )
    assert error(data_dir, **{"model.peft.target_modules": ("lm_head",)}).startswith(
        "config.model.peft.target_modules=('lm_head',): expected names from attention_qkv"
    )
    assert error(data_dir, **{"model.peft.dropout": 1.0}) == (
        "config.model.peft.dropout=1.0: must be in [0, 1)"
    )
    assert "config.train.frozen_param_dtype='fp8'" in error(
        data_dir, **{"train.frozen_param_dtype": "fp8"}
    )


def test_mesh_shape_fills_minus_one():
    assert mesh_shape(MeshSection(data=-1, tensor=2), 8) == (4, 1, 2)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        mesh_shape(MeshSection(data=-1, fsdp=-1), 8)


def test_parse_arg():
    assert parse_arg("stage2,data_dir=/x", variant="stage1", data_dir="d") == {
        "variant": "stage2",
        "data_dir": "/x",
    }
    with pytest.raises(ConfigError, match="unknown"):
        parse_arg("stage1,nope=1", variant="stage1")
    stages = ("stage1", "stage2", "lora")
    assert parse_arg("data_dir=/x", stages, data_dir="d") == {"variant": "stage1", "data_dir": "/x"}
    assert parse_arg("lora", stages)["variant"] == "lora"
    # A typo in the stage must not silently run the default one.
    with pytest.raises(ConfigError, match="'stag2': unknown variant; did you mean 'stage2'"):
        parse_arg("stag2,data_dir=/x", stages, data_dir="d")
    with pytest.raises(ConfigError, match="'lora': a second variant after 'stage2'"):
        parse_arg("stage2,lora", stages)


def test_default_config_has_every_key():
    cd = config_lib.default_config()
    assert cd.train.steps == TrainSection().steps
    assert "template" in cd.data and "batch_size" not in cd.data
    assert cd.data.system_prompt is None  # a str-typed slot: overridable from the CLI
    cd.data.system_prompt = "be brief"


def _flat_keys(tree, prefix="") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


def test_to_dict_round_trips_and_holds_every_key(data_dir):
    cfg = from_config_dict(tiny(data_dir, "stage2"))
    d = config_lib.to_dict(cfg)
    assert from_config_dict(d) == cfg
    assert d["model"]["vision_encoder"]["patch_dim"] == 8
    assert d["precision"]["compute_dtype"] == "float32"
    assert _flat_keys(d) == _flat_keys(config_lib.default_config())
    assert "model.llm.num_query_groups" in _flat_keys(d)


def test_run_time_keys_reach_both_parts_and_errors_name_the_key(data_dir):
    cfg = from_config_dict(tiny(data_dir, **{"remat.policy": "full", "model.scan_layers": False}))
    for part in (cfg.model.llm, cfg.model.vision):
        assert (part.dtype, part.remat_policy, part.scan_layers) == ("float32", "full", False)
    assert error(data_dir, **{"model.vision_encoder.image_size": 30}) == (
        "config.model.vision_encoder.image_size=30: not a multiple of patch_dim=8"
    )
    assert error(data_dir, **{"attention.implementation": "flash"}).startswith(
        "config.attention.implementation='flash': expected one of auto"
    )
    # Values that would run but be wrong, each refused naming its key.
    assert error(data_dir, **{"data.num_image_slots": 8}).startswith(
        "config.data.num_image_slots=8: the model's is 16"
    )
    assert error(data_dir, **{"data.use_im_start_end": True}).startswith(
        "config.data.use_im_start_end=True: the model's is False"
    )
    assert error(data_dir, **{"train.adam_b2": 1.0}) == (
        "config.train.adam_b2=1.0: must be in [0, 1)"
    )
    assert error(data_dir, **{"data.image_std": (0.5, 0.0, 0.5)}).startswith(
        "config.data.image_std=[0.5, 0.0, 0.5]: every value must be > 0"
    )
    assert error(data_dir, **{"data.prefetch_buffer_size": -1}).startswith(
        "config.data.prefetch_buffer_size=-1: must be >= 0"
    )
    cfg = from_config_dict(tiny(data_dir))
    both = dataclasses.replace(
        cfg,
        init_from="/run",
        vision_encoder=dataclasses.replace(cfg.vision_encoder, from_pretrained="/clip"),
    )
    with pytest.raises(ConfigError, match="would replace; set one of them"):
        run_config.check(both, 8, check_environment=False)
    # NeMo's from_hf=False (a NeMo CLIP checkpoint) is refused, not ignored.
    assert error(data_dir, **{"model.vision_encoder.from_hf": False}).startswith(
        "config.model.vision_encoder.from_hf=False: a NeMo CLIP checkpoint is not read; set True"
    )


@pytest.mark.parametrize("preset", ["llama2_7b_chat", "llava_v15_13b", "tiny"])
def test_model_preset_sets_every_architecture_key(preset):
    from neva_jax.model import neva
    from neva_jax.model.schema import keys

    cd = config_lib.default_config()
    config_lib.model_preset(cd, preset)
    got, want = config_lib.model_config(cd), neva.PRESETS[preset]()
    for ours, theirs in ((got.llm, want.llm), (got.vision, want.vision), (got, want)):
        for name in keys(type(theirs)):
            assert getattr(ours, name) == getattr(theirs, name), (preset, name)
    assert got.llm.dtype == "bfloat16"  # run-time fields keep the run config's


def _command_line(monkeypatch, data_dir, *overrides, variant="stage1"):
    """The RunConfig `python -m neva_jax.main` builds from `--config.KEY=VALUE` overrides
    (absl defines a flag per overridden key once per process: each key once per session)."""
    import sys

    from absl import flags

    from neva_jax import main as main_lib

    argv = [
        "neva_jax.main",
        f"--config={ROOT}/configs/tiny.py:{variant},data_dir={data_dir}",
        "--workdir=/unused",
        *(f"--config.{o}" for o in overrides),
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads --config.* overrides here
    flags.FLAGS.unparse_flags()
    try:
        main_lib.parse_flags(argv)
        return from_config_dict(main_lib._config_value())
    finally:
        flags.FLAGS.unparse_flags()


def test_none_from_the_command_line(data_dir, monkeypatch):
    """`=None` is the key's None, not the text 'None': the template's system prompt, no
    eval files (ml_collections hands over 'None' and (None,))."""
    cfg = _command_line(
        monkeypatch, data_dir, "data.system_prompt=None", "data.eval_files=None", variant="stage2"
    )
    assert cfg.data.system_prompt is None and cfg.data.eval_files == ()
    assert _command_line(monkeypatch, data_dir, "data.train_files=None").data.train_files == ()


def test_rotary_percentage_from_the_command_line_reaches_attention(data_dir, monkeypatch):
    """A knob added to the run config by marking one LlamaConfig field (NeMo's partial rotary)."""
    from flax import nnx

    from neva_jax.model.neva import Neva

    cfg = _command_line(monkeypatch, data_dir, "model.llm.rotary_percentage=0.5")
    assert cfg.model.llm.rotary_percentage == 0.5
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Neva(cfg.model, rngs=nnx.Rngs(0)))
    attn = model.llm.layers.attn
    assert cfg.model.llm.head_size == 16 and attn.rotary_dim == 8


def test_unset_architecture_keys_take_init_froms_values(data_dir, llama3_theta_folder):
    """configs/tiny.py sets the shapes, not rope_theta: init_from's 500000 is taken; a
    value set anywhere (file, command line, preset) must agree with init_from's."""
    assert config_lib.default_config().model.llm.rope_theta is None  # unset
    assert from_config_dict(tiny(data_dir)).model.llm.rope_theta == 10000.0  # the default
    cfg = from_config_dict(tiny(data_dir, init_from=llama3_theta_folder))
    assert cfg.model.llm.rope_theta == 500000.0 and cfg.model.llm.num_layers == 2
    same = {"init_from": llama3_theta_folder, "model.llm.rope_theta": 500000.0}
    assert from_config_dict(tiny(data_dir, **same)) == cfg
    assert error(data_dir, init_from=llama3_theta_folder, **{"model.llm.rope_theta": 1e4}) == (
        f"config.model.llm.rope_theta=10000.0: init_from {llama3_theta_folder!r} has "
        "rope_theta=500000.0; set it to 500000.0 or leave it unset (None) to take it"
    )
    assert error(
        data_dir, init_from=llama3_theta_folder, **{"model.llm.layernorm_epsilon": 1e-6}
    ).startswith("config.model.llm.layernorm_epsilon=1e-06: init_from")


def test_unset_template_takes_init_froms(data_dir, llama3_theta_folder, tmp_path):
    """init_from's conversation template (a model folder's conversation.json) is an unset
    data.template's value unless model.llm.model_type is set; stage 1's plain is not
    taken; a template set elsewhere wins, and training from it logs a warning."""
    import json
    import shutil

    from neva_jax.train.build import template_mismatch

    folder = str(tmp_path / "model")
    shutil.copytree(llama3_theta_folder, folder)
    unset = {"init_from": folder, "data.template": None}
    assert from_config_dict(tiny(data_dir, **unset)).data.template == "llava_llama_2"
    assert template_mismatch(folder, "vicuna_v1") is None  # the folder names none
    (tmp_path / "model" / "conversation.json").write_text(json.dumps({"template": "vicuna_v1"}))
    assert from_config_dict(tiny(data_dir, **unset)).data.template == "vicuna_v1"
    nemo = {**unset, "model.llm.model_type": "nvgpt"}
    assert from_config_dict(tiny(data_dir, **nemo)).data.template == "nvgpt"
    assert from_config_dict(tiny(data_dir, init_from=folder)).data.template == "plain"  # set
    assert template_mismatch(folder, "vicuna_v1") is None
    warning = template_mismatch(folder, "llava_llama_2")
    assert "trained with the 'vicuna_v1' conversation template" in warning
    assert "--config.data.template=vicuna_v1" in warning
    (tmp_path / "model" / "conversation.json").write_text(json.dumps({"template": "plain"}))
    assert from_config_dict(tiny(data_dir, **unset)).data.template == "llava_llama_2"
    assert template_mismatch(folder, "vicuna_v1") is None  # stage 2 from stage 1


@pytest.mark.parametrize(
    ("model_type", "template"),
    [
        ("llama_2", "llava_llama_2"),
        ("v1", "vicuna_v1"),
        ("nvgpt", "nvgpt"),
        ("llama_3", "llama_3"),
        ("mistral", "mistral"),
    ],
)
def test_model_type_selects_the_template_nemo_selects(data_dir, model_type, template):
    """NeMo's NeVA configs: `conv_template: ${model.mm_cfg.llm.model_type}`."""
    changes = {"data.template": None, "model.llm.model_type": model_type}
    assert from_config_dict(tiny(data_dir, **changes)).data.template == template
    changes["data.template"] = "plain"  # a template that is set wins, as in NeMo
    assert from_config_dict(tiny(data_dir, **changes)).data.template == "plain"


def test_nemo_spellings_and_their_limits(data_dir):
    nemo = {"model.llm.activation": "fast-swiglu", "model.llm.rotary_percentage": 0.5}
    cfg = from_config_dict(tiny(data_dir, **nemo))
    assert cfg.model.llm.activation == "swiglu" and cfg.model.llm.rotary_percentage == 0.5
    assert error(data_dir, **{"model.llm.model_type": "vicuna"}) == (
        "config.model.llm.model_type='vicuna': expected one of NeMo's llama_2, v1, nvgpt, "
        "llama_3, mistral (it selects data.template when that is unset)"
    )
    assert error(data_dir, **{"model.llm.activation": "fast-geglu"}).startswith(
        "config.model.llm.activation='fast-geglu': expected one of swiglu, fast-swiglu"
    )
    assert "an even number of the 16 features" in error(
        data_dir, **{"model.llm.rotary_percentage": 0.3125}
    )
    assert error(data_dir, **{"model.llm.rope_type": "yarn"}).startswith(
        "config.model.llm.rope_type='yarn': expected one of default, llama3"
    )


def test_python_api_misuse_names_the_fix():
    from neva_jax.train import loop

    with pytest.raises(ConfigError, match="model preset 'nope': unknown; known: "):
        config_lib.model_preset(config_lib.default_config(), "nope")
    with pytest.raises(TypeError, match="from_config_dict"):
        loop.train(config_lib.default_config(), "/nonexistent")


def test_settings_that_do_less_than_they_seem_are_logged(data_dir):
    from neva_jax.train import build

    notes = build.config_notes(
        from_config_dict(
            tiny(
                data_dir,
                "stage1",
                **{
                    "train.projector_lr": 1e-4,
                    "data.packing": True,
                    "model.peft.rank": 8,
                    "checkpoint.every_steps": 10**6,
                    "eval.checkpoint": "/run",
                    "train.warmup_ratio": 0.1,
                },
            )
        )
    )
    text = "\n".join(notes)
    assert "its lr is train.projector_lr=0.0001; train.lr=" in text
    assert "data.packing=True with data.max_images_per_row=1" in text
    assert "model.peft.rank: no effect with model.peft.scheme=none" in text
    assert "model.llm is frozen at its random initialisation" in text
    assert "only the final step is saved" in text
    assert "eval.checkpoint is read by --mode eval only" in text
    assert "train.warmup_ratio=0.1 is unused: train.warmup_steps=2 sets the warmup" in text
    quiet = build.config_notes(from_config_dict(tiny(data_dir, "stage2")))
    assert not any(
        "projector_lr" in n or "packing" in n or "peft" in n or "warmup" in n for n in quiet
    )
