"""HTTP endpoints: OpenAI-compatible file transcription, health, readiness and metrics.

`POST /v1/audio/transcriptions` takes OpenAI's multipart form: `file` (any
format `caster.audio.load_audio` reads), `model` (accepted, any value),
`language` (a locale or short form; default auto), `response_format` (`json`,
`text`, `srt`, `vtt`, `verbose_json`), `timestamp_granularities[]` (`segment`,
`word`: words in verbose_json), and caster's own `chunk_ms`; `prompt` and
`temperature` are accepted and ignored. Errors use OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Message, Receive

from caster.audio import AudioError
from caster.formats import to_srt, to_vtt
from caster.server.hub import Hub
from caster.server.metrics import CONTENT_TYPE
from caster.server.security import presented_key
from caster.transcribe import FileResult, transcribe_many

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_FIELDS = {
    "file", "model", "language", "prompt", "response_format", "temperature",
    "timestamp_granularities[]", "timestamp_granularities", "chunk_ms",
}  # fmt: skip


class RequestError(ValueError):
    """A bad transcription request: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ("invalid_request_error" if status == 400 else "error")

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


async def transcriptions(request: Request) -> Response:
    """`POST /v1/audio/transcriptions`."""
    hub: Hub = request.app.state.hub
    fmt = "unknown"
    try:
        if hub.keys.identify(presented_key(request.headers, request.query_params)) is None:
            hub.metrics.rejected.labels("unauthorized").inc()
            raise RequestError(401, "a valid API key is required", code="invalid_api_key")
        form = await _form(request, hub.settings.max_upload_bytes)
        fmt = form.get("response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            fmt = "unknown"
            raise RequestError(
                400,
                f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                "response_format",
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "the form needs an audio file in field 'file'", "file")
        audio = await upload.read()
        language = form.get("language") or None
        chunk_ms = _chunk_ms(form.get("chunk_ms"))
        granularities = set(form.getlist("timestamp_granularities[]")) | set(
            form.getlist("timestamp_granularities")
        )
        if not granularities <= {"word", "segment"}:
            message = "timestamp_granularities must be word and/or segment"
            raise RequestError(400, message, "timestamp_granularities")
        async with hub.http_slots:
            result = await asyncio.to_thread(_transcribe, hub, audio, language, chunk_ms)
    except RequestError as e:
        hub.metrics.transcriptions.labels(fmt, str(e.status)).inc()
        return e.response()
    hub.metrics.transcriptions.labels(fmt, "200").inc()
    return _render(result, fmt, "word" in granularities)


def _transcribe(hub: Hub, audio: bytes, language: str | None, chunk_ms: int | None) -> FileResult:
    try:
        return next(transcribe_many(hub.model, [audio], language, chunk_ms, errors="raise"))
    except AudioError as e:
        raise RequestError(400, f"the file could not be read as audio: {e}", "file") from None
    except (ValueError, LookupError) as e:  # language or chunk size the model lacks
        raise RequestError(400, str(e), "language") from None


async def _form(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the upload is larger than the limit of {limit} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send the audio as multipart/form-data")
    # The length may be absent (chunked): count what arrives as well.
    limited = Request(request.scope, receive=_limited(request.receive, limit))
    try:
        form = await limited.form(max_files=1, max_fields=len(_FIELDS))
    except RequestError:
        raise
    except Exception as e:  # python-multipart's and starlette's parse errors
        raise RequestError(400, f"malformed multipart form: {e}") from None
    unknown = sorted(set(form.keys()) - _FIELDS)
    if unknown:
        raise RequestError(400, f"unknown form field(s): {', '.join(unknown)}", unknown[0])
    return form


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise RequestError(413, f"the upload is larger than the limit of {limit} bytes")
        return message

    return wrapped


def _chunk_ms(value: Any) -> int | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not value.isdigit():
        raise RequestError(400, f"chunk_ms must be a whole number of ms, got {value!r}", "chunk_ms")
    return int(value)


def _render(result: FileResult, fmt: str, words: bool) -> Response:
    if fmt == "json":
        return JSONResponse({"text": result.text})
    if fmt == "text":
        return PlainTextResponse(result.text + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(result.segments))
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(result.segments), media_type="text/vtt")
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": result.language,
        "duration": round(result.duration, 3),
        "text": result.text,
        "segments": [
            {
                "id": s.index,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.token_ids),
                "temperature": 0.0,
                "avg_logprob": round(math.log(s.confidence), 4),  # confidence is in (0, 1]
                "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
                "confidence": round(s.confidence, 4),
            }
            for s in result.segments
        ],
    }
    if words:
        body["words"] = [
            {"word": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
            for w in result.words
        ]
    return JSONResponse(body)


async def health(request: Request) -> Response:
    """`GET /health`: the process is up."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """`GET /ready`: 200 while new streams are taken, else 503 (shutting down or full)."""
    hub: Hub = request.app.state.hub
    active, most = hub.quota.active, hub.settings.max_streams
    status = "draining" if hub.draining else "full" if active >= most else "ready"
    return JSONResponse(
        {"status": status, "active_streams": active, "max_streams": most},
        status_code=200 if status == "ready" else 503,
    )


async def metrics(request: Request) -> Response:
    """`GET /metrics`: Prometheus text format."""
    hub: Hub = request.app.state.hub
    return Response(hub.metrics.render(), media_type=CONTENT_TYPE)
