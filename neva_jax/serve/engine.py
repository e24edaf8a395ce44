"""Continuous batching: a scheduler thread that keeps a fixed set of slots decoding.

    engine = Engine(runner, max_queue=64)        # runner: serve.runner.SlotRunner
    engine.start()                               # warm-up (compiles everything), then the loop
    handle = engine.submit(prompt_ids, pixels, GenParams(max_tokens=64), loop)
    async for event in handle.events(): ...      # Token(...) per generated token, then Finished

The loop, on its own thread: admit waiting requests into free slots (each one is
prefilled alone at a bucketed length and inserted into its slot, which yields its
first token), then run one decode step that advances every active slot by one
token; between two steps requests join and leave. A request that finishes (end of
sequence, `max_tokens`, a full context row) or is cancelled (the client left, a
stop string was seen) frees its slot before the next step. Waiting requests beyond
`max_queue` are refused (`QueueFullError`, HTTP 429) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np

_log = logging.getLogger("neva_jax.serve")


class QueueFullError(Exception):
    """The waiting queue is at its bound; the client should retry later."""


class DrainingError(Exception):
    """The server is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class GenParams:
    """Per-request generation settings (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False  # only max_tokens ends the request (benchmarks)


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token, its log-probability and the most likely alternatives."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: `reason` is "stop", "length", "cancelled" or "error"."""

    reason: str
    message: str = ""


class SlotRunner(Protocol):
    """The model side of the engine (see `neva_jax.serve.runner`)."""

    slots: int
    max_len: int
    eos_ids: frozenset[int]

    def warmup(self) -> None: ...

    def free(self, slot: int) -> None: ...

    def prefill(self, slot: int, ids: list[int], pixels: np.ndarray | None, params: Any) -> Any: ...

    def decode(self, active: np.ndarray) -> Any: ...

    def compilations(self) -> int: ...


