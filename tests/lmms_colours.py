"""A four-image colour task in lmms-eval's format, written offline: the data of the
lmms-eval tests of the server (tests/serve/test_lmms_eval.py) and of the in-process
model class (tests/eval/test_lmms.py). Importable as `lmms_colours`: pyproject's
pytest `pythonpath` holds tests/."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220), "white": (250,) * 3}
QUESTION = "What colour is the image? Answer with one word."

UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return ["red", "green", "blue", "white"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


def write_task(root: Path) -> str:
    """Writes the images, data.jsonl and colours_utils.py under `root`; returns the YAML
    lines every task on them shares (data, visual, text)."""
    from PIL import Image

    with open(root / "data.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(COLOURS.items()):
            Image.new("RGB", (48, 40), rgb).save(root / f"{name}.png")
            row = {"question_id": i, "image": str(root / f"{name}.png"), "question": QUESTION,
                   "answer": name, "label": i}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    (root / "colours_utils.py").write_text(UTILS)
    return textwrap.dedent(f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "data.jsonl"}
        test_split: test
        doc_to_visual: !function colours_utils.doc_to_visual
        doc_to_text: !function colours_utils.doc_to_text
        """)
