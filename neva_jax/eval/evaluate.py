"""Scorers for generated answers and held-out loss.

Answer scorers work on plain strings and follow the reference evaluators that
LLaVA results are reported with:

- `exact_match`: case- and whitespace-insensitive string equality.
- `vqa_accuracy`: the VQAv2 / TextVQA soft accuracy. Answers are normalised the
  way the official evaluator does (punctuation, periods, number words, articles,
  contractions); the score is min(1, matches / 3) averaged over the leave-one-out
  subsets of the annotators' answers.
- `pope_metrics`: yes/no accuracy, precision, recall, F1 and yes-ratio (POPE),
  with "yes" the positive class.
- `extract_choice` / `multiple_choice_accuracy`: ScienceQA-style letter
  extraction; an answer that names no option (or several) counts as wrong.
- `heldout_loss`: token-level cross-entropy and perplexity on held-out
  conversations (the batch layout of docs/CONTRACTS.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neva_jax.model.neva import mask_padded_vocab

# --------------------------------------------------------------------------
# VQAv2 answer normalisation.

# Punctuation the official evaluator strips (or turns into a space). Periods are
# handled separately so that decimals such as "2.5" survive.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# A period not followed by a digit. (The official regex meant a look-behind for
# a digit too, but as written it only checks the look-ahead; we reproduce what
# it does, since that is what published numbers were computed with.)
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# A comma between digits ("1,000"): when present, punctuation is removed, not spaced.
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings mapped to their contraction, as in the official table.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't
    couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't
    dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
    havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
    howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't
    itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
    mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
    oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
    shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
    somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
    somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's
    thered=there'd thered've=there'd've there'dve=there'd've therere=there're
    theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
    theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
    wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
    wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
    wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
    wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()  # noqa: SIM905 - a word table reads better than a list literal
)


def normalize_vqa_answer(answer: str) -> str:
    """Normalises an answer as the VQAv2 evaluator (EvalAI) does.

    Lower-cases; drops commas, question marks and splits "'s"; removes or
    spaces out punctuation; strips periods that do not start a decimal; maps
    number words up to ten to digits; drops articles; restores contractions.

    >>> normalize_vqa_answer("The Two Dogs.")
    '2 dogs'
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation: removed when it touches a space (or a digit comma is present),
    # else replaced by a space ("black-white" -> "black white").
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one prediction against the annotators' answers.

    For each annotator, the prediction scores min(1, matches / 3) against the
    other annotators' answers; the result is the mean over annotators (so with
    10 annotators, 3 matches give 0.9 and 4 or more give 1.0). With a single
    reference this reduces to normalised exact match.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    scores = [min(1.0, (matches - (r == pred)) / 3.0) for r in refs]
    return sum(scores) / len(scores)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the strings agree ignoring case and surrounding/repeated spaces."""
    return float(" ".join(prediction.lower().split()) == " ".join(reference.lower().split()))


# --------------------------------------------------------------------------
# Yes/no (POPE).


def yes_no(answer: str) -> str:
    """Reads a free-form answer as "yes" or "no", as LLaVA's POPE evaluation does.

    Only the first sentence counts; any of the words "no", "not" makes it "no",
    everything else is "yes".
    """
    text = answer.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", " ").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class.

    Args:
      predictions: free-form model answers (read with `yes_no`).
      labels: reference answers, each "yes" or "no" (any case).

    Returns:
      accuracy, precision, recall, f1, yes_ratio (fraction of predictions that
      are "yes"); precision/recall/F1 are 0 where their denominator is 0.
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equal, non-zero counts: {len(predictions)} vs {len(labels)}")
    preds = [yes_no(p) == "yes" for p in predictions]
    golds = []
    for label in labels:
        norm = label.strip().lower().rstrip(".")
        if norm not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        golds.append(norm == "yes")
    tp = sum(p and g for p, g in zip(preds, golds, strict=True))
    fp = sum(p and not g for p, g in zip(preds, golds, strict=True))
    fn = sum(g and not p for p, g in zip(preds, golds, strict=True))
    tn = len(golds) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(golds),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(preds) / len(preds),
    }


# --------------------------------------------------------------------------
# Multiple choice (ScienceQA).

_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_choice(answer: str, num_options: int) -> int | None:
    """Returns the 0-based option an answer names, or None if it names none.

    Accepted forms (option letters A, B, ... up to `num_options`): the bare
    letter ("B"), a letter with a period or bracket ("B.", "B. cats", "(B)",
    "B)"), or exactly one "The answer is B". Anything else is unparsable; the
    caller must count it as wrong (LLaVA's script picks a random option here,
    which inflates scores).
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_options]
    text = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", text) or re.match(r"\(?([A-Z])[.)]\s", text)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    found = set(_ANSWER_IS.findall(text))
    if len(found) == 1 and (letter := found.pop()) in letters:
        return letters.index(letter)
    return None


