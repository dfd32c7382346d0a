"""A subset of Deepgram's live transcription API, so that Deepgram clients connect unchanged.

A WebSocket to `/v1/listen` whose query names any Deepgram parameter (the
official SDKs always send `model`) speaks this dialect. Understood parameters:

- `encoding`: `linear16` (required: containerised audio is not supported);
- `sample_rate` (default 16000; any rate, resampled), `channels` (averaged to mono);
- `language`: a locale or short form; `multi` means the model's `auto`;
- `interim_results`: `true`/`false` (default false, as Deepgram's);
- `endpointing`: silence in ms that ends an utterance, or `false`;
- `utterance_end_ms`: send `UtteranceEnd` after each final result;
- `model`, `punctuate`, `smart_format`, `vad_events`, ... are accepted and ignored.

Messages: the server sends `Results` (with `is_final`, `speech_final`,
`from_finalize`, one alternative with words), `UtteranceEnd`, a `Metadata`
message before it closes after `CloseStream`, and `Error`. The client sends
binary audio and `KeepAlive`, `Finalize` (decode the audio so far; the stream
goes on) or `CloseStream`. The key: `Authorization: Token KEY` (or Bearer),
or the `token, KEY` WebSocket subprotocol.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from caster.endpoint import EndpointConfig, EndpointError
from caster.results import Segment
from caster.server.protocol import (
    Action,
    ProtocolError,
    StreamConfig,
    check_audio_format,
)

# Query parameters that mark a connection as a Deepgram client.
PARAMETERS = frozenset(
    {
        "model", "encoding", "sample_rate", "channels", "language", "interim_results",
        "endpointing", "utterance_end_ms", "punctuate", "smart_format", "vad_events",
        "diarize", "numerals", "profanity_filter", "filler_words", "multichannel",
        "version", "tier", "keywords", "keyterm", "tag", "mip_opt_out", "dictation",
        "redact", "replace", "search", "extra", "no_delay",
    }
)  # fmt: skip
_ENCODINGS = {"linear16": "pcm_s16le"}


def is_deepgram(query: Mapping[str, str]) -> bool:
    """Whether a `/v1/listen` query names Deepgram parameters."""
    return any(name in PARAMETERS for name in query)


class DeepgramDialect:
    """Deepgram's `/v1/listen` messages over caster's streams."""

    name = "deepgram"
    needs_start_message = False

    def __init__(self, query: Mapping[str, str], session_id: str) -> None:
        self.query = query
        self.session_id = session_id
        self.utterance_end = False

    def start(self, message: dict[str, Any] | None) -> StreamConfig:
        query = self.query
        encoding = query.get("encoding")
        if encoding not in _ENCODINGS:
            raise ProtocolError(
                "bad_request",
                f"encoding={encoding} is not supported: send raw audio with encoding=linear16",
            )
        language = query.get("language")
        if language == "multi":
            language = "auto"
        endpointing = EndpointConfig()
        if "endpointing" in query:
            value = query["endpointing"]
            silence = None if value.lower() == "false" else _int(query, "endpointing")
            try:
                endpointing = EndpointConfig(silence_ms=silence)
            except EndpointError as e:
                raise ProtocolError("bad_request", str(e)) from None
        self.utterance_end = "utterance_end_ms" in query and _int(query, "utterance_end_ms") > 0
        config = StreamConfig(
            language=language,
            sample_rate=_int(query, "sample_rate", 16000),
            encoding=_ENCODINGS[encoding],
            channels=_int(query, "channels", 1),
            interim_results=_bool(query, "interim_results", False),
            endpointing=endpointing,
        )
        check_audio_format(config)
        return config

    def ready(
        self, config: StreamConfig, chunk_ms: int | None, model_rate: int
    ) -> dict[str, Any] | None:
        return None  # Deepgram sends nothing until there are results

    def results(
        self, segment: Segment, offset: float, interim: bool, from_finalize: bool
    ) -> list[dict[str, Any]]:
        if not segment.is_final and not interim:
            return []
        start = round(segment.start + offset, 3)
        end = round(segment.end + offset, 3)
        alternative: dict[str, Any] = {
            "transcript": segment.text,
            "confidence": round(segment.confidence, 4),
            "words": [
                {
                    "word": w.text.lower().strip(".,?!;:\"'"),
                    "start": round(w.start + offset, 3),
                    "end": round(w.end + offset, 3),
                    "confidence": round(w.confidence, 4),
                    "punctuated_word": w.text,
                }
                for w in segment.words
            ],
        }
        if segment.language is not None:
            alternative["languages"] = [segment.language]
        messages: list[dict[str, Any]] = [
            {
                "type": "Results",
                "channel_index": [0, 1],
                "duration": round(end - start, 3),
                "start": start,
                "is_final": segment.is_final,
                "speech_final": segment.is_final,
                "from_finalize": from_finalize and segment.is_final,
                "channel": {"alternatives": [alternative]},
                "metadata": {
                    "request_id": self.session_id,
                    "model_info": {"name": "caster", "version": "1", "arch": "fastconformer-rnnt"},
                    "model_uuid": "caster",
                },
            }
        ]
        if segment.is_final and self.utterance_end:
            last = messages[0]["channel"]["alternatives"][0]["words"]
            last_end = last[-1]["end"] if last else end
            messages.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_end})
        return messages

    def control(self, message: dict[str, Any]) -> Action:
        actions = {
            "KeepAlive": Action.KEEPALIVE,
            "Finalize": Action.FLUSH,
            "CloseStream": Action.FINISH,
        }
        kind = message["type"]
        if kind not in actions:
            raise ProtocolError(
                "bad_request",
                f"unsupported message type {kind!r}; expected KeepAlive, Finalize or CloseStream",
            )
        return actions[kind]

    def done(self, duration: float, finals: int) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.session_id,
            "sha256": "",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "duration": round(duration, 3),
            "channels": 1,
        }

    def error(self, error: ProtocolError) -> dict[str, Any]:
        return {
            "type": "Error",
            "variant": error.code,
            "description": error.message,
            "code": error.code,
        }


def _int(query: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = query.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ProtocolError("bad_request", f"{name}={value} is not an integer") from None


def _bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise ProtocolError("bad_request", f"{name}={value} must be true or false")
    return value.lower() == "true"
