"""Prometheus metrics of one server, and an engine that reports its step times.

Each app has its own registry, so several servers (tests) never share counters.
The real-time factor is compute seconds per second of audio over the last
`RTF_WINDOW_S` seconds: below 1 the engine keeps up with real time.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from caster.engine import Engine
from caster.model import Model

__all__ = ["CONTENT_TYPE", "Metrics", "TimedEngine"]

RTF_WINDOW_S = 30.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.32, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge("caster_active_streams", "Open realtime streams", registry=r)
        self.streams = Counter(
            "caster_streams", "Realtime streams opened", ["protocol"], registry=r
        )
        self.rejected = Counter(
            "caster_rejected_connections",
            "Connections or requests refused",
            ["reason"],
            registry=r,
        )
        self.chunk_latency = Histogram(
            "caster_chunk_latency_seconds",
            "Compute time of the batched engine step that decoded each chunk",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "caster_audio_seconds", "Seconds of audio received by streams", registry=r
        )
        self.transcriptions = Counter(
            "caster_http_transcriptions",
            "File transcription requests",
            ["response_format", "status"],
            registry=r,
        )
        self.rtf = Gauge(
            "caster_real_time_factor",
            f"Engine compute seconds per audio second over the last {RTF_WINDOW_S:g} s",
            registry=r,
        )
        self.rtf.set_function(self.real_time_factor)
        self._lock = threading.Lock()
        self._compute: deque[tuple[float, float]] = deque()  # (time, seconds)
        self._audio: deque[tuple[float, float]] = deque()

    def observe_step(self, seconds: float, streams: int) -> None:
        """One engine step of `seconds` that advanced `streams` streams by a chunk each."""
        for _ in range(streams):
            self.chunk_latency.observe(seconds)
        with self._lock:
            self._compute.append((time.monotonic(), seconds))

    def observe_audio(self, seconds: float) -> None:
        self.audio_seconds.inc(seconds)
        with self._lock:
            self._audio.append((time.monotonic(), seconds))

    def real_time_factor(self) -> float:
        now = time.monotonic()
        with self._lock:
            for window in (self._compute, self._audio):
                while window and window[0][0] < now - RTF_WINDOW_S:
                    window.popleft()
            audio = sum(s for _, s in self._audio)
            compute = sum(s for _, s in self._compute)
        return compute / audio if audio > 0 else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class TimedEngine(Engine):
    """An `Engine` whose steps are timed into `Metrics`."""

    def __init__(self, model: Model, max_batch: int, metrics: Metrics) -> None:
        super().__init__(model, max_batch)
        self.metrics = metrics

    def step(self) -> int:
        start = time.perf_counter()
        advanced = super().step()
        if advanced:
            self.metrics.observe_step(time.perf_counter() - start, advanced)
        return advanced
