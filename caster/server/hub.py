"""What one server shares among its connections: the model and its engine, keys and
quotas, metrics, and the open sessions (for graceful shutdown)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from caster.model import Model
from caster.server.metrics import Metrics, TimedEngine
from caster.server.protocol import StreamConfig
from caster.server.security import KeyRing, StreamQuota
from caster.server.settings import ServerSettings

if TYPE_CHECKING:
    from caster.server.ws import Session


class Hub:
    """One model, one engine, and everything the connections share."""

    def __init__(self, model: Model, settings: ServerSettings) -> None:
        self.model = model
        self.settings = settings
        self.metrics = Metrics()
        self.engine = TimedEngine(model, settings.max_batch, self.metrics)
        self.keys = KeyRing(settings.api_keys)
        self.quota = StreamQuota(settings.max_streams, settings.max_streams_per_key)
        self.sessions: set[Session] = set()
        self.draining = False
        self.http_slots = asyncio.Semaphore(settings.http_workers)

    @property
    def sample_rate(self) -> int:
        return self.model.config.mel.sample_rate

    def chunk_ms_for(self, config: StreamConfig) -> int | None:
        """The chunk size a new stream gets: under load, the largest the client allows."""
        if config.max_chunk_ms is None:
            return config.chunk_ms
        if self.quota.active < self.settings.load_threshold * self.settings.max_streams:
            return config.chunk_ms
        allowed = [
            ms
            for ms in self.model.config.supported_chunk_ms()
            if config.chunk_ms <= ms <= config.max_chunk_ms  # type: ignore[operator]
        ]
        return max(allowed, default=config.chunk_ms)

    async def drain(self, timeout: float) -> None:
        """Refuse new streams, give every open one its final results, wait for them to close."""
        self.draining = True
        for session in list(self.sessions):
            session.interrupt("shutdown")
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
