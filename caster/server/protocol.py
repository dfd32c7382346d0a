"""caster's realtime WebSocket protocol (`/v1/listen`), version `caster.v1`.

Connect to `ws://HOST:PORT/v1/listen` (with an API key, when the server has
keys: header `Authorization: Bearer KEY`, or `?token=KEY` for browsers). A
connection whose query names Deepgram parameters (`model`, `encoding`, ...)
speaks the Deepgram subset instead (`caster.server.deepgram`).

Client -> server
----------------
1. One text message, the start message (every field optional)::

    {"type": "start",
     "language": "auto",          # a locale ("en-US", "de"), "auto" or null
     "chunk_ms": 320,             # latency: 80, 160, 320, 560, 1120 (model's list); null: default
     "max_chunk_ms": null,        # under load the server may raise chunk_ms up to this
     "sample_rate": 16000,        # any rate from 1000 to 384000 Hz; resampled on the server
     "encoding": "pcm_s16le",     # or "f32le" (float32); little-endian
     "channels": 1,               # interleaved channels are averaged to mono
     "interim_results": true,     # false: only final results
     "endpointing": {"silence_ms": 800, "max_segment_ms": 20000, "vad": false}}

   Unknown fields and values of the wrong type are errors (`bad_request`).
2. Binary messages: raw samples in the chosen encoding, any size up to the
   server's frame limit (default 1 MiB); a sample split across two messages is
   joined.
3. Text control messages: `{"type": "finalize"}` (no more audio: the server
   sends the remaining results, then `done`, and closes with 1000),
   `{"type": "close"}` (abandon the stream: closed at once, no more results),
   `{"type": "keepalive"}` (resets the idle timer).

Server -> client (text, JSON)
-----------------------------
- `{"type": "ready", "protocol": "caster.v1", "session_id": ..., "language": ...,
  "chunk_ms": ..., "sample_rate": <the client's>, "model_sample_rate": 16000}`: the stream
  is open; `chunk_ms` is the chunk size in use (it may exceed the asked one under load,
  never past `max_chunk_ms`).
- `{"type": "result", "is_final": bool, "segment": i, "text": ..., "start": s, "end": s,
  "language": ..., "confidence": c, "words": [{"text", "start", "end", "confidence"}]}`:
  an interim result is the current hypothesis of segment i and is replaced by later
  results of the same i; a final one never changes. Times are seconds of audio from
  the stream start.
- `{"type": "end_of_utterance", "segment": i, "end": s}`: after each final result.
- `{"type": "done", "duration": s, "segments": n}`: after `finalize`, then close 1000.
- `{"type": "error", "code": ..., "message": ...}`, then the close code below.

Error codes and close codes
---------------------------
bad_request 4400 (malformed JSON, unknown fields, wrong types, binary before
start, bad rate/encoding/language/chunk size), unauthorized 4401, timeout 4408
(no start message, idle, or the maximum duration: the audio so far still gets
its final results first), frame_too_large 4413, too_many_streams 4429 (server
full, or the key's limit), internal 4500, shutting_down 1001 (after the
stream's final results: the server is stopping). A client that stops reading
for `send_timeout_s` is dropped with 4408 and no message (it cannot take one).

Limits
------
Audio is read at most `max_ahead_s` ahead of real time (a faster sender is
slowed by TCP backpressure); `idle_timeout_s` without any message (send
keepalive while muted) and `max_duration_s` per stream end it.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from caster.endpoint import EndpointConfig, EndpointError
from caster.results import Segment

PROTOCOL = "caster.v1"
ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
MAX_CHANNELS = 8

# code -> WebSocket close code
CLOSE_CODES = {
    "bad_request": 4400,
    "unauthorized": 4401,
    "timeout": 4408,
    "frame_too_large": 4413,
    "too_many_streams": 4429,
    "internal": 4500,
    "shutting_down": 1001,
}


class ProtocolError(ValueError):
    """A client broke the protocol; `code` is one of CLOSE_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        if code not in CLOSE_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return CLOSE_CODES[self.code]


@dataclass(frozen=True)
class StreamConfig:
    """What a client asked for at the start of a stream (either protocol)."""

    language: str | None = None
    chunk_ms: int | None = None
    max_chunk_ms: int | None = None
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1
    interim_results: bool = True
    endpointing: EndpointConfig = field(default_factory=EndpointConfig)


