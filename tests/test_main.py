"""The entry point: bad flags and config values end with one line on stderr and status 2,
before anything is built or compiled."""

import os
import sys

import pytest
from absl import flags

from neva_jax import main as main_lib
from neva_jax.data import synth
from neva_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
EVALUATE = loop.evaluate  # the fixture below replaces it


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=8, n_eval=4)
    return out


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Validation must fail before training starts; reaching it is a test failure."""

    def fail(*args, **kwargs):
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr(loop, "train", fail)
    monkeypatch.setattr(loop, "evaluate", fail)
    yield
    flags.FLAGS.unparse_flags()


def run(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    argv = ["neva_jax.main", *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads --config.* overrides here
    flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        main_lib.main(main_lib.parse_flags(argv))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--config.mesh.tensor=3"], "error: config.mesh.tensor=3: must divide"),
        (["--config.data.template=nope"], "error: config.data.template='nope': unknown"),
        (["--config.mesh.tensr=2"], "error: config.mesh.tensr: unknown config key; did you mean "),
        (  # a misspelt section: ml_collections raises KeyError (its repr was printed)
            ["--config.trian.steps=2"],
            "error: config.trian.steps: unknown config key; did you mean config.train.steps?",
        ),
        (["--config.train.steps=x"], "error: "),
        (["--mode=predict"], "error: "),
        (["stray"], "error: unexpected arguments: stray"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, monkeypatch, tmp_path, data_dir, extra, expected):
    config = f"--config={TINY}:stage1,data_dir={data_dir}"
    code, err = run(capsys, monkeypatch, config, f"--workdir={tmp_path}", *extra)
    assert code == main_lib.EXIT_USAGE
    assert err.startswith(expected), err
    assert len(err.splitlines()) == 1


def test_bad_config_file_argument_and_missing_workdir(capsys, monkeypatch, data_dir):
    code, err = run(capsys, monkeypatch, f"--config={TINY}:stage1,dat_dir=x", "--workdir=/x")
    assert code == 2 and err.startswith("error: config argument 'dat_dir': unknown"), err
    code, err = run(capsys, monkeypatch, f"--config={TINY}:stag2,data_dir=x", "--workdir=/x")
    assert code == 2 and err.startswith("error: config argument 'stag2': unknown variant"), err
    code, err = run(capsys, monkeypatch, "--config=/no/such.py", "--workdir=/x")
    assert code == 2 and err.startswith("error: --config=/no/such.py: no such file"), err
    code, err = run(capsys, monkeypatch, f"--config={TINY}:stage1,data_dir={data_dir}")
    assert (
        code == 2 and err == "error: --workdir is required: the folder for checkpoints and metrics"
    )


def test_init_from_with_another_rope_theta_fails_naming_it(
    capsys, monkeypatch, tmp_path, data_dir, llama3_theta_folder
):
    """Never a silently wrong model: a set key that disagrees with init_from's model is a
    usage error naming the key and both values, before anything is built."""
    config = f"--config={TINY}:stage1,data_dir={data_dir}"
    init = f"--config.init_from={llama3_theta_folder}"
    args = (config, f"--workdir={tmp_path}", init, "--config.model.llm.rope_theta=10000")
    code, err = run(capsys, monkeypatch, *args)
    print(f"\n{err}")
    assert code == main_lib.EXIT_USAGE and len(err.splitlines()) == 1
    assert err == (
        f"error: config.model.llm.rope_theta=10000.0: init_from {llama3_theta_folder!r} has "
        "rope_theta=500000.0; set it to 500000.0 or leave it unset (None) to take it"
    )


def test_eval_without_a_checkpoint_is_one_line(capsys, monkeypatch, tmp_path, data_dir):
    """`--mode eval` where nothing was trained (or a wrong `eval.checkpoint`) names the
    folder and what to do, before the model is built."""
    monkeypatch.setattr(loop, "evaluate", EVALUATE)
    config = f"--config={TINY}:stage2,data_dir={data_dir}"
    code, err = run(capsys, monkeypatch, config, f"--workdir={tmp_path}", "--mode=eval")
    assert code == main_lib.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --workdir={tmp_path}: nothing to evaluate: "), err
    assert err.endswith(
        "set config.eval.checkpoint to a training workdir, step folder or model folder"
    )
    args = (
        config,
        f"--workdir={tmp_path}",
        "--mode=eval",
        f"--config.eval.checkpoint={tmp_path}/x",
    )
    code, err = run(capsys, monkeypatch, *args)
    assert code == main_lib.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: config.eval.checkpoint='{tmp_path}/x': nothing to evaluate"), err


def test_a_value_of_another_type_in_a_config_file_names_the_key(capsys, monkeypatch, tmp_path):
    """A config file that sets one file where the key holds a tuple of files."""
    path = tmp_path / "one_file.py"
    path.write_text(
        "from neva_jax.config import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.data.train_files = '/x/train.json'\n"
        "    return c\n"
    )
    code, err = run(capsys, monkeypatch, f"--config={path}", f"--workdir={tmp_path}")
    assert code == main_lib.EXIT_USAGE and err == (
        "error: config.data.train_files='/x/train.json': a str where a tuple is expected; "
        "for one, write ('/x/train.json',)"
    )
