"""`python -m neva_jax.bench serve`: the server under concurrent clients vs `transformers` workers.

The bench shape's model (random weights, fp32) is saved as a llava-hf folder with a
word-level tokenizer over its whole 32000-token vocabulary; our server loads it
with the project's importer and serves it on a loopback port in this process.
Every request is one image (random pixels, PNG) and a 27-word question; answers
differ in length as real ones do: request j asks for a fixed number of tokens drawn
once from [new_tokens / 4, 7 new_tokens / 4] (mean `new_tokens`), generated exactly
(greedy, `ignore_eos`). Closed-loop clients each send their requests one after the
other, streaming (SSE, one chunk per token), at 1, 4 and 16 concurrent clients.

The same requests (the same ids and pixels, from the server's own rendering) go to
`transformers`' `LlavaForConditionalGeneration.generate` in two ways:
  - one at a time behind a lock (LLaVA's model worker: one request at a time under
    a semaphore);
  - static batches: a worker takes every waiting request (up to the client count),
    runs one batched `generate` for as many tokens as its longest request asks for,
    and answers them all when it ends.
The baselines run in-process without HTTP (in their favour); our clients run in a
separate process on the CPUs the bench does not compute on (none are left with
`--threads` = all of them: then they share). Figures per side and
client count: output tokens/s (all tokens / wall time of the round), p50/p95 time
to first token and latency; plus the recompilations of our engine after warm-up
and how many answers agree with `transformers` token for token.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import multiprocessing
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neva_jax.bench.hf_side import HFSide
from neva_jax.bench.report import Report
from neva_jax.bench.shapes import BenchShape
from neva_jax.data import synth

QUESTION_WORDS = 27
SERIAL_GOAL = 4.0  # x the one-at-a-time tokens/s at 16 clients
STATIC_GOAL = 1.5  # x the static batches at 16 clients


def write_tokenizer(folder: str, vocab_size: int, image_token_id: int) -> None:
    """A word-level tokenizer over every id of the model (`w<id>`), with LLaMA's specials
    at 0-3 and `<image>` at the model's image token id, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(vocab_size)}
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": image_token_id}
    for name, i in specials.items():
        vocab.pop(f"w{i}")
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    synth.save_tokenizer(tok, folder)


def make_requests(n: int, shape: BenchShape, seed: int = 0) -> list[dict[str, Any]]:
    """n OpenAI message lists: a random PNG image and a 27-word question each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = shape.model.vision.image_size
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        words = rng.integers(5, shape.model.llm.vocab_size - 1, QUESTION_WORDS)
        question = " ".join(f"w{w}" for w in words if w != shape.model.image_token_id)
        out.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        )
    return out


class _Stamps:
    """A `transformers` streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(
    hf: HFSide, ids: np.ndarray, pixels: np.ndarray, n: int
) -> tuple[np.ndarray, float]:
    """Greedy `generate` of exactly n tokens for rows of equal length -> (ids [B, n], first-token time)."""
    import torch

    stamps = _Stamps()
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        out = hf.model.generate(
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=3,
            streamer=stamps,
        )
    return out[:, ids.shape[1] :].numpy(), stamps.times[0]


def closed_loop(
    clients: int, jobs: Sequence[int], call: Callable[[int], dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """`clients` threads take jobs in order and run `call(job)` one after another.

    `call` returns {"submit", "first", "end", "tokens", ...} (perf_counter times);
    returns the records in job order and the round's wall time.
    """
    todo: queue.Queue[int] = queue.Queue()
    for j in jobs:
        todo.put(j)
    records: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                j = todo.get_nowait()
            except queue.Empty:
                return
            try:
                records[j] = call(j)
            except BaseException as e:  # reported after the round
                errors.append(e)
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [records[j] for j in jobs], time.perf_counter() - t0


def figures(records: list[dict[str, Any]], wall: float) -> dict[str, float]:
    """tokens/s and p50/p95 time to first token and latency of one round."""
    ttft = [r["first"] - r["submit"] for r in records]
    latency = [r["end"] - r["submit"] for r in records]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q))

    return {
        "requests": len(records),
        "tokens": sum(r["tokens"] for r in records),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "latency_p50_s": pct(latency, 50),
        "latency_p95_s": pct(latency, 95),
        "latency_mean_s": statistics.fmean(latency),
    }