_START_FIELDS = {
    "type": str,
    "language": (str, type(None)),
    "chunk_ms": (int, type(None)),
    "max_chunk_ms": (int, type(None)),
    "sample_rate": int,
    "encoding": str,
    "channels": int,
    "interim_results": bool,
    "endpointing": dict,
}
_ENDPOINT_FIELDS = {
    "silence_ms": (int, type(None)),
    "max_segment_ms": (int, type(None)),
    "vad": bool,
    "vad_threshold": (float, int),
}


def parse_json(text: str) -> dict[str, Any]:
    """A client's text message as a JSON object with a string `type`.

    Raises:
        ProtocolError: not JSON, not an object, or no string `type`.
    """
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError("bad_request", f"message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("bad_request", 'message needs a string "type"')
    return message


def parse_start(message: dict[str, Any]) -> StreamConfig:
    """Validate a start message (already `parse_json`ed).

    Raises:
        ProtocolError: wrong type, unknown fields, values of the wrong type or range.
    """
    if message.get("type") != "start":
        raise ProtocolError(
            "bad_request", f'the first message must be {{"type": "start"}}, got {message["type"]!r}'
        )
    _check_fields(message, _START_FIELDS, "start message")
    endpoint = message.get("endpointing", {})
    _check_fields(endpoint, _ENDPOINT_FIELDS, "endpointing")
    try:
        endpointing = EndpointConfig(**{**EndpointConfig().to_dict(), **endpoint})
    except EndpointError as e:
        raise ProtocolError("bad_request", str(e)) from None
    config = StreamConfig(
        language=message.get("language"),
        chunk_ms=message.get("chunk_ms"),
        max_chunk_ms=message.get("max_chunk_ms"),
        sample_rate=message.get("sample_rate", 16000),
        encoding=message.get("encoding", "pcm_s16le"),
        channels=message.get("channels", 1),
        interim_results=message.get("interim_results", True),
        endpointing=endpointing,
    )
    check_audio_format(config)
    return config


def check_audio_format(config: StreamConfig) -> None:
    """Raise ProtocolError for an unusable encoding, sample rate, channel count or chunk range."""
    if config.encoding not in ENCODINGS:
        raise ProtocolError(
            "bad_request",
            f"encoding {config.encoding!r} is not supported; use one of {', '.join(ENCODINGS)}",
        )
    if not MIN_SAMPLE_RATE <= config.sample_rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            "bad_request",
            f"sample_rate {config.sample_rate} is out of range "
            f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz",
        )
    if not 1 <= config.channels <= MAX_CHANNELS:
        raise ProtocolError("bad_request", f"channels must be 1 to {MAX_CHANNELS}")
    if config.max_chunk_ms is not None and (
        config.chunk_ms is None or config.max_chunk_ms < config.chunk_ms
    ):
        raise ProtocolError("bad_request", "max_chunk_ms needs a chunk_ms no larger than it")


def _check_fields(obj: dict[str, Any], spec: dict[str, Any], what: str) -> None:
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise ProtocolError("bad_request", f"unknown field(s) in {what}: {', '.join(unknown)}")
    for name, value in obj.items():
        kinds = spec[name]
        # bool is an int subclass: true must not pass as a sample rate.
        wrong_bool = isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)
        )
        if wrong_bool or not isinstance(value, kinds):
            raise ProtocolError(
                "bad_request", f"{what} field {name!r} has the wrong type: {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("bad_request", f"{what} field {name!r} must be finite")


class AudioDecoder:
    """Raw client frames -> mono float32 samples at the model's rate, incrementally.

    Bytes of a sample (or of a multi-channel frame) split across messages are
    kept for the next message; resampling is one continuous soxr stream, so the
    result does not depend on how the client cut its frames.
    """

    def __init__(self, config: StreamConfig, target_rate: int) -> None:
        self.dtype = ENCODINGS[config.encoding]
        self.channels = config.channels
        self.frame_bytes = self.dtype.itemsize * config.channels
        self.source_rate = config.sample_rate
        self.seconds = 0.0  # audio received so far
        self._carry = b""
        self._resampler = (
            None
            if config.sample_rate == target_rate
            # "VHQ" as caster.audio.resample: a stream gives what a file of it gives.
            else soxr.ResampleStream(
                config.sample_rate, target_rate, 1, dtype="float32", quality="VHQ"
            )
        )

    def decode(self, data: bytes, last: bool = False) -> np.ndarray:
        """Samples (N,) float32 for this message (may be empty).

        Raises:
            ProtocolError: non-finite float samples, or a partial sample at the end.
        """
        data = self._carry + data
        whole = len(data) - len(data) % self.frame_bytes
        self._carry = data[whole:]
        if last and self._carry:
            raise ProtocolError("bad_request", "the audio ends inside a sample")
        raw = np.frombuffer(data[:whole], dtype=self.dtype)
        if self.dtype.kind == "i":
            samples = raw.astype(np.float32) / 32768.0
        else:
            samples = raw.astype(np.float32)
            if not np.isfinite(samples).all():
                raise ProtocolError("bad_request", "float32 audio contains NaN or infinity")
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1)  # (N, C) -> (N,)
        self.seconds += len(samples) / self.source_rate
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        return np.ascontiguousarray(samples, dtype=np.float32)


