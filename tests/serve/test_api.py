"""The server through the official `openai` client: plain and streaming, text and image."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

QUESTION = "What colour are the shapes?"


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def image_message(uri: str, text: str = QUESTION) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": text},
        ],
    }


def test_models_and_health(server, client):
    [model] = client.models.list().data
    assert model.id == "tiny-llava" and client.models.retrieve("tiny-llava").id == "tiny-llava"
    other = httpx.get(server.url + "/v1/models/gpt-4")
    assert other.status_code == 404 and "this server has 'tiny-llava'" in other.text
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 16


def test_text_only_answer(generator, client):
    """(Token-for-token equality with `generate` and `transformers`: test_exactness.py.)"""
    r = client.chat.completions.create(
        model="tiny-llava",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.model == "tiny-llava" and r.id.startswith("chatcmpl-")
    _, ids = generator.prompt_ids(QUESTION, has_image=False)
    n = r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + n
    assert 0 < n <= 12 and len(r.choices[0].logprobs.content) == n
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert r.choices[0].message.content


def test_stream_with_image_adds_up_to_the_plain_answer(client, image_uri):
    uri = image_uri(color=(20, 160, 40))
    plain = client.chat.completions.create(
        model="m", messages=[image_message(uri)], max_tokens=16, temperature=0
    )
    text_only = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
    )
    assert plain.usage.prompt_tokens > text_only.usage.prompt_tokens + 16  # the image slots
    assert plain.choices[0].message.content != text_only.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[image_message(uri)],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # it streamed
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_multi_turn_history_uses_the_template(generator, client, image_uri):
    from neva_jax.data.conversation import Message
    from neva_jax.data.tokenize import encode_spans

    messages = [
        {"role": "system", "content": "Be brief."},
        image_message(image_uri()),
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
    ]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
    turns = [
        Message("user", f"<image>\n{QUESTION}"),
        Message("assistant", "Red."),
        Message("user", "And the shape?"),
    ]
    spans = generator.template.render(turns, system="Be brief.")
    enc = encode_spans(spans, generator.tokenizer, generator.model.config.num_image_tokens)
    assert enc.text.startswith("Be brief. USER: <image>\n")
    assert "ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:" in enc.text
    assert r.usage.prompt_tokens == len(enc.ids)


def test_stop_string_cuts_text_and_frees_the_slot(server, client):
    stops_before = finish_count(server, "stop")
    cancels_before = finish_count(server, "cancelled")
    base = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    text = base.choices[0].message.content
    at = len(text) // 2
    stop = text[at : at + 3]
    assert len(text) > 8 and text.find(stop) == at
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
        stop=["never-generated", stop],
    )
    assert r.choices[0].message.content == text[:at].strip()
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < base.usage.completion_tokens
    assert httpx.get(server.url + "/health").json()["active"] == 0
    # Counted as a stop, as the client was told, not as a client that left.
    assert finish_count(server, "cancelled") == cancels_before
    assert finish_count(server, "stop") >= stops_before + 1


def test_logprobs(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy picks the most likely
        np.testing.assert_allclose(e.top_logprobs[0].logprob, e.logprob, atol=1e-6)


def test_seeded_sampling_repeats(client):
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return r.choices[0].message.content

    assert ask(7) == ask(7)
    assert len({ask(7), ask(8), ask(9)}) > 1
    assert ask(-3) == ask(-3)  # any integer seed


def test_metrics(server, client):
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['neva_requests_total{finish_reason="length"}'] >= 1
    assert values["neva_generation_tokens_total"] >= 3
    assert values["neva_prompt_tokens_total"] > 0
    assert values["neva_time_to_first_token_seconds_count"] >= 1
    assert values["neva_request_latency_seconds_count"] >= 1
    assert values["neva_slots_total"] == 16 and values["neva_queue_length"] == 0
    assert values["neva_compilations_after_warmup"] == 0
    assert values["process_resident_memory_bytes"] > 0


def finish_count(server, reason: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'neva_requests_total{{finish_reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cancelled_count(server) -> float:
    return finish_count(server, "cancelled")


def test_a_client_that_leaves_frees_its_request(server):
    """Streaming and plain: the client hangs up while its request waits; it is dropped."""
    import socket

    engine = server.engine
    before = cancelled_count(server)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40}
    engine.pause()
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json={**body, "stream": True}) as resp:  # fmt: skip
            first = next(resp.iter_lines())
            assert first.startswith("data: ") and '"role":"assistant"' in first
            streamed = engine.pending[-1]
        assert streamed.cancel_event.wait(30)  # the server saw the client leave
        raw = httpx.Request("POST", server.url + "/v1/chat/completions", json=body)
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(raw.content)}\r\n\r\n"
            sock.sendall(head.encode() + raw.content)
            with engine.cond:
                assert engine.cond.wait_for(lambda: engine.queue_length == 2, timeout=30)
            plain = engine.pending[-1]
        assert plain.cancel_event.wait(30)
    finally:
        engine.resume()
    with engine.cond:
        assert engine.cond.wait_for(lambda: engine.queue_length == 0 and engine.active == 0, 30)
    assert cancelled_count(server) == before + 2
    assert httpx.get(server.url + "/health").json()["active"] == 0
