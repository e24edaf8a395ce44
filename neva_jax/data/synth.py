"""The bundled synthetic dataset: coloured shapes, captions, questions, a tokenizer.

`python -m neva_jax.data synth --out DIR [--seed S] [--n-train N] [--n-eval M]`
writes (deterministic per seed, a few thousand images per second):

    DIR/images/train/000000.png ...   N training images (64x64 by default)
    DIR/images/eval/000000.png ...    M held-out images
    DIR/stage1.json, stage1_eval.json     captions, LLaVA format, for `plain`
    DIR/stage2.json, stage2_eval.json     4-turn Q&A (colour/shape/where/count)
    DIR/eval_questions.jsonl   {"question_id", "image", "text", "category"} per line
                               (LLaVA eval format; text has no <image>)
    DIR/eval_answers.jsonl     {"question_id", "answer", "category"} per line
    DIR/tokenizer/             BPE (PreTrainedTokenizerFast): <unk>=0 <s>=1 </s>=2
                               <pad>=3 <image>=4; AutoTokenizer adds BOS
    DIR/meta.json              seed, sizes, answer vocabularies, chance levels

Each image holds `count` copies of one shape in one colour inside one quadrant,
so every question has one single-word answer. Chance (uniform guess per type):
colour 1/8, shape 1/3, where 1/4, count 1/4; mean 0.240.
"""

from __future__ import annotations

import json
import os
import string
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from neva_jax.data.conversation import TEMPLATES

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle")
WHERE = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("one", "two", "three", "four")
CATEGORIES = ("colour", "shape", "where", "count")
QUESTIONS = {
    "colour": ("What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape is shown?", "Which shape do you see?"),
    "where": ("Where are the shapes?", "In which corner are the shapes?"),
    "count": ("How many shapes are there?", "How many shapes do you see?"),
}
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform guess per question type, and their mean."""
    per = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}
    per |= {"where": 1 / len(WHERE), "count": 1 / len(COUNTS)}
    return per | {"mean": float(np.mean(list(per.values())))}


def _scene(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "where": WHERE[rng.integers(len(WHERE))],
        "count": int(rng.integers(1, len(COUNTS) + 1)),
    }


def render(scene: dict[str, Any], size: int, rng: np.random.Generator) -> Image.Image:
    """Draws `count` shapes in distinct cells of a 2x2 grid inside the quadrant."""
    bg = 40 + int(rng.integers(-8, 9))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    q = WHERE.index(scene["where"])
    half, cell = size // 2, size // 4
    qy, qx = (q // 2) * half, (q % 2) * half
    colour = COLOURS[scene["colour"]]
    cells = rng.permutation(4)[: scene["count"]]
    for c in cells:
        extent = cell * (0.62 + 0.14 * rng.random())
        cy = qy + (c // 2) * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        cx = qx + (c % 2) * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
        r = extent / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if scene["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif scene["shape"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def answers(scene: dict[str, Any]) -> dict[str, str]:
    """Single-word reference answer per category."""
    return {
        "colour": scene["colour"],
        "shape": scene["shape"],
        "where": scene["where"],
        "count": COUNTS[scene["count"] - 1],
    }


def caption(scene: dict[str, Any]) -> str:
    noun = scene["shape"] + ("s" if scene["count"] > 1 else "")
    return f"{COUNTS[scene['count'] - 1]} {scene['colour']} {noun} at the {scene['where']}"


def _records(
    split: str, n: int, size: int, rng: np.random.Generator, out: str
) -> Iterator[tuple[dict, dict, dict[str, Any]]]:
    folder = os.path.join(out, "images", split)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        scene = _scene(rng)
        name = f"{split}/{i:06d}.png"
        render(scene, size, rng).save(os.path.join(out, "images", name), optimize=False)
        ans = answers(scene)
        sid = f"{split}_{i:06d}"
        prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
        stage1 = {
            "id": sid,
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"},
                {"from": "gpt", "value": caption(scene)},
            ],
        }
        turns = []
        for j, cat in enumerate(rng.permutation(CATEGORIES)):
            q = QUESTIONS[cat][rng.integers(2)]
            turns.append({"from": "human", "value": f"<image>\n{q}" if j == 0 else q})
            turns.append({"from": "gpt", "value": ans[cat]})
        stage2 = {"id": sid, "image": name, "conversations": turns}
        yield stage1, stage2, {"name": name, "scene": scene, "answers": ans}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def tokenizer_corpus() -> list[str]:
    """Every text the demo renders: answers, questions, captions, template strings."""
    lines = [
        caption({"colour": c, "shape": s, "where": w, "count": k})
        for c in COLOURS
        for s in SHAPES
        for w in WHERE
        for k in range(1, len(COUNTS) + 1)
    ]
    questions = [q for qs in QUESTIONS.values() for q in qs] + list(CAPTION_PROMPTS)
    lines += (questions + ["\n" + q for q in questions]) * 20
    for t in TEMPLATES.values():  # weighted so that their words become single tokens
        lines += [t.system, t.first_user, t.user, t.assistant] * 40
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 512, corpus: list[str] | None = None) -> None:
    """Trains a small BPE (Metaspace, newline kept apart) and saves a HF tokenizer folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus or tokenizer_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    save_tokenizer(tok, out_dir)


def save_tokenizer(tok: Any, out_dir: str) -> None:
    """Saves a `tokenizers.Tokenizer` as a HF tokenizer folder with LLaMA's special
    tokens (`<s>`, `</s>`, `<unk>`, `<pad>`) and `<image>`."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    ).save_pretrained(out_dir)


def generate(
    out: str, *, seed: int = 0, n_train: int = 8000, n_eval: int = 200, image_size: int = 64
) -> dict[str, Any]:
    """Writes the dataset under `out` (see the module docstring); returns meta.json's dict."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"synth: --n-train ({n_train}) and --n-eval ({n_eval}) must be >= 1")
    if image_size < 16:
        raise ValueError(f"synth: --image-size={image_size} must be >= 16")
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    for split, n, sub_seed in (("train", n_train, 0), ("eval", n_eval, 1)):
        rng = np.random.default_rng([seed, sub_seed])
        s1, s2, questions, refs = [], [], [], []
        for stage1, stage2, info in _records(split, n, image_size, rng, out):
            s1.append(stage1)
            s2.append(stage2)
            if split == "eval":
                for cat in CATEGORIES:
                    qid = f"{stage1['id']}_{cat}"
                    text = QUESTIONS[cat][rng.integers(2)]
                    questions.append(
                        {"question_id": qid, "image": info["name"], "text": text, "category": cat}
                    )
                    refs.append(
                        {"question_id": qid, "answer": info["answers"][cat], "category": cat}
                    )
        suffix = "" if split == "train" else "_eval"
        _write_json(os.path.join(out, f"stage1{suffix}.json"), s1)
        _write_json(os.path.join(out, f"stage2{suffix}.json"), s2)
        if split == "eval":
            _write_jsonl(os.path.join(out, "eval_questions.jsonl"), questions)
            _write_jsonl(os.path.join(out, "eval_answers.jsonl"), refs)
    build_tokenizer(os.path.join(out, "tokenizer"))
    meta = {
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "image_size": image_size,
        "image_folder": "images",
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "where": list(WHERE),
        "counts": list(COUNTS),
        "categories": list(CATEGORIES),
        "chance": chance_levels(),
    }
    _write_json(os.path.join(out, "meta.json"), meta)
    return meta | {"seconds": time.perf_counter() - t0}
