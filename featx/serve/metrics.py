"""The service's Prometheus metrics, in a registry of their own (GET /metrics)."""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class Metrics:
    """Requests and errors by endpoint and status, latency, batch sizes, cache hits and misses, images/s."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("featx_serve_requests", "HTTP requests by endpoint and status",
                                ("endpoint", "status"), registry=self.registry)
        self.errors = Counter("featx_serve_errors", "HTTP responses with status 400 or more, by endpoint and status",
                              ("endpoint", "status"), registry=self.registry)
        self.latency = Histogram("featx_serve_request_seconds", "Request latency by endpoint", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("featx_serve_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.cache = Counter("featx_serve_cache", "Embedding cache look-ups by source (memory, store) and result",
                             ("source", "result"), registry=self.registry)
        self.images = Counter("featx_serve_images", "Images run through a backbone", registry=self.registry)
        rate = Gauge("featx_serve_images_per_second", f"Backbone images per second over the last {RATE_WINDOW_S:g} s",
                     registry=self.registry)
        rate.set_function(self.images_per_second)
        self._recent: deque = deque()
        self._lock = threading.Lock()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, n_images: int) -> None:
        self.batch_size.observe(n_images)
        self.images.inc(n_images)
        with self._lock:
            self._recent.append((time.monotonic(), n_images))

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
