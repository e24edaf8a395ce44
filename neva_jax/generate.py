"""`python -m neva_jax.generate`: answer questions about images with a checkpoint.

One question:
  python -m neva_jax.generate --checkpoint PATH --image IMG --prompt TEXT
      [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--json]
prints the answer, or with --json one object {"text", "token_ids", "logprobs"}.

A LLaVA evaluation file ({"question_id", "image", "text"} per line):
  python -m neva_jax.generate --checkpoint PATH --questions Q.jsonl --image-folder DIR
      --answers A.jsonl [--references R.jsonl] [--metric auto|exact|vqa|pope]
writes one {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
per line and, when reference answers are known ({"question_id", "answer" or
"answers"[, "category"]} per line in --references, or in the question records
themselves), prints the score as one JSON line.

PATH is a training workdir (newest checkpoint), a checkpoint step folder, a
neva-jax model folder or a llava-hf folder. Errors print one line and exit 1 (a command line
argparse cannot parse: its usage and status 2).
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neva_jax.data.conversation import TEMPLATES

BATCH_SIZE = 8  # --batch-size's default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line (no model is loaded here)."""
    p = argparse.ArgumentParser(
        prog="python -m neva_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="workdir, step folder, model folder or llava-hf folder",
    )
    one = p.add_argument_group("one question")
    one.add_argument("--image", metavar="IMG", help="image file (omit for a text-only prompt)")
    one.add_argument("--prompt", metavar="TEXT", help="the question")
    one.add_argument("--json", action="store_true", help='print {"text", "token_ids", "logprobs"}')
    batch = p.add_argument_group("a question file")
    batch.add_argument(
        "--questions", metavar="Q.jsonl", help='{"question_id", "image", "text"} per line'
    )
    batch.add_argument("--image-folder", metavar="DIR", help="root of the questions' image paths")
    batch.add_argument("--answers", metavar="A.jsonl", help="answers file to write")
    batch.add_argument(
        "--references", metavar="R.jsonl", help='{"question_id", "answer"|"answers"} per line'
    )
    batch.add_argument(
        "--metric",
        choices=("auto", "exact", "vqa", "pope"),
        help="scorer (default auto: pope for yes/no references, else vqa)",
    )
    batch.add_argument(
        "--batch-size", type=int, help=f"questions per generation batch (default {BATCH_SIZE})"
    )
    batch.add_argument(
        "--model-id", help="model_id written to the answers (default: checkpoint folder name)"
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="extra stop string (repeatable)"
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--template",
        choices=tuple(TEMPLATES),
        help="conversation template (default: the checkpoint's, else vicuna_v1)",
    )
    m.add_argument(
        "--image-aspect",
        choices=("square", "pad", "keep"),
        help="image preprocessing (default: the checkpoint's, else square)",
    )
    m.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)"
    )
    m.add_argument(
        "--mesh-tensor",
        type=int,
        default=0,
        metavar="N",
        help="shard over all devices with N-way tensor parallelism (default: one device)",
    )
    args = p.parse_args(argv)

    batch_mode = args.questions is not None
    batch_only = {
        "--answers": args.answers,
        "--references": args.references,
        "--image-folder": args.image_folder,
        "--metric": args.metric,
        "--batch-size": args.batch_size,
        "--model-id": args.model_id,
    }
    if batch_mode:
        if args.answers is None:
            p.error("--questions needs --answers A.jsonl")
        if args.image is not None or args.prompt is not None:
            p.error("give either --questions or --image/--prompt, not both")
        if args.json:
            p.error("--json prints one answer (--prompt); --questions writes --answers")
        if Path(args.answers).resolve() == Path(args.questions).resolve():
            p.error("--answers names the --questions file; write the answers elsewhere")
        if Path(args.answers).is_dir():
            p.error(f"--answers {args.answers}: a folder; name the A.jsonl file to write")
    elif args.prompt is None:
        p.error("give --prompt TEXT (with --image IMG) or --questions Q.jsonl --answers A.jsonl")
    else:
        given = [flag for flag, value in batch_only.items() if value is not None]
        if given:
            p.error(f"{', '.join(given)} go with --questions (a question file), not --prompt")
        if not args.prompt.strip():
            p.error("--prompt is empty")
    args.metric = args.metric or "auto"
    args.batch_size = BATCH_SIZE if args.batch_size is None else args.batch_size
    checks = (
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.temperature >= 0, f"--temperature must be >= 0 (0: greedy), got {args.temperature}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.top_k >= 0, f"--top-k must be >= 0 (0: off), got {args.top_k}"),
        (
            args.repetition_penalty > 0,
            f"--repetition-penalty must be > 0, got {args.repetition_penalty}",
        ),
        (args.mesh_tensor >= 0, f"--mesh-tensor must be >= 0, got {args.mesh_tensor}"),
    )
    for ok, message in checks:  # NaN fails every comparison, so it is refused too
        if not ok:
            p.error(message)
    return args


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a JSON list is accepted too); errors name the line."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (JSON lines expected)") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i}: not JSON ({e.msg})") from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "question_id" not in row:
            raise ValueError(f"{path} record {i}: expected an object with 'question_id' ({what})")
    return rows


