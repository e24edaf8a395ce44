"""Serving fixtures: the tiny llava-hf model (built once), loaded once, and live servers.

A `LiveServer` is the real app under uvicorn on a loopback port in a thread of the
test process, so clients talk real HTTP to it while the tests can look at its
engine; the compiled programs are shared by every server of the process.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _eval_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "eval_conftest", os.path.join(HERE, "..", "eval", "conftest.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random llava-hf folder with a tokenizer (as in tests/eval)."""
    out = str(tmp_path_factory.mktemp("serve_llava_hf"))
    _eval_conftest().build_llava_hf(out)
    return out


@pytest.fixture(scope="session")
def generator(llava_dir: str) -> Any:
    from neva_jax.eval.generate import Generator

    return Generator.load(llava_dir)


# Every test server has the same cache and bucket shapes, so the programs compiled by
# the first one serve all the others in the process (warm-up then compiles nothing).
# One decode size (all 16 slots) keeps warm-up short; test_exactness adds the 1- and
# 4-row steps and checks they answer exactly as the full one.
SHAPE_FLAGS = (
    "--slots", "16", "--max-seq-len", "96", "--prefill-buckets", "64", "--decode-buckets", "16",
)  # fmt: skip


class LiveServer:
    """`python -m neva_jax.serve` minus the process: same arguments, same app."""

    def __init__(self, generator: Any, *flags: str):
        from neva_jax.serve.__main__ import build_state, parse_args
        from neva_jax.serve.app import BackgroundServer

        self.args = parse_args(["--checkpoint", "tiny-llava", "--port", "0", *SHAPE_FLAGS, *flags])
        self.state = build_state(self.args, generator)
        self.engine = self.state.engine
        self.http = BackgroundServer(self.state)
        self.url = self.http.url

    def client(self, **kw: Any) -> Any:
        """An official `openai` client for this server (no retries: 429s must show)."""
        import openai

        kw.setdefault("api_key", self.args.api_key or "none")
        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kw)

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def make_server(generator: Any) -> Iterator[Any]:
    """make_server(*flags) -> a started LiveServer (SHAPE_FLAGS, then `flags`), closed at the
    end of the module."""
    servers: list[LiveServer] = []

    def make(*flags: str) -> LiveServer:
        servers.append(LiveServer(generator, *flags))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def png_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)
) -> bytes:
    """A small solid-colour PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_uri() -> Any:
    """image_uri(color=..., size=...) -> a PNG data: URI (or of given bytes: data=...)."""
    import base64

    def make(data: bytes | None = None, **kw: Any) -> str:
        data = png_bytes(**kw) if data is None else data
        return "data:image/png;base64," + base64.b64encode(data).decode()

    return make