def multiple_choice_accuracy(
    predictions: Sequence[str], answers: Sequence[int], num_options: Sequence[int]
) -> dict[str, float]:
    """Accuracy over multiple-choice questions, unparsable answers counted wrong.

    Args:
      predictions: model answers.
      answers: 0-based index of the correct option of each question.
      num_options: how many options each question has.

    Returns:
      accuracy and the fraction of answers that could not be parsed.
    """
    picks = [extract_choice(p, n) for p, n in zip(predictions, num_options, strict=True)]
    correct = sum(p == a for p, a in zip(picks, answers, strict=True))
    return {
        "accuracy": correct / len(picks),
        "unparsable": sum(p is None for p in picks) / len(picks),
    }


# --------------------------------------------------------------------------
# Scoring an answers file against references.


def score_answers(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Mapping[str, Any]],
    metric: str = "auto",
) -> dict[str, float]:
    """Scores answers by question id against reference records.

    A reference record has `answer` (one string) or `answers` (a list, VQAv2
    style), and optionally `category`: per-category accuracy is reported too.
    `metric` is "exact", "vqa", "pope" or "auto" ("pope" when every reference
    is yes/no, else "vqa").

    Returns:
      {"accuracy": ..., "count": ..., "accuracy/<category>": ...} plus the
      POPE metrics when scoring yes/no questions.
    """
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} reference questions have no answer, e.g. {missing[0]!r}")
    if not references:
        raise ValueError("no reference answers to score against")
    ids = list(references)
    refs = {q: _reference_answers(references[q], q) for q in ids}
    if metric == "auto":
        is_yn = all(a.strip().lower().rstrip(".") in ("yes", "no") for q in ids for a in refs[q])
        metric = "pope" if is_yn else "vqa"
    if metric == "vqa":
        scores = {q: vqa_accuracy(predictions[q], refs[q]) for q in ids}
    elif metric == "exact":
        scores = {q: max(exact_match(predictions[q], r) for r in refs[q]) for q in ids}
    elif metric == "pope":
        scores = {
            q: float(yes_no(predictions[q]) == refs[q][0].strip().lower().rstrip(".")) for q in ids
        }
    else:
        raise ValueError(f"unknown metric {metric!r}: use auto, exact, vqa or pope")
    result: dict[str, float] = {"accuracy": sum(scores.values()) / len(ids), "count": len(ids)}
    if metric == "pope":
        result.update(pope_metrics([predictions[q] for q in ids], [refs[q][0] for q in ids]))
    by_cat: dict[str, list[float]] = {}
    for q in ids:
        if "category" in references[q]:
            by_cat.setdefault(str(references[q]["category"]), []).append(scores[q])
    for cat, vals in sorted(by_cat.items()):
        result[f"accuracy/{cat}"] = sum(vals) / len(vals)
    return result


def _reference_answers(record: Mapping[str, Any], qid: Any) -> list[str]:
    if "answers" in record:
        answers = record["answers"]
        # VQAv2 annotation style: [{"answer": "..."}, ...].
        return [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]
    if "answer" in record:
        return [str(record["answer"])]
    raise ValueError(f"reference for question {qid!r} has neither 'answer' nor 'answers'")


# --------------------------------------------------------------------------
# Held-out loss and perplexity.


def masked_loss_sums(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of masked token cross-entropies and the number of masked tokens.

    Args:
      logits: [B, T, V] float.
      targets: [B, T] int next-token ids.
      loss_mask: [B, T] float, 1 where the target is trained.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * loss_mask), jnp.sum(loss_mask)


def heldout_loss(model: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Mean token loss and perplexity of a Neva model over held-out batches.

    The loss is averaged over all trained tokens of all batches (not a mean of
    per-batch means), so batch composition does not change it.

    Args:
      model: a `neva_jax.model.neva.Neva` (or any NNX module with its call API).
      batches: dicts with the batch keys of docs/CONTRACTS.md.

    Returns:
      {"loss", "perplexity", "tokens"}.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        m = nnx.merge(graphdef, state)
        logits = m(
            batch["input_ids"],
            batch.get("images"),
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        logits = mask_padded_vocab(logits, getattr(m.config, "tokenizer_vocab_size", 0))
        return masked_loss_sums(logits, batch["targets"], batch["loss_mask"])

    total, count = 0.0, 0.0
    for batch in batches:
        keys = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "images")
        s, n = sums(state, {k: batch[k] for k in keys if k in batch})
        total += float(s)
        count += float(n)
    if count == 0:
        raise ValueError("held-out batches contain no trained tokens (loss_mask is all zero)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": count}
