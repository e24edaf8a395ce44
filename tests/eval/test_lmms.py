"""Scoring an answer (`neva_jax.eval.score`) and lmms-eval's in-process model class
(`--model neva_jax`, found through the `lmms_eval.models` entry point), offline on a
local four-image task asked both ways: generated answers and multiple choice."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from lmms_colours import COLOURS, QUESTION, write_task
from PIL import Image


@pytest.fixture(scope="module")
def generator(llava_dir: str):
    from neva_jax.eval.generate import Generator

    return Generator.load(llava_dir)


def test_score_of_the_greedy_answer_is_its_decoded_logprobs(generator):
    """The full forward's log-probability of what the KV-cache decode produced equals the
    sum of the decode's own log-probs, and it is the greedy answer; another answer is not."""
    from neva_jax.eval.score import continuation_ids, continuation_scores

    image = Image.new("RGB", (48, 40), COLOURS["red"])
    [done] = generator.generate([QUESTION], [image], max_new_tokens=6)
    # The answer follows "ASSISTANT:" with a space (the decoder drops it from the text).
    text = " " + generator.tokenizer.hf.decode(done.token_ids, skip_special_tokens=False)
    ids, n = continuation_ids(generator, QUESTION, text, True)
    assert ids[-n:].tolist() == done.token_ids
    (logprob, greedy), (other, other_greedy) = continuation_scores(
        generator, [(QUESTION, text, image), (QUESTION, " zzz" + text, image)]
    )
    assert greedy and not other_greedy
    np.testing.assert_allclose(logprob, sum(done.logprobs), rtol=0, atol=1e-4)
    assert other < logprob
    # Text only, and an empty answer.
    [(text_lp, _)] = continuation_scores(generator, [("Say hi.", " hi", None)])
    assert np.isfinite(text_lp) and text_lp < 0
    with pytest.raises(ValueError, match="empty"):
        continuation_scores(generator, [(QUESTION, "", image)])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the test extra has it)")
    root = tmp_path_factory.mktemp("lmms_model_task")
    common = write_task(root)
    (root / "colours_gen.yaml").write_text(
        common
        + textwrap.dedent("""\
        task: colours_gen
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 8
          temperature: 0
          until: ["\\n\\n"]
        process_results: !function colours_utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    )
    (root / "colours_mc.yaml").write_text(
        common
        + textwrap.dedent("""\
        task: colours_mc
        output_type: multiple_choice
        doc_to_choice: !function colours_utils.doc_to_choice
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    return root


def test_lmms_eval_model_class_answers_and_scores(generator, llava_dir, task_dir, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from neva_jax.eval.score import continuation_scores

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(task_dir)  # lmms-eval writes its caches and logs under the cwd
    results = simple_evaluate(
        model="neva_jax",
        model_args=f"checkpoint={llava_dir}",
        tasks=["colours_gen", "colours_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=2,
        log_samples=True,
        verbosity="WARNING",
    )
    images = {n: Image.open(task_dir / f"{n}.png").convert("RGB") for n in COLOURS}
    # generate_until: the answers are Generator.generate's (greedy, 8 tokens, batch of 2).
    want = [
        c.text for c in generator.generate([QUESTION] * 4, list(images.values()), max_new_tokens=8)
    ]
    samples = sorted(results["samples"]["colours_gen"], key=lambda s: s["doc_id"])
    got = [s["filtered_resps"][0] for s in samples]
    assert [g if isinstance(g, str) else g[0] for g in got] == want
    score = results["results"]["colours_gen"]["exact_match,none"]
    assert score == sum(w.strip().lower() == n for w, n in zip(want, COLOURS, strict=True)) / 4
    # multiple_choice: one loglikelihood per choice (" red", ...), the choice with the
    # highest one counts.
    samples = sorted(results["samples"]["colours_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for name, sample in zip(COLOURS, samples, strict=True):
        ours = continuation_scores(generator, [(QUESTION, " " + c, images[name]) for c in COLOURS])
        recorded = [tuple(r[0]) if isinstance(r[0], list | tuple) else r for r in sample["resps"]]
        np.testing.assert_allclose([r[0] for r in recorded], [o[0] for o in ours], atol=1e-5)
        assert [bool(r[1]) for r in recorded] == [o[1] for o in ours]
        correct += int(np.argmax([o[0] for o in ours]) == list(COLOURS).index(name))
    assert results["results"]["colours_mc"]["acc,none"] == correct / 4