class Handle:
    """A submitted request as the HTTP side sees it: its event stream and `cancel()`."""

    def __init__(
        self,
        rid: int,
        ids: list[int],
        pixels: np.ndarray | None,
        params: GenParams,
        loop: asyncio.AbstractEventLoop,
    ):
        self.rid, self.ids, self.pixels, self.params = rid, ids, pixels, params
        self.loop = loop
        self.queue: asyncio.Queue[Token | Finished] = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.cancel_reason = "cancelled"
        self.generated = 0
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stops generation; the slot is freed before the next decode step (thread-safe).

        `reason` is what the request is counted as: "cancelled" (the client left), or
        "stop" when the caller found a stop string in the text. The first call wins.
        """
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
        self.cancel_event.set()

    async def events(self) -> AsyncIterator[Token | Finished]:
        """Tokens as they are generated, then one `Finished`."""
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, Finished):
                return

    def _put(self, event: Token | Finished) -> None:
        _send(self.loop, [(self, event)])


def _send(loop: asyncio.AbstractEventLoop, events: list[tuple[Handle, Token | Finished]]) -> None:
    """Queues events for their handles on `loop`, with one wake-up of that loop."""

    def put_all() -> None:
        for handle, event in events:
            handle.queue.put_nowait(event)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the clients' event loop is closed: nobody is listening
        for handle, _ in events:
            handle.cancel_event.set()


class Engine:
    """Runs a `SlotRunner` on a background thread; `submit` from any asyncio loop."""

    def __init__(self, runner: SlotRunner, *, max_queue: int = 64, metrics: Any = None):
        self.runner, self.max_queue, self.metrics = runner, max_queue, metrics
        self.slots: list[Handle | None] = [None] * runner.slots
        self.pending: collections.deque[Handle] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.draining = False
        self.ids = itertools.count(1)
        self.warm_compilations: int | None = None
        self.error: str | None = None
        self.running = threading.Event()  # cleared by `pause()`
        self.running.set()
        self.outbox: list[tuple[Handle, Token | Finished]] = []  # sent after each step

    # ------------------------------------------------------------------ control

    def start(self, warmup: bool = True) -> None:
        """Compiles every program the loop will need (unless `warmup=False`), then starts it."""
        if warmup:
            t0 = time.perf_counter()
            self.runner.warmup()
            _log.info(
                "warm-up: %d programs compiled in %.1f s",
                self.runner.compilations(),
                time.perf_counter() - t0,
            )
        self.warm_compilations = self.runner.compilations()
        self.thread = threading.Thread(target=self._loop, name="neva-serve-engine", daemon=True)
        self.thread.start()

    def pause(self) -> None:
        """Holds the loop before its next admission or step (requests still queue up)."""
        self.running.clear()

    def resume(self) -> None:
        """Lets a paused loop go on."""
        self.running.set()

    def drain(self) -> None:
        """Refuses new requests from now on; the ones already in keep going."""
        with self.cond:
            self.draining = True

    def stop(self) -> None:
        """Ends the loop (requests still running are finished with reason "cancelled")."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.running.set()
        if self.thread is not None:
            self.thread.join()
        for h in [*self.pending, *filter(None, self.slots)]:
            h._put(Finished("cancelled", "the server stopped"))
        self.pending.clear()
        self.slots = [None] * len(self.slots)

    def submit(
        self,
        ids: list[int],
        pixels: np.ndarray | None,
        params: GenParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Queues a request; raises `QueueFullError`, `DrainingError` or ValueError (it cannot fit)."""
        if len(ids) + params.max_tokens > self.runner.max_len:
            raise ValueError(
                f"{len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed the context "
                f"of {self.runner.max_len} tokens"
            )
        if params.seed is None:
            params = dataclasses.replace(params, seed=int.from_bytes(os.urandom(4), "little"))
        handle = Handle(next(self.ids), ids, pixels, params, loop or asyncio.get_running_loop())
        with self.cond:
            if self.draining or self.stopping:
                raise DrainingError("the server is shutting down")
            if self.error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self.error}")
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"{len(self.pending)} requests are waiting (--max-queue)")
            self.pending.append(handle)
            self.cond.notify_all()
        self._gauges()
        return handle

    # ------------------------------------------------------------------ state

    @property
    def queue_length(self) -> int:
        return len(self.pending)

    @property
    def active(self) -> int:
        return sum(h is not None for h in self.slots)

    def compilations_after_warmup(self) -> int:
        """Programs compiled since warm-up ended (0 when every shape was warmed up)."""
        base = self.warm_compilations or 0
        return self.runner.compilations() - base

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopping and not self.pending and not any(self.slots):
                        self.cond.wait()
                    if self.stopping:
                        return
                self.running.wait()
                self._admit()
                if any(self.slots):
                    self._step()
                self._flush()
        except Exception as e:  # a bug or a device failure: fail every request, say why
            _log.exception("engine loop failed")
            self.error = f"{type(e).__name__}: {e}"
            with self.cond:
                waiting = [*self.pending, *filter(None, self.slots)]
                self.pending.clear()
                self.slots = [None] * len(self.slots)
            for h in waiting:
                h._put(Finished("error", self.error))

    def _admit(self) -> None:
        """Prefills waiting requests into free slots (each yields its first token)."""
        while True:
            with self.cond:  # a request is always counted: waiting, in a slot, or finished
                free = [i for i, h in enumerate(self.slots) if h is None]
                if not free or not self.pending:
                    return
                handle = self.pending.popleft()
                if handle.cancelled:
                    self._finish(handle, None, handle.cancel_reason)
                    continue
                slot = free[0]
                self.slots[slot] = handle
            self._gauges()
            try:
                out = self.runner.prefill(slot, handle.ids, handle.pixels, handle.params)
            except (ValueError, OverflowError, TypeError) as e:
                # This request's own values (the protocol's checks should have caught
                # them): it fails alone; the slot and every other request go on.
                _log.warning("request refused at prefill: %s: %s", type(e).__name__, e)
                self._finish(handle, slot, "error", f"{type(e).__name__}: {e}")
                self._flush()
                continue
            self._deliver(slot, handle, out.token(0))
            self._flush()

    def _step(self) -> None:
        """One decode step for every active slot; cancelled slots are freed first."""
        for slot, h in enumerate(self.slots):
            if h is not None and h.cancelled:
                self._finish(h, slot, h.cancel_reason)
        active = np.array([h is not None for h in self.slots])
        if not active.any():
            return
        out = self.runner.decode(active)
        for slot, h in enumerate(self.slots):
            if h is not None:
                self._deliver(slot, h, out.token(slot))
        self._flush()

    def _flush(self) -> None:
        """Sends the events of the last step: one wake-up per client event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self.outbox:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self.outbox = []
        for loop, events in by_loop.items():
            _send(loop, events)

    def _deliver(self, slot: int, handle: Handle, token: Token) -> None:
        """Hands one token to its request; finishes the request when it is done."""
        now = time.perf_counter()
        if handle.first_token_at is None:
            handle.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - handle.submitted)
        handle.generated += 1
        self.outbox.append((handle, token))
        if self.metrics is not None:
            self.metrics.tokens_out(1)
        if token.id in self.runner.eos_ids and not handle.params.ignore_eos:
            self._finish(handle, slot, "stop")
        elif handle.generated >= handle.params.max_tokens:
            self._finish(handle, slot, "length")
        elif handle.cancelled:
            self._finish(handle, slot, handle.cancel_reason)

    def _finish(self, handle: Handle, slot: int | None, reason: str, message: str = "") -> None:
        with self.cond:
            if slot is not None:
                self.slots[slot] = None
                self.runner.free(slot)
            handle.finished_at = time.perf_counter()
            self.outbox.append((handle, Finished(reason, message)))
            if self.metrics is not None:
                self.metrics.finished(reason, handle.finished_at - handle.submitted)
            self.cond.notify_all()
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(self.queue_length, self.active, len(self.slots))

    def stats(self) -> dict[str, Any]:
        """A snapshot for /health and the benchmark."""
        return {
            "slots": len(self.slots),
            "active": self.active,
            "queued": self.queue_length,
            "compilations": self.runner.compilations(),
            "compilations_after_warmup": self.compilations_after_warmup(),
            "draining": self.draining,
            "error": self.error,
        }