def stream_one(http: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request; the record of its times, tokens (logprob entries) and text."""
    record: dict[str, Any] = {"submit": time.perf_counter(), "tokens": 0, "text": ""}
    with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                entries = (choice.get("logprobs") or {}).get("content") or []
                if entries and "first" not in record:
                    record["first"] = time.perf_counter()
                record["tokens"] += len(entries)
                record["text"] += choice["delta"].get("content") or ""
    record["end"] = time.perf_counter()
    return record


def _clients_main(url: str, bodies: list, clients: int, jobs: list[int], cpus: list[int],
                  out: Any) -> None:  # fmt: skip
    """The body of `client_process` (a spawned process): closed-loop clients over HTTP."""
    import httpx

    if cpus:
        os.sched_setaffinity(0, cpus)
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        out.put(closed_loop(clients, jobs, lambda j: stream_one(http, url, bodies[j])))


def client_process(
    url: str, bodies: list[dict[str, Any]], clients: int, jobs: list[int], cpus: list[int]
) -> tuple[list[dict[str, Any]], float]:
    """`closed_loop` of streamed requests, run in a fresh process on `cpus` (times are
    CLOCK_MONOTONIC, comparable across processes)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_clients_main, args=(url, bodies, clients, jobs, cpus, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


class StaticBatcher:
    """A `transformers` worker that runs every waiting request as one batch."""

    def __init__(
        self, hf: HFSide, inputs: list[tuple[np.ndarray, np.ndarray]], lengths: list[int], cap: int
    ):
        self.hf, self.inputs, self.lengths, self.cap = hf, inputs, lengths, cap
        self.waiting: queue.Queue[tuple[int, dict[str, Any], threading.Event]] = queue.Queue()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.stopped = False
        self.thread.start()

    def call(self, job: int) -> dict[str, Any]:
        record: dict[str, Any] = {"submit": time.perf_counter()}
        done = threading.Event()
        self.waiting.put((job, record, done))
        done.wait()
        return record

    def _work(self) -> None:
        while not self.stopped:
            try:
                batch = [self.waiting.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.cap:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            ids = np.stack([self.inputs[j][0] for j, _, _ in batch])
            pixels = np.stack([self.inputs[j][1][0] for j, _, _ in batch])
            n = max(self.lengths[j] for j, _, _ in batch)
            out, first = hf_generate(self.hf, ids, pixels, n)
            end = time.perf_counter()
            for row, (j, record, done) in enumerate(batch):
                n = self.lengths[j]
                record.update(first=first, end=end, tokens=n, ids=out[row, :n].tolist())
                done.set()

    def close(self) -> None:
        self.stopped = True
        self.thread.join()


def run_serve(
    report: Report,
    shape: BenchShape,
    *,
    clients: Sequence[int] = (1, 4, 16),
    new_tokens: int = 64,
    requests_per_client: int = 2,
    slots: int = 16,
) -> None:
    """Measures our server and both `transformers` workers at each client count."""
    from neva_jax.eval.generate import Generator, bucket_prompt_length
    from neva_jax.serve.__main__ import build_state, parse_args
    from neva_jax.serve.app import BackgroundServer
    from neva_jax.serve.chat import ChatFormat
    from neva_jax.serve.images import ImagePolicy
    from neva_jax.serve.protocol import ChatMessage

    hf = HFSide(shape)
    hf.model.eval()
    cfg = shape.model
    n_jobs = max(clients) * requests_per_client
    messages = make_requests(n_jobs, shape)
    with tempfile.TemporaryDirectory(prefix="neva_serve_bench_") as folder:
        hf.save(folder)
        write_tokenizer(folder, cfg.llm.vocab_size, cfg.image_token_id)
        gen = Generator.load(folder, dtype="float32", attention_impl="xla")
    chat = ChatFormat(gen, max_images=1, policy=ImagePolicy())
    inputs = []  # (ids, pixels) of every request, as the server renders them
    for m in messages:
        p = asyncio.run(chat.prepare([ChatMessage.model_validate(m)]))
        inputs.append((np.asarray(p.ids, np.int32), p.pixels))
    # Every prompt has the same length (word-level tokens): one bucket, room for the answer.
    prompt_tokens = len(inputs[0][0])
    bucket = bucket_prompt_length(prompt_tokens)
    rng = np.random.default_rng(1)
    lengths = rng.integers(new_tokens // 4, new_tokens * 7 // 4 + 1, n_jobs).tolist()
    max_len = bucket + max(lengths)
    args = parse_args(
        ["--checkpoint", "bench", "--port", "0", "--slots", str(slots), "--max-seq-len",
         str(max_len), "--prefill-buckets", str(bucket), "--max-queue", str(n_jobs)]
    )  # fmt: skip
    t0 = time.perf_counter()
    state = build_state(args, gen)
    report.emit(
        "serve", "warmup", compile_s=time.perf_counter() - t0,
        programs=state.engine.runner.compilations(), slots=slots, max_seq_len=max_len,
        prompt_tokens=prompt_tokens, prefill_bucket=bucket, new_tokens_mean=new_tokens,
        new_tokens_min=min(lengths), new_tokens_max=max(lengths),
    )  # fmt: skip
    server = BackgroundServer(state)

    bodies = [
        {"messages": [m], "max_tokens": n, "temperature": 0, "stream": True, "logprobs": True,
         "ignore_eos": True}
        for m, n in zip(messages, lengths, strict=True)
    ]  # fmt: skip
    # The clients run in another process, on the CPUs the server does not use (if any):
    # load generators are not part of a server.
    others = sorted(set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0))

    def ours(clients: int, jobs: list[int]) -> tuple[list[dict[str, Any]], float]:
        return client_process(server.url, bodies, clients, jobs, others)

    lock = threading.Lock()

    def serial(job: int) -> dict[str, Any]:
        record: dict[str, Any] = {"submit": time.perf_counter()}
        with lock:
            ids, pixels = inputs[job]
            out, first = hf_generate(hf, ids[None], pixels, lengths[job])
        record.update(
            first=first, end=time.perf_counter(), tokens=lengths[job], ids=out[0].tolist()
        )
        return record

    # Warm-up (first-call allocations of both sides), then the rounds.
    ours(1, [0])
    closed_loop(1, [0], serial)
    compiled = state.engine.compilations_after_warmup()
    results: dict[tuple[str, int], dict[str, float]] = {}
    agree = []
    for c in clients:
        jobs = list(range(c * requests_per_client))
        batcher = StaticBatcher(hf, inputs, lengths, cap=c)
        runs = {
            "ours": lambda c=c, jobs=jobs: ours(c, jobs),
            "hf_one_at_a_time": lambda c=c, jobs=jobs: closed_loop(c, jobs, serial),
            "hf_static_batches": lambda c=c, jobs=jobs, b=batcher: closed_loop(c, jobs, b.call),
        }
        for side, run in runs.items():
            records, wall = run()
            results[side, c] = figures(records, wall)
            report.emit("serve", f"c{c}_{side}", clients=c, side=side, **results[side, c])
            if side == "ours":
                served = records
            elif side == "hf_one_at_a_time":
                for mine, theirs in zip(served, records, strict=True):
                    text = gen.tokenizer.hf.decode(theirs["ids"], skip_special_tokens=True)
                    agree.append(mine["text"] == text.strip())
        batcher.close()
    recompiles = state.engine.compilations_after_warmup() - compiled
    server.close()
    top = max(clients)
    vs_serial = (
        results["ours", top]["tokens_per_s"] / results["hf_one_at_a_time", top]["tokens_per_s"]
    )
    vs_static = (
        results["ours", top]["tokens_per_s"] / results["hf_static_batches", top]["tokens_per_s"]
    )
    report.emit(
        "serve", "summary", recompiles=recompiles, greedy_text_agreement=float(np.mean(agree)),
        ratio_vs_one_at_a_time=vs_serial, ratio_vs_static=vs_static,
    )  # fmt: skip
    report.target(
        f"serve tokens/s at {top} clients vs transformers one at a time",
        vs_serial, f">= {SERIAL_GOAL}x", vs_serial >= SERIAL_GOAL,
    )  # fmt: skip
    report.target(
        f"serve tokens/s at {top} clients vs transformers static batches",
        vs_static, f">= {STATIC_GOAL}x", vs_static >= STATIC_GOAL,
    )  # fmt: skip
    report.target("serve recompilations after warm-up", recompiles, "0", recompiles == 0)
    print(table(results), file=report.out)


def table(results: dict[tuple[str, int], dict[str, float]]) -> str:
    """The serving figures as an aligned text table (clients x side)."""
    head = ("clients", "side", "tokens/s", "ttft p50", "ttft p95", "latency p50", "latency p95")
    rows = [head]
    for (side, c), f in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append((str(c), side, f"{f['tokens_per_s']:.1f}", *(
            f"{f[k]:.2f}s" for k in ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")
        )))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)
