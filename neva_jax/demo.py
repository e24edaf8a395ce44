"""`make demo`: a tiny NeVA learns to answer questions about images, end to end, on a CPU.

    python -m neva_jax.demo [--out runs/demo] [--n-train 8000] [--n-eval 200]
        [--stage1-steps N] [--stage2-steps N] [--lora] [--resume]

Runs the user-facing commands one after the other, as a new user would:

1. `python -m neva_jax.data synth --out OUT/data`: coloured shapes on 64x64 images,
   captions (stage 1), four-question conversations (stage 2) and held-out questions
   of four types (colour, shape, where, count) about images never trained on.
2. `python -m neva_jax.main --config configs/demo.py:stage1 --workdir OUT/stage1`:
   feature alignment, only the projector learns.
3. `python -m neva_jax.main --config configs/demo.py:stage2 --workdir OUT/stage2
   --config.init_from=OUT/stage1`: projector + decoder learn the conversations
   (`--lora`: `configs/demo.py:lora`, the decoder frozen with LoRA adapters, both
   stages with `init_std=0.1`: see configs/demo.py).
4. Greedy answers to every held-out question, scored per question type (exact match),
   three times with the same model: with the right image; with the image blanked
   (all-zero pixels, so only the text is left); and with another image's picture.
   Against chance, the three show that the answers come through the vision path.
5. `python -m neva_jax.generate --checkpoint OUT/stage2 --image IMG --prompt TEXT` on
   one held-out image.

It prints a summary table and writes `OUT/loss_curves.png` (both stages),
`OUT/summary.json` and the answers in LLaVA's answer format under `OUT/eval/`. A fresh run
replaces OUT; `--resume` keeps it and continues where the training stopped.
"""

from __future__ import annotations

if __name__ == "__main__":  # a caching allocator, before JAX starts (neva_jax/allocator.py)
    from neva_jax import allocator

    allocator.ensure()

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.py"
EXAMPLE_QUESTION = "How many shapes are there?"
LORA_INIT_STD = 0.1  # --lora: a decoder whose frozen LM head can give confident logits
# absl's line prefix ("I1128 14:41:05.182282 1398... loop.py:230] "): dropped when echoed.
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")


