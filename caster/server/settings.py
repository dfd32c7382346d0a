"""The limits and keys of one server; no dependency beyond the standard library, so
`caster serve --help` works without the server extra."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerSettings:
    """Limits and keys of a server (`caster serve` options).

    max_streams: open realtime streams at most; more are refused (4429).
    max_streams_per_key: open streams per API key at most (None: no limit).
    max_batch: most streams in one batched engine step.
    max_frame_bytes: largest binary message (4413 above it).
    max_ahead_s: a stream's audio is read at most this far ahead of real time;
        a faster client is paced by TCP backpressure, so no stream's backlog grows.
    start_timeout_s: time to send the start message after connecting.
    idle_timeout_s: longest time without any client message.
    max_duration_s: longest stream (wall clock).
    send_timeout_s: a client that takes longer to accept one message is a
        stalled reader: its stream is dropped.
    drain_timeout_s: on shutdown, time for open streams to get their final results.
    load_threshold: share of max_streams in use above which a new stream that
        allows it (max_chunk_ms) gets its largest allowed chunk size.
    max_upload_bytes: largest file for POST /v1/audio/transcriptions.
    http_workers: file transcriptions computed at the same time.
    api_keys: accepted keys (none: no authentication).
    cors_origins: origins allowed by CORS for the HTTP API ("*" for any).
    """

    max_streams: int = 64
    max_streams_per_key: int | None = None
    max_batch: int = 32
    max_frame_bytes: int = 1 << 20
    max_ahead_s: float = 10.0
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    max_duration_s: float = 4 * 3600.0
    send_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    load_threshold: float = 0.75
    max_upload_bytes: int = 25 * 1024 * 1024
    http_workers: int = 1
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("api_keys", "cors_origins"):
                if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{f.name} must be a tuple of strings")
            elif value is None and f.name == "max_streams_per_key":
                continue
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif not math.isfinite(value) or value <= 0:
                raise ValueError(f"{f.name} must be positive, got {value!r}")
        if self.load_threshold > 1:
            raise ValueError(f"load_threshold must lie in (0, 1], got {self.load_threshold}")
