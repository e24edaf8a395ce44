"""`python -m neva_jax.generate`: one question, and a question file on the synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_jax import generate as cli
from neva_jax.data import synth


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synth.generate(out, n_train=1, n_eval=2, image_size=32)
    return out


def test_question_file_writes_answers_and_score(llava_dir, synth_dir, tmp_path, capsys):
    answers = tmp_path / "out" / "answers.jsonl"
    argv = ["--checkpoint", llava_dir, "--questions", f"{synth_dir}/eval_questions.jsonl"]
    argv += ["--image-folder", f"{synth_dir}/images", "--answers", str(answers)]
    argv += ["--references", f"{synth_dir}/eval_answers.jsonl", "--max-new-tokens", "4"]
    argv += ["--batch-size", "3"]  # 8 questions: batches of 3, 3 and a padded 2
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    lines = Path(f"{synth_dir}/eval_questions.jsonl").read_text().splitlines()
    questions = [json.loads(line) for line in lines]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    for r, q in zip(rows, questions, strict=True):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q["text"] and isinstance(r["text"], str)
    score = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert score["count"] == 8 and 0.0 <= score["accuracy"] <= 1.0
    assert {"accuracy/colour", "accuracy/shape", "accuracy/where", "accuracy/count"} <= set(score)


def test_one_question_json(llava_dir, synth_dir, capsys):
    argv = ["--checkpoint", llava_dir, "--image", f"{synth_dir}/images/eval/000000.png"]
    argv += ["--prompt", "What colour are the shapes?", "--max-new-tokens", "5", "--json"]
    argv += ["--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "logprobs"}
    assert 1 <= len(out["token_ids"]) == len(out["logprobs"]) <= 5
    assert all(lp <= 0 for lp in out["logprobs"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "x"], "--prompt"),
        (["--checkpoint", "x", "--questions", "q.jsonl"], "--answers"),
        (["--checkpoint", "x", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["--checkpoint", "x", "--prompt", "hi", "--questions", "q", "--answers", "a"], "not both"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path), "--prompt", "hi", "--top-p", "0"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert cli.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert "error:" in capsys.readouterr().err
