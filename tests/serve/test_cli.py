"""`python -m neva_jax.serve` as a process: flags, loading errors, and SIGTERM draining."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neva_jax.serve", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_help_and_flag_errors():
    out = run("--help")
    assert out.returncode == 0 and "--allow-remote-images" in out.stdout
    out = run("--checkpoint", "x", "--slots", "0")
    assert out.returncode == 2 and "--slots must be >= 1, got 0" in out.stderr
    out = run("--checkpoint", "x", "--image-root", "/no/such/folder")
    assert out.returncode == 2 and "--image-root /no/such/folder: not a folder" in out.stderr


def test_empty_api_key_and_busy_port_fail_before_loading(tmp_path, capsys, monkeypatch):
    """An empty key would serve without authentication; a port in use would fail only
    after the model loads and compiles. Both stop at once (the checkpoint is not read)."""
    import socket

    from neva_jax.serve.__main__ import main

    monkeypatch.delenv("NEVA_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "nothing"), "--api-key", " "])
    assert e.value.code == 2 and "--api-key (or $NEVA_API_KEY) is empty" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["--checkpoint", str(tmp_path / "nothing"), "--port", port]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there"), err


def test_missing_checkpoint_is_one_line(tmp_path):
    out = run("--checkpoint", str(tmp_path / "nothing"))
    assert out.returncode == 1
    # (The first line may name the memory allocator the entry point runs under.)
    lines = [line for line in out.stderr.splitlines() if not line.startswith("neva-jax: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nothing" in lines[0]


class Process:
    """The server in a child process; its log lines are collected by a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neva_jax.serve", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        while True:
            line = self.lines.get(timeout=timeout)
            self.log.append(line)
            if not line:
                raise AssertionError("the server exited:\n" + "".join(self.log))
            found = re.search(pattern, line)
            if found:
                return found


@pytest.fixture()
def process(llava_dir):
    # A long answer (up to 440 tokens) keeps the request in flight while the test looks.
    p = Process("--checkpoint", llava_dir, "--port", "0", "--slots", "2", "--max-seq-len", "512",
                "--prefill-buckets", "64", "--max-images", "0")  # fmt: skip
    yield p
    if p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait()


def test_sigterm_finishes_in_flight_requests_then_exits_0(process):
    # The log names the conversation settings (a llava-hf folder names none: the defaults).
    assert process.wait_for(r"template (\w+), images (\w+), 2 slots").groups() == (
        "vicuna_v1",
        "square",
    )
    url = process.wait_for(r"Uvicorn running on (http://\S+)").group(1)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 440, "temperature": 0}  # fmt: skip
    want = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert want.status_code == 200, want.text
    want = want.json()
    assert want["usage"]["completion_tokens"] > 200  # long enough to be caught in flight
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as resp:
        assert resp.status_code == 200, resp.read()
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert httpx.get(url + "/health").json()["active"] == 1  # in flight now
        process.proc.send_signal(signal.SIGTERM)
        process.wait_for(r"SIGTERM: draining")
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(r) for r in rest[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == want["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert process.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")
