"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge averages


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("blenderbot_mb_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("blenderbot_mb_request_latency_seconds",
                                 "Time from request to the end of the response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("blenderbot_mb_batch_size", "Requests decoded together in one generate() call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("blenderbot_mb_generated_tokens", "Tokens generated (all choices)", registry=r)
        self.in_flight = Gauge("blenderbot_mb_requests_in_flight", "Requests being answered", registry=r)
        self.queued = Gauge("blenderbot_mb_queued_requests", "Requests waiting for the decoder", registry=r)
        rate = Gauge("blenderbot_mb_generated_tokens_per_second",
                     f"Generated tokens per second over the last {RATE_WINDOW:.0f} s", registry=r)
        rate.set_function(self._tokens_per_second)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            return sum(t for _, t in self._recent) / RATE_WINDOW