def default_model_id(checkpoint: str) -> str:
    """The folder's name; for a step folder (`run/checkpoints/2000`), `run-2000`."""
    from neva_jax.convert.checkpoint import CHECKPOINT_DIR

    path = Path(checkpoint).absolute()
    if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def check_questions(questions: list[dict[str, Any]], path: str, image_folder: str | None) -> None:
    """Everything about a question file that can fail, checked before the model loads:
    ids (a string or a number, each once), a non-empty "text", and images that exist
    inside the image folder."""
    from neva_jax.data import image as image_lib

    seen = set()
    for i, q in enumerate(questions, start=1):
        qid = q["question_id"]
        if not isinstance(qid, str | int) or isinstance(qid, bool):
            raise ValueError(f"{path} record {i}: question_id {qid!r} is not a string or number")
        if qid in seen:
            raise ValueError(f"{path} record {i}: question_id {qid!r} appears twice")
        seen.add(qid)
        text = q.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path} record {i}: no question ('text' is {text!r})")
        if q.get("image"):
            full = image_lib.resolve_image_path(image_folder, q["image"])
            if not Path(full).is_file():
                raise FileNotFoundError(f"{path} record {i}: image {full} not found")


# JAX, the model and transformers are imported inside the functions below so that
# --help and argument errors answer at once.


def _sampling(args: argparse.Namespace) -> Any:
    from neva_jax.eval.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _load(args: argparse.Namespace) -> Any:
    import jax

    from neva_jax.eval.generate import Generator
    from neva_jax.sharding import make_mesh

    mesh = make_mesh(tensor=args.mesh_tensor) if args.mesh_tensor else None
    runtime = {"dtype": args.dtype} if args.dtype else {}
    gen = Generator.load(
        args.checkpoint,
        mesh=mesh,
        template=args.template,
        image_aspect=args.image_aspect,
        **runtime,
    )
    print(
        f"loaded {args.checkpoint} on {len(jax.devices()) if mesh else 1} device(s), "
        f"template {gen.template.name}",
        file=sys.stderr,
    )
    return gen


def run_one(args: argparse.Namespace) -> None:
    """Answers --prompt about --image and prints it."""
    sampling = _sampling(args)  # validates before the (slow) load
    gen = _load(args)
    [c] = gen.generate(
        [args.prompt],
        [args.image],
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop=args.stop,
    )
    if args.json:
        print(json.dumps({"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs}))
    else:
        print(c.text)


def run_batch(args: argparse.Namespace) -> dict[str, float] | None:
    """Answers a question file into --answers; returns (and prints) the score if known."""
    from neva_jax.eval.evaluate import score_answers

    sampling = _sampling(args)
    questions = read_jsonl(args.questions, "a question")
    if not questions:
        raise ValueError(f"{args.questions}: no questions")
    if any(q.get("image") for q in questions) and not args.image_folder:
        raise ValueError(f"{args.questions}: questions name images; pass --image-folder DIR")
    check_questions(questions, args.questions, args.image_folder)
    source = read_jsonl(args.references, "a reference") if args.references else questions
    references = {r["question_id"]: r for r in source if "answer" in r or "answers" in r}
    if args.references:
        if not references:
            raise ValueError(f"{args.references}: no record has 'answer' or 'answers'")
        asked = {q["question_id"] for q in questions}
        unknown = [qid for qid in references if qid not in asked]
        if unknown:
            raise ValueError(
                f"{args.references}: {len(unknown)} references are for questions that "
                f"{args.questions} does not ask, e.g. {unknown[0]!r}"
            )
    gen = _load(args)
    start = time.time()
    completions = gen.answer_questions(
        questions,
        args.image_folder,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop=args.stop,
    )
    model_id = args.model_id or default_model_id(args.checkpoint)
    out = Path(args.answers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for q, c in zip(questions, completions, strict=True):
            record = {
                "question_id": q["question_id"],
                "prompt": str(q.get("text", "")),
                "text": c.text,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
            }
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(questions)} answers to {out} ({time.time() - start:.1f}s)", file=sys.stderr)
    if not references:
        return None
    predictions = {q["question_id"]: c.text for q, c in zip(questions, completions, strict=True)}
    score = score_answers(predictions, references, args.metric)
    print(json.dumps(score))
    return score


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        if args.questions is not None:
            run_batch(args)
        else:
            run_one(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
