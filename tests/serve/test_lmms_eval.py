"""lmms-eval scores the server through its own OpenAI route, offline, on a local task.

The task (four coloured images with a question each) is written to a temporary
folder and loaded with lmms-eval's `TaskManager(include_path=...)`; the model is
lmms-eval's `openai_compatible` pointed at a live server. The answers lmms-eval
records must be the server's greedy answers, and its metric must be computed on them.
"""

from __future__ import annotations

import base64
import textwrap

import httpx
import pytest
from lmms_colours import COLOURS, QUESTION, write_task

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the test extra has it)")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_task")
    (root / "tiny_colours.yaml").write_text(
        write_task(root)
        + textwrap.dedent("""\
        task: tiny_colours
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 8
          temperature: 0
        process_results: !function colours_utils.process_results
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
