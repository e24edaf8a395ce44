"""Prometheus metrics of one server (its own registry, so several can share a process).

neva_requests_total{finish_reason}        answered requests (stop, length, cancelled, error)
neva_request_errors_total{status}         refused requests (4xx) and failures (5xx)
neva_prompt_tokens_total                  prompt tokens of admitted requests
neva_generation_tokens_total              generated tokens
neva_queue_length                         requests waiting for a slot
neva_slots_active / neva_slots_total      slot occupancy (and neva_slot_occupancy, their ratio)
neva_time_to_first_token_seconds          histogram, from arrival to the first token
neva_request_latency_seconds              histogram, from arrival to the last token
neva_compilations_total                   XLA programs compiled by the engine
neva_compilations_after_warmup            of those, compiled after warm-up (should stay 0)
process_resident_memory_bytes, ...        the standard process metrics
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    """The counters, gauges and histograms the engine and the HTTP layer update."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = prom.Counter(
            "neva_requests", "Answered requests", ["finish_reason"], registry=r
        )
        self.errors = prom.Counter(
            "neva_request_errors", "Refused or failed requests", ["status"], registry=r
        )
        self.prompt_tokens = prom.Counter("neva_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = prom.Counter(
            "neva_generation_tokens", "Generated tokens", registry=r
        )
        self.queue = prom.Gauge("neva_queue_length", "Requests waiting for a slot", registry=r)
        self.active = prom.Gauge("neva_slots_active", "Slots generating", registry=r)
        self.total = prom.Gauge("neva_slots_total", "Slots of the KV cache", registry=r)
        self.occupancy = prom.Gauge("neva_slot_occupancy", "Active / total slots", registry=r)
        self.ttft = prom.Histogram(
            "neva_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = prom.Histogram(
            "neva_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compilations = prom.Gauge(
            "neva_compilations_total", "XLA programs compiled by the engine", registry=r
        )
        self.late_compilations = prom.Gauge(
            "neva_compilations_after_warmup",
            "XLA programs compiled after warm-up (0 when every shape was warmed up)",
            registry=r,
        )

    def watch_compilations(self, total: Callable[[], int], after_warmup: Callable[[], int]) -> None:
        """Reads the compilation counts at every scrape."""
        self.compilations.set_function(total)
        self.late_compilations.set_function(after_warmup)

    # Called by the engine (its thread) and the HTTP handlers.
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens_out(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(finish_reason=reason).inc()
        if reason in ("stop", "length"):
            self.latency.observe(seconds)

    def gauges(self, queued: int, active: int, slots: int) -> None:
        self.queue.set(queued)
        self.active.set(active)
        self.total.set(slots)
        self.occupancy.set(active / slots if slots else 0.0)

    def refused(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return prom.generate_latest(self.registry)
