"""Load: 64 requests from 16 concurrent clients on loopback, twice.

All answered, none lost or duplicated, each equal to the same request served
alone; no compilation after warm-up; memory flat across the two rounds (the same
device arrays alive, the process's resident memory within a small margin).
"""

from __future__ import annotations

import concurrent.futures

import httpx
import jax
import pytest

CLIENTS, REQUESTS = 16, 64
RSS_MARGIN = 64 * 2**20  # bytes the process may grow by between the rounds


@pytest.fixture(scope="module")
def server(make_server):
    return make_server("--max-queue", "64")


@pytest.fixture(scope="module")
def jobs(image_uri):
    """64 different requests: text or image, 2-20 tokens, some streamed."""
    out = []
    for i in range(REQUESTS):
        content = [{"type": "text", "text": f"Question {i}: what is shown?"}]
        if i % 3 == 0:
            uri = image_uri(color=(40 * (i % 6), 255 - 3 * i, 100), size=(32 + i, 32))
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        out.append({"content": content, "max_tokens": 2 + i % 19, "stream": i % 2 == 1})
    return out


def run(client, job):
    """One request -> (text, completion tokens, finish reason, response id)."""
    messages = [{"role": "user", "content": job["content"]}]
    kw = dict(model="m", messages=messages, max_tokens=job["max_tokens"], temperature=0)
    if not job["stream"]:
        r = client.chat.completions.create(**kw)
        return (r.choices[0].message.content, r.usage.completion_tokens,
                r.choices[0].finish_reason, r.id)  # fmt: skip
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reason = next(
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    )
    return text, chunks[-1].usage.completion_tokens, reason, chunks[0].id


def served_requests(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("neva_requests_total{"))  # fmt: skip


def rss(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("process_resident_memory_bytes")))  # fmt: skip


def live_arrays() -> tuple[int, int]:
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)


def test_64_requests_from_16_clients_twice(server, jobs):
    client = server.client(timeout=300)
    sequential = [run(client, job) for job in jobs]
    assert len({s[0] for s in sequential}) > 32  # the answers differ
    memory = []
    for _ in range(2):
        before = served_requests(server)
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda job: run(client, job), jobs))
        assert served_requests(server) - before == REQUESTS  # none lost, none extra
        assert len({r[3] for r in results}) == REQUESTS  # one answer per request
        assert [r[:3] for r in results] == [s[:3] for s in sequential]
        assert server.engine.active == 0 and server.engine.queue_length == 0
        memory.append((live_arrays(), rss(server)))
    assert server.engine.compilations_after_warmup() == 0
    (arrays1, rss1), (arrays2, rss2) = memory
    assert arrays2 == arrays1, "device arrays piled up between the rounds"
    assert rss2 - rss1 < RSS_MARGIN, f"resident memory grew by {(rss2 - rss1) / 2**20:.1f} MiB"
