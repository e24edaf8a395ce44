"""Scorers against hand-worked values."""

import jax.numpy as jnp
import numpy as np
import pytest

from neva_jax.eval import evaluate as ev


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Two Dogs.", "2 dogs"),  # article, number word, final period
        ("an apple", "apple"),  # article
        ("A", ""),  # only an article
        ("Black-and-white", "black and white"),  # hyphen between words -> space
        ("yes!", "yes"),  # trailing punctuation
        ("red , blue", "red blue"),  # comma removed before punctuation rules
        ("(left) side", "left side"),  # bracket next to a space is removed
        ("2.5", "2.5"),  # decimal point kept
        ("3.", "3"),  # period not followed by a digit stripped
        ("Ten", "10"),  # number word
        ("none", "0"),
        ("dont", "don't"),  # contraction restored
        ("It's red", "it 's red"),  # 's split off as in the official tokeniser
        ("  two\tcats\n", "2 cats"),  # whitespace
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert ev.normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_leave_one_out():
    refs = ["2"] * 3 + ["3"] * 7
    # 3 matching annotators: those 3 see 2 other matches (2/3), the other 7 see 3 (1).
    assert ev.vqa_accuracy("Two.", refs) == pytest.approx(0.9)
    assert ev.vqa_accuracy("three", refs) == pytest.approx(1.0)
    assert ev.vqa_accuracy("4", refs) == 0.0
    one = ["cat"] + ["dog"] * 9  # 1 match: nine annotators see 1/3
    assert ev.vqa_accuracy("the cat", one) == pytest.approx(0.3)
    two = ["cat"] * 2 + ["dog"] * 8  # 2 matches: 2 x 1/3 + 8 x 2/3
    assert ev.vqa_accuracy("cat", two) == pytest.approx(0.6)
    # A single reference is normalised exact match.
    assert ev.vqa_accuracy("The red one.", ["red 1"]) == 1.0
    assert ev.vqa_accuracy("blue", ["red"]) == 0.0


def test_exact_match():
    assert ev.exact_match(" Red  Circle ", "red circle") == 1.0
    assert ev.exact_match("red circle.", "red circle") == 0.0


def test_yes_no_reading():
    assert ev.yes_no("Yes, there is a dog.") == "yes"
    assert ev.yes_no("No.") == "no"
    assert ev.yes_no("There is not a dog in the image.") == "no"
    assert ev.yes_no("Nothing suggests otherwise") == "yes"  # "nothing" is not "no"
    assert ev.yes_no("Yes. No dogs are brown.") == "yes"  # first sentence only


def test_pope_metrics():
    preds = ["Yes, there is.", "No.", "yes", "There is not a dog.", "No", "Yes"]
    labels = ["yes", "no", "no", "yes", "no", "No"]
    # predicted yes: T F T F F T; gold yes: T F F T F F -> tp 1, fp 2, fn 1, tn 2.
    m = ev.pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="yes"):
        ev.pope_metrics(["yes"], ["maybe"])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1),
        ("(C)", 2),
        ("A. cats", 0),
        ("C)", 2),
        ("The answer is D.", 3),
        ("E", None),  # not an option of a 4-option question
        ("A cat is shown", None),  # a word, not an option letter
        ("I think cats", None),
        ("The answer is A. Or the answer is B.", None),  # ambiguous
        ("", None),
    ],
)
def test_extract_choice(answer, expected):
    assert ev.extract_choice(answer, 4) == expected


def test_multiple_choice_unparsable_counts_wrong():
    m = ev.multiple_choice_accuracy(["B", "no idea", "The answer is A."], [1, 0, 0], [3, 3, 3])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["unparsable"] == pytest.approx(1 / 3)


def test_score_answers_vqa_with_categories():
    refs = {
        1: {"answer": "red", "category": "colour"},
        2: {"answer": "circle", "category": "shape"},
        3: {"answers": ["2"] * 3 + ["3"] * 7, "category": "count"},
        4: {"answer": "blue", "category": "colour"},
    }
    preds = {1: "Red.", 2: "square", 3: "two", 4: "blue", 5: "extra answers are ignored"}
    m = ev.score_answers(preds, refs)
    assert m["count"] == 4
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.9 + 1) / 4)
    assert m["accuracy/colour"] == 1.0
    assert m["accuracy/shape"] == 0.0
    assert m["accuracy/count"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no answer"):
        ev.score_answers({1: "red"}, refs)


def test_score_answers_pope_auto():
    m = ev.score_answers(
        {"a": "Yes it is", "b": "yes"}, {"a": {"answer": "yes"}, "b": {"answer": "no"}}
    )
    assert m["accuracy"] == 0.5
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and m["yes_ratio"] == 1.0


def test_masked_loss_sums():
    # Uniform logits over 4 tokens: every token costs log 4.
    logits = jnp.zeros((1, 3, 4))
    targets = jnp.array([[1, 2, 3]])
    mask = jnp.array([[0.0, 1.0, 1.0]])
    total, count = ev.masked_loss_sums(logits, targets, mask)
    np.testing.assert_allclose(total, 2 * np.log(4), rtol=1e-6)
    assert float(count) == 2.0