class Action(enum.Enum):
    """What a client's control message asks for."""

    FINISH = "finish"  # no more audio: send the remaining results, then close
    ABORT = "abort"  # close now, drop the stream
    KEEPALIVE = "keepalive"  # nothing, but the client is alive
    FLUSH = "flush"  # finish the audio so far, then go on with a new stream (Deepgram)


def segment_message(segment: Segment, offset: float) -> dict[str, Any]:
    """A `result` message; times shifted by `offset` seconds."""
    return {
        "type": "result",
        "is_final": segment.is_final,
        "segment": segment.index,
        "text": segment.text,
        "start": round(segment.start + offset, 3),
        "end": round(segment.end + offset, 3),
        "language": segment.language,
        "confidence": round(segment.confidence, 4),
        "words": [
            {
                "text": w.text,
                "start": round(w.start + offset, 3),
                "end": round(w.end + offset, 3),
                "confidence": round(w.confidence, 4),
            }
            for w in segment.words
        ],
    }


class NativeDialect:
    """caster.v1 messages (the module docstring)."""

    name = "caster"

    def __init__(self, query: Mapping[str, str], session_id: str) -> None:
        self.query = query
        self.session_id = session_id

    def start(self, message: dict[str, Any] | None) -> StreamConfig:
        if message is None:
            raise ProtocolError("bad_request", 'send a {"type": "start"} message before audio')
        return parse_start(message)

    @property
    def needs_start_message(self) -> bool:
        return True

    def ready(
        self, config: StreamConfig, chunk_ms: int | None, model_rate: int
    ) -> dict[str, Any] | None:
        return {
            "type": "ready",
            "protocol": PROTOCOL,
            "session_id": self.session_id,
            "language": config.language,
            "chunk_ms": chunk_ms,
            "sample_rate": config.sample_rate,
            "model_sample_rate": model_rate,
        }

    def results(
        self, segment: Segment, offset: float, interim: bool, from_finalize: bool
    ) -> list[dict[str, Any]]:
        if not segment.is_final and not interim:
            return []
        messages = [segment_message(segment, offset)]
        if segment.is_final:
            end = round(segment.end + offset, 3)
            messages.append({"type": "end_of_utterance", "segment": segment.index, "end": end})
        return messages

    def control(self, message: dict[str, Any]) -> Action:
        kind = message["type"]
        actions = {"finalize": Action.FINISH, "close": Action.ABORT, "keepalive": Action.KEEPALIVE}
        if kind == "start":
            raise ProtocolError("bad_request", "the stream has already started")
        if kind not in actions:
            raise ProtocolError(
                "bad_request",
                f"unknown message type {kind!r}; expected finalize, close or keepalive",
            )
        if set(message) != {"type"}:
            raise ProtocolError("bad_request", f"{kind} takes no fields besides type")
        return actions[kind]

    def done(self, duration: float, finals: int) -> dict[str, Any]:
        return {"type": "done", "duration": round(duration, 3), "segments": finals}

    def error(self, error: ProtocolError) -> dict[str, Any]:
        return {"type": "error", "code": error.code, "message": error.message}
