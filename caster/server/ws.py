"""One realtime WebSocket connection: admission, the start, audio in, results out.

A `Session` runs two tasks: the receiver reads client messages (audio is
decoded, resampled, paced to at most `max_ahead_s` ahead of real time and fed
to the engine from a worker thread), the sender turns the engine's segment
events into messages. The session's own coroutine supervises them, so a
timeout, a stalled reader or a server shutdown ends one stream cleanly, with
its final results wherever the client can still take them. Errors are sent as
a JSON message, then the connection is closed with the error's close code
(`caster.server.protocol.CLOSE_CODES`). Nothing a client sends reaches other
streams: each stream has its own engine state, decoder and pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any, Protocol

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from caster.engine import EngineError, StreamHandle
from caster.results import Segment
from caster.server.deepgram import DeepgramDialect, is_deepgram
from caster.server.hub import Hub
from caster.server.protocol import (
    Action,
    AudioDecoder,
    NativeDialect,
    ProtocolError,
    StreamConfig,
    parse_json,
)
from caster.server.security import presented_key

log = logging.getLogger("caster.server")


class Dialect(Protocol):
    """The messages of one wire protocol (caster.v1 or the Deepgram subset)."""

    name: str
    needs_start_message: bool

    def start(self, message: dict[str, Any] | None) -> StreamConfig: ...
    def ready(
        self, config: StreamConfig, chunk_ms: int | None, model_rate: int
    ) -> dict[str, Any] | None: ...
    def results(
        self, segment: Segment, offset: float, interim: bool, from_finalize: bool
    ) -> list[dict[str, Any]]: ...
    def control(self, message: dict[str, Any]) -> Action: ...
    def done(self, duration: float, finals: int) -> dict[str, Any]: ...
    def error(self, error: ProtocolError) -> dict[str, Any]: ...


async def listen(ws: WebSocket, hub: Hub) -> None:
    """The `/v1/listen` endpoint: check the key and the quota, then run a `Session`."""
    query = dict(ws.query_params)
    session_id = secrets.token_hex(8)
    kind = DeepgramDialect if is_deepgram(query) else NativeDialect
    dialect: Dialect = kind(query, session_id)
    key = hub.keys.identify(presented_key(ws.headers, query))
    offered = ws.headers.get("sec-websocket-protocol", "")
    subprotocol = "token" if offered.split(",")[0].strip().lower() == "token" else None
    await ws.accept(subprotocol=subprotocol)
    refusal = None
    if key is None:
        refusal = ProtocolError("unauthorized", "a valid API key is required")
    elif hub.draining:
        refusal = ProtocolError("shutting_down", "the server is shutting down")
    elif (why := hub.quota.acquire(key)) is not None:
        refusal = ProtocolError("too_many_streams", why)
    if refusal is not None:
        hub.metrics.rejected.labels(refusal.code).inc()
        log.info("refused %s stream %s: %s", dialect.name, session_id, refusal.code)
        await _refuse(ws, dialect, refusal)
        return
    assert key is not None
    session = Session(ws, hub, dialect, session_id)
    hub.sessions.add(session)
    hub.metrics.active_streams.inc()
    log.info("%s stream %s opened (%s)", dialect.name, session_id, key)
    try:
        await session.run()
    finally:
        hub.sessions.discard(session)
        hub.metrics.active_streams.dec()
        hub.quota.release(key)
        log.info("stream %s closed: %s", session_id, session.outcome)


async def _refuse(ws: WebSocket, dialect: Dialect, error: ProtocolError) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.send_text(json.dumps(dialect.error(error)))
        await ws.close(error.close_code, _reason(error.message))


class Session:
    """One stream of one connection."""

    def __init__(self, ws: WebSocket, hub: Hub, dialect: Dialect, session_id: str) -> None:
        self.ws = ws
        self.hub = hub
        self.settings = hub.settings
        self.dialect = dialect
        self.id = session_id
        self.outcome = "running"
        self.config: StreamConfig | None = None
        self.handle: StreamHandle | None = None
        self.decoder: AudioDecoder | None = None
        self.offset = 0.0  # seconds of audio before the current engine stream (Finalize)
        self.fed = 0.0  # seconds of audio fed to the current engine stream
        self.finals = 0
        self.from_finalize = False
        self._send_lock = asyncio.Lock()
        self._interrupt: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._sender: asyncio.Task | None = None
        self._opened = time.monotonic()
        self._first_audio: float | None = None

    def interrupt(self, reason: str) -> None:
        """Stop the session from outside its tasks: "shutdown", "slow_reader", "vanished",
        "internal"."""
        if not self._interrupt.done():
            self._interrupt.set_result(reason)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._sender is not None:
                self._sender.cancel()
            if self.handle is not None:
                self.handle.close()

    async def _run(self) -> None:
        try:
            self.config = await self._start()
            self._open(self.config, chunk_ms=self.hub.chunk_ms_for(self.config))
        except ProtocolError as e:
            await self._fail(e)
            return
        except WebSocketDisconnect:
            self.outcome = "vanished"
            return
        ready = self.dialect.ready(self.config, self._chunk_ms, self.hub.sample_rate)
        if ready is not None and not await self._try_send(ready):
            self.outcome = "vanished"
            return
        receiver = asyncio.create_task(self._receive())
        await asyncio.wait({receiver, self._interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if not receiver.done():
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver
            await self._interrupted(self._interrupt.result())
            return
        try:
            action = receiver.result()
        except ProtocolError as e:
            if e.code == "timeout":  # the audio so far still gets its results
                await self._drain()
            await self._fail(e)
            return
        except (EngineError, ValueError, LookupError) as e:
            log.exception("stream %s failed", self.id)
            await self._fail(ProtocolError("internal", f"the stream failed: {e}"))
            return
        if action is Action.FINISH:
            await self._drain()
            self.outcome = "finished"
            if await self._try_send(self.dialect.done(self.offset + self.fed, self.finals)):
                await self._close(1000, "done")
        elif action is Action.ABORT:
            self.outcome = "closed by client"
            await self._close(1000, "closed")
        else:
            self.outcome = "vanished"

    async def _start(self) -> StreamConfig:
        if not self.dialect.needs_start_message:
            return self.dialect.start(None)
        try:
            message = await asyncio.wait_for(self.ws.receive(), self.settings.start_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(
                "timeout", f"no start message within {self.settings.start_timeout_s:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("text") is None:
            return self.dialect.start(None)
        return self.dialect.start(parse_json(message["text"]))

    def _open(self, config: StreamConfig, chunk_ms: int | None) -> None:
        try:
            self.handle = self.hub.engine.open(config.language, chunk_ms, config.endpointing)
        except (ValueError, LookupError) as e:  # a language or chunk size the model lacks
            raise ProtocolError("bad_request", str(e)) from None
        self._chunk_ms = chunk_ms
        self.decoder = AudioDecoder(config, self.hub.sample_rate)
        self.hub.metrics.streams.labels(self.dialect.name).inc()
        self._sender = asyncio.create_task(self._send_events(self.handle))

    async def _receive(self) -> Action | None:
        """Read client messages until the client finishes or aborts (None: it vanished)."""
        settings = self.settings
        last_message = time.monotonic()
        while True:
            now = time.monotonic()
            idle_left = last_message + settings.idle_timeout_s - now
            duration_left = self._opened + settings.max_duration_s - now
            try:
                message = await asyncio.wait_for(
                    self.ws.receive(), max(0.0, min(idle_left, duration_left))
                )
            except asyncio.TimeoutError:
                if duration_left <= idle_left:
                    raise ProtocolError(
                        "timeout", f"the stream reached its limit of {settings.max_duration_s:g} s"
                    ) from None
                raise ProtocolError(
                    "timeout", f"no message for {settings.idle_timeout_s:g} s"
                ) from None
            if message["type"] == "websocket.disconnect":
                return None
            data = message.get("bytes")
            if data is not None:
                await self._audio(data)
            else:
                action = self.dialect.control(parse_json(message.get("text") or ""))
                if action is Action.FLUSH:
                    await self._flush()
                elif action is not Action.KEEPALIVE:
                    return action
            # After the message is handled: time spent pacing is not the client's idleness.
            last_message = time.monotonic()

    async def _audio(self, data: bytes) -> None:
        if len(data) > self.settings.max_frame_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"an audio message has {len(data)} bytes; the limit is "
                f"{self.settings.max_frame_bytes}",
            )
        assert self.decoder is not None and self.handle is not None
        samples = self.decoder.decode(data)
        now = time.monotonic()
        if self._first_audio is None:
            self._first_audio = now
        if len(samples):
            await asyncio.to_thread(self.handle.feed, samples)
            seconds = len(samples) / self.hub.sample_rate
            self.fed += seconds
            self.hub.metrics.observe_audio(seconds)
        # Pacing: reading no further ahead of real time bounds this stream's backlog;
        # a faster client waits on TCP backpressure, not on other streams.
        ahead = self.decoder.seconds - (now - self._first_audio)
        if ahead > self.settings.max_ahead_s:
            await asyncio.sleep(ahead - self.settings.max_ahead_s)

    async def _flush(self) -> None:
        """Decode the audio so far as if it ended, then go on with a fresh engine stream."""
        assert self.config is not None
        self.from_finalize = True
        await self._drain()
        self.from_finalize = False
        assert self.handle is not None
        self.handle.close()
        self.offset += self.fed
        self.fed = 0.0
        self._open(self.config, self._chunk_ms)

    async def _drain(self) -> None:
        """End the engine stream and wait until its last results are sent."""
        if self.handle is None or self._sender is None:
            return
        # The resampler's last samples (a partial sample at the end is dropped).
        with contextlib.suppress(EngineError, LookupError, ProtocolError):
            tail = self.decoder.decode(b"", last=True) if self.decoder else np.zeros(0)
            if len(tail):
                await asyncio.to_thread(self.handle.feed, tail)
                self.fed += len(tail) / self.hub.sample_rate
        with contextlib.suppress(EngineError, LookupError):
            await asyncio.to_thread(self.handle.end)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._sender), self.settings.drain_timeout_s)

    async def _send_events(self, handle: StreamHandle) -> None:
        assert self.config is not None
        offset = self.offset
        try:
            async for segment in handle:
                for message in self.dialect.results(
                    segment, offset, self.config.interim_results, self.from_finalize
                ):
                    await asyncio.wait_for(self._send(message), self.settings.send_timeout_s)
                self.finals += segment.is_final
        except asyncio.TimeoutError:
            self.interrupt("slow_reader")
        except (EngineError, RuntimeError) as e:
            log.error("stream %s: engine failed: %s", self.id, e)
            self.interrupt("internal")
        except Exception:  # the socket is gone: the receiver will see the disconnect
            self.interrupt("vanished")

    async def _interrupted(self, reason: str) -> None:
        self.outcome = reason
        if reason == "shutdown":
            await self._drain()
            await self._fail(ProtocolError("shutting_down", "the server is shutting down"))
        elif reason == "slow_reader":
            # It cannot take a message now; try a close frame, briefly.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(4408, "stalled reader"), 1.0)
        elif reason == "internal":
            await self._fail(ProtocolError("internal", "the engine failed"))

    async def _fail(self, error: ProtocolError) -> None:
        if self.outcome == "running":
            self.outcome = error.code
        if await self._try_send(self.dialect.error(error)):
            await self._close(error.close_code, _reason(error.message))

    async def _try_send(self, message: dict[str, Any]) -> bool:
        """Send unless the client is gone or stalled; whether it was sent."""
        try:
            await asyncio.wait_for(self._send(message), self.settings.send_timeout_s)
        except Exception:
            return False
        return True

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message, ensure_ascii=False))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), 2.0)


def _reason(text: str) -> str:
    """A close reason: at most 123 bytes of UTF-8 (RFC 6455)."""
    return text.encode()[:120].decode(errors="ignore")
