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
        default="auto",
        choices=("auto", "exact", "vqa", "pope"),
        help="scorer (default auto: pope for yes/no references, else vqa)",
    )
    batch.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
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
        "--template", help="conversation template (default: the checkpoint's, else vicuna_v1)"
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
    if batch_mode:
        if args.answers is None:
            p.error("--questions needs --answers A.jsonl")
        if args.image is not None or args.prompt is not None:
            p.error("give either --questions or --image/--prompt, not both")
    elif args.prompt is None:
        p.error("give --prompt TEXT (with --image IMG) or --questions Q.jsonl --answers A.jsonl")
    elif args.answers is not None or args.references is not None:
        p.error("--answers/--references go with --questions")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a JSON list is accepted too); errors name the line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
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
    source = read_jsonl(args.references, "a reference") if args.references else questions
    references = {r["question_id"]: r for r in source if "answer" in r or "answers" in r}
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
    model_id = args.model_id or Path(args.checkpoint).absolute().name
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
