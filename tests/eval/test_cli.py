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
        (["--checkpoint", "x", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--checkpoint", "x", "--prompt", "hi", "--temperature", "nan"], "--temperature must"),
        (["--checkpoint", "x", "--prompt", "hi", "--temperature", "-1"], "--temperature must"),
        (["--checkpoint", "x", "--prompt", " "], "--prompt is empty"),
        (["--checkpoint", "x", "--prompt", "hi", "--template", "vicuna"], "invalid choice"),
        (
            ["--checkpoint", "x", "--prompt", "hi", "--image-folder", "d", "--batch-size", "2"],
            "--image-folder, --batch-size go with --questions",
        ),
        (["--checkpoint", "x", "--questions", "q", "--answers", "a", "--json"], "--json prints"),
        (["--checkpoint", "x", "--questions", "q.jsonl", "--answers", "q.jsonl"], "names the"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such file or folder" in err and "\n" not in err


@pytest.mark.parametrize(
    ("records", "extra", "message"),
    [
        ([{"question_id": 1}], (), "record 1: no question ('text' is None)"),
        ([{"question_id": {"a": 1}, "text": "q"}], (), "is not a string or number"),
        ([{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "b"}], (), "appears twice"),
        ([{"question_id": 1, "text": "q", "image": "nope.png"}], (), "image"),
        ([{"question_id": 1, "text": "q", "image": "../x.png"}], (), "outside the image folder"),
        ([{"question_id": 1, "text": "q"}], ("refs",), "no record has 'answer' or 'answers'"),
        ([{"question_id": 1, "text": "q"}], ("other_refs",), "does not ask, e.g. 2"),
    ],
)
def test_question_file_errors_come_before_the_model_loads(
    tmp_path, capsys, records, extra, message
):
    """Each is one line and exit 1 with a checkpoint that does not exist: the question
    file is checked before any loading (nothing is generated and then thrown away)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--checkpoint", str(tmp_path / "missing"), "--questions", str(questions)]
    argv += ["--answers", str(tmp_path / "a.jsonl"), "--image-folder", str(tmp_path)]
    if extra:
        refs = tmp_path / "r.jsonl"
        row = {"question_id": 1} if extra[0] == "refs" else {"question_id": 2, "answer": "x"}
        refs.write_text(json.dumps(row) + "\n")
        argv += ["--references", str(refs)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "a.jsonl").exists()
    (tmp_path / "q.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    argv[argv.index(str(questions))] = str(tmp_path / "q.png")
    assert cli.main(argv) == 1
    assert "q.png: not a text file" in capsys.readouterr().err


def test_prompts_the_model_cannot_take(llava_dir, synth_dir, capsys):
    image = f"{synth_dir}/images/eval/000000.png"
    argv = ["--checkpoint", llava_dir, "--image", image, "--prompt", "<image> a <image> b"]
    assert cli.main(argv) == 1
    assert "has 2 <image> placeholders; a question takes one image" in capsys.readouterr().err
    argv = ["--checkpoint", llava_dir, "--image", image, "--prompt", "hi"]
    assert cli.main([*argv, "--max-new-tokens", "100000"]) == 1
    err = capsys.readouterr().err
    assert "plus max_new_tokens=100000 exceeds the model's" in err and "ask for at most" in err


def test_default_model_id_names_the_run_of_a_step_folder():
    assert cli.default_model_id("/x/run/checkpoints/2000") == "run-2000"
    assert cli.default_model_id("/x/models/llava") == "llava"
