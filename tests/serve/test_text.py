"""Pieces without a server: streamed text, image limits, request parsing, buckets."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from neva_jax.serve import images, protocol
from neva_jax.serve.chat import TextStream


def stream_all(generator, ids, stops=()):
    ts = TextStream(generator, stops)
    pieces = [ts.add(i) for i in ids]
    pieces.append(ts.finish())
    return ts, pieces


def test_streamed_pieces_add_up_to_the_generator_text(generator):
    hf = generator.tokenizer.hf
    ids = hf.encode("  The red square is on the left.  ", add_special_tokens=False)
    ids.append(generator.tokenizer.eos_id)
    ts, pieces = stream_all(generator, ids)
    _, _, want, _ = generator._cut(ids, [0.0] * len(ids), [generator.template.stop])
    assert "".join(pieces) == ts.text == want == "The red square is on the left."
    assert not pieces[0].startswith(" ")  # leading whitespace never sent
    assert sum(bool(p) for p in pieces) > 3


def test_stop_string_is_held_back_and_cut(generator):
    hf = generator.tokenizer.hf
    ids = hf.encode("one two STOP three", add_special_tokens=False)
    ts, pieces = stream_all(generator, ids, stops=["STOP"])
    assert "".join(pieces) == "one two" and ts.stopped
    assert all("S" not in p for p in pieces)  # no prefix of the stop string leaked
    _, _, want, stopped = generator._cut(ids, [0.0] * len(ids), ["STOP"])
    assert want == "one two" and stopped


def test_pixel_cap_is_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, format="PNG")
    policy = images.ImagePolicy(max_pixels=1_000_000)
    with pytest.raises(protocol.ApiError, match="3000x3000 = 9000000 pixels"):
        images.decode(buf.getvalue(), policy, "img")
    assert images.decode(buf.getvalue(), images.ImagePolicy(), "img").size == (3000, 3000)


def test_paths_need_a_root(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    read = images.read_bytes
    with pytest.raises(protocol.ApiError, match="local image paths are disabled"):
        asyncio.run(read("a.png", images.ImagePolicy(), "img"))
    policy = images.ImagePolicy(root=str(tmp_path))
    assert asyncio.run(read("a.png", policy, "img")).startswith(b"\x89PNG")
    assert asyncio.run(read(f"file://{tmp_path}/a.png", policy, "img")).startswith(b"\x89PNG")
    with pytest.raises(protocol.ApiError, match="outside the image root"):
        asyncio.run(read("../a.png", images.ImagePolicy(root=str(tmp_path / "sub")), "img"))


def test_request_parsing():
    req = protocol.parse_request(
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, '
        b'"stop": "x", "unknown_field": 1}'
    )
    assert req.token_limit() == 7 and req.stop_strings() == ["x"]
    with pytest.raises(protocol.ApiError, match=r"messages\.0\.content"):
        protocol.parse_request(b'{"messages": [{"role": "user", "content": 5}]}')
    with pytest.raises(protocol.ApiError, match="stop takes at most 4"):
        protocol.parse_request(b'{"messages": [{"role": "user", "content": "a"}], "stop": '
                               b'["a", "b", "c", "d", "e"]}')  # fmt: skip


def test_prompt_buckets():
    from neva_jax.serve.runner import prompt_buckets

    assert prompt_buckets(128) == [16, 24, 32, 48, 64, 96, 128]
    assert prompt_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert prompt_buckets(416, [384, 999]) == [384, 416]