def _default_config() -> str:
    """configs/demo.py, relative when run from the repository root (shorter commands)."""
    rel = Path("configs") / "demo.py"
    return str(rel) if rel.resolve() == DEFAULT_CONFIG else str(DEFAULT_CONFIG)


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    p = argparse.ArgumentParser(
        prog="python -m neva_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--config", default=_default_config(), help="experiment file")
    p.add_argument("--n-train", type=int, default=8000, help="training images")
    p.add_argument("--n-eval", type=int, default=200, help="held-out images (4 questions each)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--stage1-steps", type=int, help="override train.steps of stage 1")
    p.add_argument("--stage2-steps", type=int, help="override train.steps of stage 2")
    p.add_argument(
        "--lora",
        action="store_true",
        help="stage 2 with LoRA adapters on the frozen decoder (configs/demo.py:lora)",
    )
    p.add_argument("--resume", action="store_true", help="keep OUT and continue, do not restart")
    args = p.parse_args(argv)
    for flag in ("n_train", "n_eval", "stage1_steps", "stage2_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return args


# ------------------------------------------------------------------------------ steps


def run_command(cmd: Sequence[str], log_path: Path) -> tuple[float, str]:
    """Runs `cmd`, echoing its output (absl prefixes dropped) and saving it to `log_path`.

    Returns (seconds, stdout+stderr). Raises DemoError on a non-zero exit status.
    """
    print("$ " + " ".join(_shell_word(_short(c)) for c in cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    lines: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            print("  " + _ABSL_PREFIX.sub("", line.rstrip("\n")), flush=True)
        status = proc.wait()
    seconds = time.time() - start
    if status != 0:
        name = cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else cmd[0]
        raise DemoError(f"{name} exited with status {status}; full output in {log_path}")
    return seconds, "".join(lines)


def _short(word: str) -> str:
    """The interpreter's path relative to the working directory when that is shorter."""
    if word == sys.executable:
        rel = os.path.relpath(word)
        return rel if len(rel) < len(word) else word
    return word


def _shell_word(word: str) -> str:
    return f"'{word}'" if any(c in word for c in " ?*&;") else word


def make_data(out: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any], float]:
    """Writes the synthetic dataset (or reuses one made with the same settings)."""
    data = out / "data"
    meta_path = data / "meta.json"
    want = {"seed": args.seed, "n_train": args.n_train, "n_eval": args.n_eval}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            print(f"dataset: reusing {data}")
            return data, meta, 0.0
    cmd = [sys.executable, "-m", "neva_jax.data", "synth", "--out", str(data)]
    cmd += ["--seed", str(args.seed), "--n-train", str(args.n_train), "--n-eval", str(args.n_eval)]
    seconds, _ = run_command(cmd, out / "logs" / "data.log")
    return data, json.loads(meta_path.read_text()), seconds


def train_stage(
    stage: str,
    out: Path,
    data: Path,
    config: str,
    steps: int | None,
    init_from: Path | None,
    variant: str | None = None,
    config_args: str = "",
) -> dict[str, Any]:
    """Trains one stage (config variant `variant`, default the stage's name, plus the
    config file's `config_args`) through `python -m neva_jax.main` into OUT/<stage>;
    returns its figures."""
    workdir = out / stage
    arg = f"{variant or stage},data_dir={data}{config_args}"
    cmd = [sys.executable, "-m", "neva_jax.main", f"--config={config}:{arg}"]
    cmd += [f"--workdir={workdir}"]
    if init_from is not None:
        cmd.append(f"--config.init_from={init_from}")
    if steps is not None:
        cmd.append(f"--config.train.steps={steps}")
    seconds, _ = run_command(cmd, out / "logs" / f"{stage}.log")
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    if not train_rows:
        raise DemoError(f"{workdir}/metrics.jsonl has no training lines")
    return {
        "workdir": str(workdir),
        "steps": int(train_rows[-1]["step"]),
        "seconds": seconds,
        "final_loss": float(train_rows[-1]["loss"]),
        "heldout_loss": float(eval_rows[-1]["eval/loss"]) if eval_rows else None,
        "heldout_token_accuracy": float(eval_rows[-1]["eval/accuracy"]) if eval_rows else None,
    }


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The lines of `workdir/metrics.jsonl`."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_heldout(workdir: Path, data: Path, out: Path) -> dict[str, dict[str, float]]:
    """Greedy answers to the held-out questions, three times with the same model.

    "image": with each question's own image; "blank": with an all-black image (no
    information: what the model answers from the text alone); "other": with the next
    image's picture (the answers should follow the picture, so this lands at chance).
    Writes `out/answers.jsonl`, `answers_blank.jsonl`, `answers_other.jsonl` (LLaVA's
    answer format) and returns {name: score}, scores from `score_answers` (exact
    match; per question type under `accuracy/<type>`).
    """
    from PIL import Image

    from neva_jax.eval.evaluate import score_answers
    from neva_jax.eval.generate import Generator

    questions = _read_jsonl(data / "eval_questions.jsonl")
    refs = {r["question_id"]: r for r in _read_jsonl(data / "eval_answers.jsonl")}
    gen = Generator.load(str(workdir))
    size = gen.model.config.vision.image_size
    blank = gen.preprocess(Image.new("RGB", (size, size)))  # all-zero pixels: black
    names = [q["image"] for q in questions]
    distinct = list(dict.fromkeys(names))
    other = {name: distinct[(i + 1) % len(distinct)] for i, name in enumerate(distinct)}
    inputs = {
        "image": [data / "images" / n for n in names],
        "blank": [blank] * len(names),
        "other": [data / "images" / other[n] for n in names],
    }
    out.mkdir(parents=True, exist_ok=True)
    scores = {}
    batch = 100
    for name, images in inputs.items():
        answers = []
        for i in range(0, len(questions), batch):
            chunk = questions[i : i + batch]
            answers += gen.generate(
                [q["text"] for q in chunk], images[i : i + batch], max_new_tokens=8
            )
        preds = {q["question_id"]: a.text for q, a in zip(questions, answers, strict=True)}
        path = out / ("answers.jsonl" if name == "image" else f"answers_{name}.jsonl")
        with open(path, "w") as f:
            for q in questions:  # LLaVA's answer format, as `generate --answers` writes it
                row = {"question_id": q["question_id"], "prompt": q["text"]}
                row |= {"text": preds[q["question_id"]], "answer_id": uuid.uuid4().hex}
                row |= {"model_id": workdir.name, "metadata": {"category": q["category"]}}
                f.write(json.dumps(row) + "\n")
        scores[name] = score_answers(preds, refs, "exact")
    return scores


def answer_one(workdir: Path, data: Path, out: Path) -> dict[str, str]:
    """Asks one held-out image a question through `python -m neva_jax.generate`."""
    questions = _read_jsonl(data / "eval_questions.jsonl")
    refs = {r["question_id"]: r for r in _read_jsonl(data / "eval_answers.jsonl")}
    q = next((q for q in questions if q["text"] == EXAMPLE_QUESTION), questions[0])
    image = data / "images" / q["image"]
    cmd = [sys.executable, "-m", "neva_jax.generate", "--checkpoint", str(workdir)]
    cmd += ["--image", str(image), "--prompt", q["text"], "--max-new-tokens", "8", "--json"]
    _, output = run_command(cmd, out / "logs" / "generate.log")
    objects = [ln for ln in output.splitlines() if ln.startswith("{")]
    if not objects:
        raise DemoError(f"neva_jax.generate printed no answer; see {out / 'logs' / 'generate.log'}")
    return {
        "image": str(image),
        "question": q["text"],
        "answer": json.loads(objects[-1])["text"],
        "reference": str(refs[q["question_id"]]["answer"]),
    }


# ------------------------------------------------------------------------------ report


def plot_losses(stage1: Path, stage2: Path, path: Path) -> Path:
    """Loss curves of both stages on one step axis (stage 2 continues after stage 1).

    Drawn on a bare `Figure` (rendered by Agg), so no pyplot backend is touched.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    offset = 0
    stages = (
        ("stage 1", "captions", stage1, "tab:blue"),
        ("stage 2", "answers", stage2, "tab:red"),
    )
    for name, trained, workdir, colour in stages:
        rows = read_metrics(workdir)
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval/loss" in r]
        x = [offset + r["step"] for r in train]
        ax_loss.plot(x, [r["loss"] for r in train], color=colour, label=f"{name} train ({trained})")
        ax_acc.plot(x, [r["accuracy"] for r in train], color=colour, label=f"{name} train")
        if evals:
            ex = [offset + r["step"] for r in evals]
            for ax, key in ((ax_loss, "eval/loss"), (ax_acc, "eval/accuracy")):
                ys = [r[key] for r in evals]
                ax.plot(ex, ys, "o--", color=colour, alpha=0.7, label=f"{name} held-out")
        if name == "stage 1" and train:
            offset = train[-1]["step"]
    for ax in (ax_loss, ax_acc):
        if offset:
            ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step (stage 2 continues after stage 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("cross-entropy on trained tokens")
    ax_loss.set_title("loss")
    ax_acc.set_ylabel("next-token accuracy on trained tokens")
    ax_acc.set_title("token accuracy (teacher forced)")
    fig.suptitle("neva-jax demo: stage 1 (projector) then stage 2 (projector + decoder)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(s: dict[str, Any]) -> str:
    """The summary table printed at the end of the demo."""
    out = [
        "",
        "=" * 72,
        "neva-jax demo: summary",
        "=" * 72,
        f"{'stage':<10}{'steps':>7}{'time':>9}{'train loss':>13}{'held-out loss':>16}",
    ]
    for name in ("stage1", "stage2"):
        st = s[name]
        out.append(
            f"{name:<10}{st['steps']:>7}{st['seconds']:>8.0f}s{_fmt(st['final_loss'], '.4f'):>13}"
            f"{_fmt(st['heldout_loss'], '.4f'):>16}"
        )
    if s.get("lora"):
        out.append(
            "stage2: LoRA (configs/demo.py:lora), the decoder frozen, adapters + projector trained"
        )
    n = s["heldout"]["image"]["count"]
    images = n // len(s["categories"])
    out += [
        "",
        f"held-out accuracy: {n} questions about {images} unseen images, greedy answers",
        f"{'type':<10}{'with image':>12}{'image blanked':>15}{'other image':>13}{'chance':>9}",
    ]
    chance, h = s["chance"], s["heldout"]
    rows = [(cat, f"accuracy/{cat}", chance[cat]) for cat in s["categories"]]
    for label, key, c in [*rows, ("all", "accuracy", chance["mean"])]:
        out.append(
            f"{label:<10}{h['image'][key]:>12.3f}{h['blank'][key]:>15.3f}"
            f"{h['other'][key]:>13.3f}{c:>9.3f}"
        )
    one = s["example"]
    out += [
        "",
        f"one held-out image ({one['image']}):",
        f"  Q: {one['question']}  A: {one['answer']}  (reference: {one['reference']})",
        "",
        "outputs:",
        f"  {s['stage1']['workdir']}, {s['stage2']['workdir']}: Orbax checkpoints, "
        "metrics.jsonl, TensorBoard",
        f"  {s['plot']}: loss curves of both stages",
        f"  {s['eval_dir']}: answers.jsonl, answers_blank.jsonl, answers_other.jsonl",
        f"  {s['summary_path']}: these figures; {s['logs']}: every command's output",
        f"total wall time: {s['total_seconds'] / 60:.1f} min",
        "=" * 72,
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit status."""
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out)
    if not Path(args.config).is_file():
        message = f"error: --config {args.config}: no such file (run from the repository root)"
        print(message, file=sys.stderr)
        return 2
    if out.exists() and not args.resume:
        for stage in ("stage1", "stage2", "eval", "logs"):
            shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        data, meta, data_seconds = make_data(out, args)
        extra = f",init_std={LORA_INIT_STD}" if args.lora else ""
        stage1 = train_stage("stage1", out, data, args.config, args.stage1_steps, None, None, extra)
        stage2 = train_stage(
            "stage2",
            out,
            data,
            args.config,
            args.stage2_steps,
            out / "stage1",
            "lora" if args.lora else None,
            extra,
        )
        print("answering the held-out questions: right image, blanked, other image", flush=True)
        t0 = time.time()
        heldout = evaluate_heldout(out / "stage2", data, out / "eval")
        eval_seconds = time.time() - t0
        example = answer_one(out / "stage2", data, out)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    plot = plot_losses(out / "stage1", out / "stage2", out / "loss_curves.png")
    summary = {
        "lora": args.lora,
        "data_seconds": data_seconds,
        "stage1": stage1,
        "stage2": stage2,
        "heldout": heldout,
        "eval_seconds": eval_seconds,
        "chance": meta["chance"],
        "categories": meta["categories"],
        "example": example,
        "plot": str(plot),
        "eval_dir": str(out / "eval"),
        "summary_path": str(out / "summary.json"),
        "logs": str(out / "logs"),
        "total_seconds": time.time() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
