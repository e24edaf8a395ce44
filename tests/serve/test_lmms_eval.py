"""lmms-eval scores the server through its own OpenAI route, offline, on a local task.

The task (four coloured images with a question each) is written to a temporary
folder and loaded with lmms-eval's `TaskManager(include_path=...)`; the model is
lmms-eval's `openai_compatible` pointed at a live server. The answers lmms-eval
records must be the server's greedy answers, and its metric must be computed on them.
"""

from __future__ import annotations

import base64
import json
import textwrap

import httpx
import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the test extra has it)")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220), "white": (250,) * 3}
QUESTION = "What colour is the image? Answer with one word."

UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms_task")
    with open(root / "data.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(COLOURS.items()):
            Image.new("RGB", (48, 40), rgb).save(root / f"{name}.png")
            row = {
                "question_id": i,
                "image": str(root / f"{name}.png"),
                "question": QUESTION,
                "answer": name,
            }
            f.write(json.dumps(row) + "\n")
    (root / "tiny_colours_utils.py").write_text(UTILS)
    (root / "tiny_colours.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_colours
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "data.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function tiny_colours_utils.doc_to_visual
        doc_to_text: !function tiny_colours_utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 8
          temperature: 0
        process_results: !function tiny_colours_utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    )
    return root


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


def test_lmms_eval_openai_route_scores_the_server(server, task_dir, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(task_dir)  # lmms-eval writes its caches and logs under the cwd
    before = httpx.get(server.url + "/metrics").text.count("\n")
    results = simple_evaluate(
        model="openai_compatible",
        model_args=f"model_version=tiny-llava,base_url={server.url}/v1,api_key=none,"
        "num_concurrent=4,max_retries=1,timeout=120",
        tasks=["tiny_colours"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=1,
        log_samples=True,
        verbosity="WARNING",
    )
    client = server.client()
    want = []  # the server's own answers to the same questions (PNG, as lmms-eval sends)
    for name in COLOURS:
        data = base64.b64encode((task_dir / f"{name}.png").read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
                   {"type": "text", "text": QUESTION}]  # fmt: skip
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
        )
        want.append(r.choices[0].message.content)
    samples = sorted(results["samples"]["tiny_colours"], key=lambda s: s["doc_id"])
    got = [s["filtered_resps"][0] for s in samples]
    got = [g if isinstance(g, str) else g[0] for g in got]
    assert got == want
    score = results["results"]["tiny_colours"]["exact_match,none"]
    assert score == sum(w.strip().lower() == n for w, n in zip(want, COLOURS, strict=True)) / 4
    metrics = httpx.get(server.url + "/metrics").text
    assert before > 0 and "neva_requests_total{finish_reason=" in metrics
