"""Every bad request gets a 4xx JSON error naming the problem, and the server keeps serving.

Raw HTTP (httpx) so the exact status and body are seen; each case is followed by a
good request that must succeed.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (10, 20, 200)).save(root / "blue.png")
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    return root


@pytest.fixture(scope="module")
def server(make_server, image_root):
    return make_server(
        "--api-key", KEY, "--image-root", str(image_root), "--max-image-pixels", "1000000",
        "--max-queue", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def open_server(make_server):
    """No key, no image root, remote images allowed."""
    return make_server("--allow-remote-images")


def post(server, body, headers=AUTH, **kw):
    return httpx.post(
        server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw
    )


def good(server):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def image_msg(url, n=1, text="what is it?"):
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(n)]
    return {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        "max_tokens": 2,
    }


def png(size=(40, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(size=(64, 64)):
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text):
    return {"messages": [{"role": "user", "content": text}]}


CASES = {
    "missing messages": ({"max_tokens": 3}, 400, "messages: field required"),
    "empty messages": ({"messages": []}, 400, "messages: must not be empty"),
    "two images, one allowed": (
        image_msg(data_uri(png()), n=2), 400, "has 2 images; this server takes at most 1"),
    "base64 not an image": (
        image_msg(data_uri(b"hello, not an image")), 400, "is not an image"),
    "not base64": (image_msg("data:image/png;base64,%%%notbase64"), 400, "not valid base64"),
    "truncated image": (image_msg(data_uri(noisy_png()[:6000])), 400, "the image is truncated"),
    "decompression bomb": (
        image_msg(data_uri(png((2000, 2000), mode="1"))), 400,
        "2000x2000 = 4000000 pixels, over the server's limit of 1000000 pixels"),
    "path outside the root": (image_msg("../outside/secret.png"), 400, "outside the image root"),
    "absolute path outside": (image_msg("/etc/passwd"), 400, "outside the image root"),
    "symlink leaving the root": (image_msg("link.png"), 400, "outside the image root"),
    "missing file": (image_msg("nope.png"), 400, "no image file 'nope.png'"),
    "remote URL not allowed": (
        image_msg("http://127.0.0.1:9/x.png"), 400, "remote image URLs are disabled"),
    "unsupported scheme": (image_msg("ftp://host/x.png"), 400, "unsupported URL scheme 'ftp'"),
    "prompt longer than the context": (
        {**user("word " * 200), "max_tokens": 4}, 400, "exceeds the context of 96 tokens"),
    "prompt fills the context": (user("word " * 200), 400, "fills the context of 96 tokens"),
    "max_tokens 0": ({**user("hi"), "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    "max_tokens negative": ({**user("hi"), "max_tokens": -5}, 400, "max_tokens must be at least 1"),
    "max_completion_tokens 0": (
        {**user("hi"), "max_completion_tokens": 0}, 400, "max_completion_tokens must be at least 1"),
    "temperature out of range": ({**user("hi"), "temperature": 3}, 400, "temperature:"),
    "n > 1": ({**user("hi"), "n": 2}, 400, "n must be 1"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    "last turn not the user's": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400, "the last message must be from the user"),
    "literal <image> in text": (user("look: <image>"), 400, "send images as image_url parts"),
    "image in an assistant turn": (
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": [
                          {"type": "image_url", "image_url": {"url": data_uri(png())}}]},
                      {"role": "user", "content": "b"}]},
        400, "only user messages may carry images"),
    "top_logprobs without logprobs": (
        {**user("hi"), "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    "unknown content part": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        400, "messages.0.content.0.type: 'input_audio' is not supported"),
    "image_url without url": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400, "messages.0.content.0.image_url: expected"),
    "max_tokens as a string": ({**user("hi"), "max_tokens": "5"}, 400, "max_tokens:"),
    "stream as a string": ({**user("hi"), "stream": "yes"}, 400, "stream:"),
    # used to pass validation and stop the engine loop for every later request
    "top_k over int32": ({**user("hi"), "top_k": 2**40}, 400, "top_k:"),
    "response_format json": (
        {**user("hi"), "response_format": {"type": "json_object"}}, 400,
        "response_format: structured output (JSON) is not supported"),
    "tools": ({**user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
              "tools: tool calling is not supported"),
    "logit_bias": ({**user("hi"), "logit_bias": {"5": 10}}, 400, "logit_bias: not supported"),
    "presence_penalty": ({**user("hi"), "presence_penalty": 0.5}, 400, "presence_penalty"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_and_the_server_goes_on(server, case):
    body, status, message = CASES[case]
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    good(server)


def test_malformed_json_and_oversized_body(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers=AUTH)
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    good(server)
    server.state.max_body_bytes = 1000
    try:
        r = post(server, image_msg(data_uri(noisy_png())))
        assert r.status_code == 413
        assert "over the limit of 1000" in r.json()["error"]["message"]
    finally:
        server.state.max_body_bytes = 32 * 1024 * 1024
    good(server)


def test_image_under_the_root_is_served(server):
    for url in ("blue.png", f"file://{server.args.image_root}/blue.png"):
        r = post(server, image_msg(url))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 16  # the image slots


def test_api_key(server):
    base = server.url
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(base + path).status_code == 401
        assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + path, headers=AUTH).status_code == 200
    r = post(server, user("hi"), headers={})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    assert post(server, user("hi"), headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(base + "/health").status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert server.client().models.list().data[0].id == "tiny-llava"
    good(server)


def test_full_queue_answers_429(server):
    """A queue of one: with the engine paused, the second waiting request is refused."""
    engine = server.engine
    engine.pause()
    results = {}
    first = threading.Thread(target=lambda: results.update(first=good(server) or "ok"))
    try:
        first.start()
        with engine.cond:
            assert engine.cond.wait_for(lambda: engine.queue_length == 1, timeout=60)
        r = post(server, user("hi"))
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.resume()
        first.join()
    assert results == {"first": "ok"}
    good(server)


def test_no_root_refuses_every_path(open_server, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for url in ("x.png", str(tmp_path / "x.png"), f"file://{tmp_path}/x.png"):
        r = post(open_server, image_msg(url), headers={})
        assert r.status_code == 400
        assert "local image paths are disabled" in r.json()["error"]["message"]
        good(open_server)


def test_remote_images_when_allowed(open_server, tmp_path):
    """--allow-remote-images: an http URL is fetched (here from a loopback file server)."""
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "green.png")
    (tmp_path / "junk.png").write_bytes(b"junk")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=files.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        r = post(open_server, image_msg(base + "/green.png"), headers={})
        assert r.status_code == 200, r.text
        r = post(open_server, image_msg(base + "/missing.png"), headers={})
        assert r.status_code == 400 and "answered HTTP 404" in r.json()["error"]["message"]
        r = post(open_server, image_msg(base + "/junk.png"), headers={})
        assert r.status_code == 400 and "is not an image" in r.json()["error"]["message"]
    finally:
        files.shutdown()
        thread.join()
    good(open_server)


def test_unknown_route_is_a_json_404(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
