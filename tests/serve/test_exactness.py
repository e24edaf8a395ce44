"""Greedy answers served alone, and among 15 concurrent requests, are token-identical to
`python -m neva_jax.generate` and to `transformers` `generate`."""

from __future__ import annotations

import base64
import concurrent.futures
import json

import numpy as np
import pytest
from PIL import Image

NEW = 24
QUESTIONS = ["What colour are the shapes?", "Describe the image.", "How many shapes?", "Where?"]
COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 220), (240, 240, 20)]


@pytest.fixture(scope="module")
def server(make_server):
    # Alone, a request runs in the 1-row decode step; together, in the 16-row one; the
    # 4-row step serves the tail of the concurrent run.
    return make_server("--max-queue", "32", "--decode-buckets", "1,4")


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """16 (question, image path or None) pairs: 8 with an image, 8 text only."""
    folder = tmp_path_factory.mktemp("exact_images")
    out = []
    for i in range(16):
        path = None
        if i % 2 == 0:
            path = folder / f"im{i}.png"
            Image.new("RGB", (40 + i, 30), COLOURS[i % 4]).save(path)
        out.append((QUESTIONS[i % 4] + " " * (i // 4), path))
    return out


def ask(client, question, path):
    content = [{"type": "text", "text": question}]
    if path is not None:
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": content}],
        max_tokens=NEW,
        temperature=0,
        logprobs=True,
    )
    return r.choices[0].message.content, [e.token for e in r.choices[0].logprobs.content]


@pytest.fixture(scope="module")
def alone(server, requests):
    client = server.client()
    return [ask(client, q, p) for q, p in requests]


def test_among_15_concurrent_requests_equals_alone(server, requests, alone):
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda qp: ask(client, *qp), requests))
    assert together == alone
    assert len({text for text, _ in alone}) > 4  # the requests really differ
    assert server.engine.compilations_after_warmup() == 0


@pytest.mark.parametrize("index", [0, 1])  # an image request and a text-only one
def test_equals_the_generate_cli(llava_dir, generator, requests, alone, index, capsys):
    from neva_jax import generate as cli

    question, path = requests[index]
    argv = ["--checkpoint", llava_dir, "--prompt", question, "--max-new-tokens", str(NEW), "--json"]
    if path is not None:
        argv += ["--image", str(path)]
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    text, tokens = alone[index]
    assert text == got["text"]
    assert tokens == [generator.tokenizer.hf.decode([i]) for i in got["token_ids"]]
    assert len(tokens) > 3


def test_equals_transformers_generate(llava_dir, generator, requests, alone):
    """All 16 requests (served alone and among the others: equal, see above)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: OpenMP threads only spin on a shared machine
    try:
        _compare_with_transformers(ref, generator, requests, alone)
    finally:
        torch.set_num_threads(threads)


def _compare_with_transformers(ref, generator, requests, alone):
    import torch

    hf = generator.tokenizer.hf
    # The vocabulary rows past the tokenizer are padding, never generated (as the
    # server masks them): transformers is restricted to the tokenizer's ids likewise.
    padding = list(range(len(hf), ref.config.text_config.vocab_size))
    assert padding
    for (question, path), (text, tokens) in zip(requests, alone, strict=True):
        _, ids = generator.prompt_ids(question, has_image=path is not None)
        kw = {}
        if path is not None:
            pixels = generator.preprocess(Image.open(path)).transpose(2, 0, 1)
            kw["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pixels)[None])
        with torch.no_grad():
            out = ref.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW, do_sample=False, eos_token_id=list(generator.eos_ids),
                pad_token_id=generator.tokenizer.pad_id, suppress_tokens=padding, **kw,
            )[0, len(ids):].tolist()  # fmt: skip
        eos = [k for k, t in enumerate(out) if t in generator.eos_ids]
        out = out[: eos[0] + 1] if eos else out
        assert tokens == [hf.decode([i]) for i in out], question
        body = out[:-1] if out and out[-1] in generator.eos_ids else out
        assert text == hf.decode(body, skip_special_tokens=True).strip()
