"""API keys: where a client presents one, constant-time checking, per-key stream limits,
and keeping keys out of the logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping

_QUERY_TOKEN = re.compile(r"((?:^|[?&])(?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)


class KeyRing:
    """The server's API keys; no keys means every client is let in.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against
    every key in turn without stopping at a match, so the time taken says
    nothing about any key. A key is named in logs and limits by its label
    ("key-1", ...), never by its text.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests: list[tuple[str, bytes]] = []
        for n, key in enumerate(keys, start=1):
            key = key.strip()
            if not key:
                raise ValueError(f"API key {n} is empty")
            self._digests.append((f"key-{n}", _digest(key)))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str | None) -> str | None:
        """The label of the matching key, "anonymous" when keys are off, else None."""
        if not self.enabled:
            return "anonymous"
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for label, known in self._digests:
            if hmac.compare_digest(digest, known) and found is None:
                found = label
        return found


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` (or Deepgram's
    `Token KEY`), a `Sec-WebSocket-Protocol: token, KEY` offer (browsers using
    Deepgram's scheme), or `?token=KEY` (browsers)."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
    if len(offered) == 2 and offered[0].lower() == "token" and offered[1]:
        return offered[1]
    return query.get("token") or None


class StreamQuota:
    """Concurrent streams, in all and per key; thread-safe."""

    def __init__(self, max_streams: int, max_per_key: int | None) -> None:
        self.max_streams = max_streams
        self.max_per_key = max_per_key
        self._lock = threading.Lock()
        self._per_key: Counter[str] = Counter()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(self._per_key.values())

    def acquire(self, key: str) -> str | None:
        """Take a slot for `key`; None when granted, else why not."""
        with self._lock:
            if sum(self._per_key.values()) >= self.max_streams:
                return f"the server is full ({self.max_streams} streams); try again later"
            if self.max_per_key is not None and self._per_key[key] >= self.max_per_key:
                return f"this API key already has {self.max_per_key} open streams"
            self._per_key[key] += 1
            return None

    def release(self, key: str) -> None:
        with self._lock:
            self._per_key[key] -= 1
            if self._per_key[key] <= 0:
                del self._per_key[key]


class RedactTokens(logging.Filter):
    """Blank `token=` query values in log records (uvicorn logs request paths)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact(text: str) -> str:
    """`text` with every `token=...` query value replaced by `***`."""
    return _QUERY_TOKEN.sub(r"\1***", text)


def install_log_redaction(loggers: Iterable[str] = ("uvicorn.access", "uvicorn.error")) -> None:
    """Add `RedactTokens` to the named loggers (once each)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
