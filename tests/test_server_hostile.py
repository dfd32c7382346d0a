"""Hostile clients on real loopback sockets: each gets its clear error or close code,
the server stays up, and a well-behaved stream running at the same time gets
exactly the results it gets from a quiet server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from conftest import PROMPT_MODEL, nemo_path  # noqa: E402
from test_server import WAIT_S, finals, pcm16, refused, running_server  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import caster  # noqa: E402

KEY = {"Authorization": "Bearer good"}
SETTINGS = {
    "api_keys": ("good",),
    "max_frame_bytes": 64 * 1024,
    "start_timeout_s": 1.0,
    "idle_timeout_s": 1.0,
    "max_ahead_s": 0.5,
}
START = json.dumps({"type": "start", "chunk_ms": 320})


@pytest.fixture(scope="module")
def audio(oracle) -> bytes:
    return pcm16(oracle["inputs/wave_a"][:32000])  # 2 s


@pytest.fixture(scope="module")
def model() -> caster.Model:
    return caster.load(nemo_path(PROMPT_MODEL))


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, **SETTINGS) as (address, app, _):
        yield address, app


def _error_after_start(url: str, message: str | bytes) -> tuple[str, int | None]:
    with connect(url, additional_headers=KEY) as ws:
        ws.send(START)
        assert json.loads(ws.recv(WAIT_S))["type"] == "ready"
        ws.send(message)
        error = json.loads(ws.recv(WAIT_S))
        with contextlib.suppress(Exception):
            ws.recv(WAIT_S)
    return error["code"], ws.close_code


def _error(url: str, message: str | bytes | None, headers: dict | None = KEY):
    error, code = refused(url, headers, message)
    return error["code"], code


def _vanish(url: str, audio: bytes) -> tuple[str, int | None]:
    """Send half the audio, then drop the TCP connection without a close frame."""
    with contextlib.suppress(OSError), connect(url, additional_headers=KEY) as ws:
        ws.send(START)
        ws.recv(WAIT_S)
        ws.send(audio[: len(audio) // 2])
        ws.socket.shutdown(socket.SHUT_RDWR)
    return "vanished", None


def _slow_reader(url: str, audio: bytes) -> tuple[str, int | None]:
    """Send everything (faster than real time) without reading, then read late."""
    with connect(url, additional_headers=KEY) as ws:
        ws.send(START)
        for i in range(0, len(audio), 1600):
            ws.send(audio[i : i + 1600])
        ws.send(json.dumps({"type": "finalize"}))
        time.sleep(1.0)
        messages = []
        with contextlib.suppress(Exception):
            while True:
                messages.append(json.loads(ws.recv(WAIT_S)))
    return messages[-1]["type"], ws.close_code


def _deepgram_error(url: str) -> tuple[str, int | None]:
    error, code = refused(url, KEY)
    assert error["type"] == "Error"
    return error["variant"], code


def _idle(url: str) -> tuple[str, int | None]:
    """Start, keep alive once, then go silent past the idle timeout."""
    with connect(url, additional_headers=KEY) as ws:
        ws.send(START)
        ws.recv(WAIT_S)
        ws.send(json.dumps({"type": "keepalive"}))
        error = json.loads(ws.recv(WAIT_S))
        with contextlib.suppress(Exception):
            ws.recv(WAIT_S)
    return error["code"], ws.close_code


def _cases(audio: bytes) -> dict[str, tuple[Callable[[str], tuple[str, int | None]], tuple]]:
    """name -> (client(url), (expected code, expected close code))."""
    bad = ("bad_request", 4400)
    nan = np.full(100, np.nan, "<f4").tobytes()

    def start(**fields) -> str:
        return json.dumps({"type": "start", **fields})

    def float_stream(url: str) -> tuple[str, int | None]:
        with connect(url, additional_headers=KEY) as ws:
            ws.send(start(encoding="f32le"))
            ws.recv(WAIT_S)
            ws.send(nan)
            error = json.loads(ws.recv(WAIT_S))
            with contextlib.suppress(Exception):
                ws.recv(WAIT_S)
        return error["code"], ws.close_code

    return {
        "malformed json": (lambda u: _error(u, '{"type": "start",'), bad),
        "not an object": (lambda u: _error(u, "[1, 2]"), bad),
        "unknown field": (lambda u: _error(u, start(langauge="en-US")), bad),
        "unknown endpointing field": (lambda u: _error(u, start(endpointing={"x": 1})), bad),
        "wrong type": (lambda u: _error(u, start(sample_rate="16000")), bad),
        "bool as number": (lambda u: _error(u, start(chunk_ms=True)), bad),
        "binary before start": (lambda u: _error(u, b"\x00\x01" * 800), bad),
        "zero sample rate": (lambda u: _error(u, start(sample_rate=0)), bad),
        "absurd sample rate": (lambda u: _error(u, start(sample_rate=10**9)), bad),
        "unknown encoding": (lambda u: _error(u, start(encoding="mp3")), bad),
        "unknown language": (lambda u: _error(u, start(language="xx-XX")), bad),
        "impossible chunk": (lambda u: _error(u, start(chunk_ms=100)), bad),
        "unknown control": (lambda u: _error_after_start(u, '{"type": "pause"}'), bad),
        "second start": (lambda u: _error_after_start(u, START), bad),
        "nan audio": (float_stream, bad),
        "frame over limit": (
            lambda u: _error_after_start(u, b"\x00" * (64 * 1024 + 2)),
            ("frame_too_large", 4413),
        ),
        "deepgram mulaw": (
            lambda u: _deepgram_error(u + "?model=x&encoding=mulaw"),
            ("bad_request", 4400),
        ),
        "missing key": (lambda u: _error(u, None, headers=None), ("unauthorized", 4401)),
        "bad key": (
            lambda u: _error(u, None, headers={"Authorization": "Bearer goof"}),
            ("unauthorized", 4401),
        ),
        "no start message": (lambda u: _error(u, None), ("timeout", 4408)),
        "idle": (_idle, ("timeout", 4408)),
        "vanishing client": (lambda u: _vanish(u, audio), ("vanished", None)),
        "slow reader": (lambda u: _slow_reader(u, audio), ("done", 1000)),
    }


CASE_NAMES = list(_cases(b"\x00\x00" * 16000))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_client_gets_its_error(server, audio, name):
    address, _ = server
    client, expected = _cases(audio)[name]
    assert client(f"ws://{address}/v1/listen") == expected
    assert httpx.get(f"http://{address}/health", timeout=WAIT_S).status_code == 200


def _victim(address: str, audio: bytes, pace_s: float) -> list[dict]:
    """A well-behaved stream: 100 ms frames, `pace_s` apart, then finalize."""
    with connect(f"ws://{address}/v1/listen", additional_headers=KEY) as ws:
        ws.send(START)
        messages = [json.loads(ws.recv(WAIT_S))]
        for i in range(0, len(audio), 3200):
            ws.send(audio[i : i + 3200])
            time.sleep(pace_s)
        ws.send(json.dumps({"type": "finalize"}))
        with contextlib.suppress(Exception):
            while True:
                messages.append(json.loads(ws.recv(WAIT_S)))
    assert ws.close_code == 1000
    return messages


def test_other_streams_are_unharmed(server, audio):
    address, app = server
    quiet = _victim(address, audio, 0.0)
    results: dict[str, object] = {}
    victim = threading.Thread(
        target=lambda: results.setdefault("victim", _victim(address, audio, 0.1))
    )
    victim.start()
    cases = _cases(audio)
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {
            name: pool.submit(client, f"ws://{address}/v1/listen")
            for name, (client, _) in cases.items()
        }
        outcomes = {name: f.result(timeout=WAIT_S) for name, f in futures.items()}
    victim.join(WAIT_S)
    assert outcomes == {name: expected for name, (_, expected) in cases.items()}
    assert finals(results["victim"]) == finals(quiet)
    assert results["victim"][-1] == quiet[-1]  # done: same duration and segment count
    deadline = time.monotonic() + 10
    while app.state.hub.quota.active and time.monotonic() < deadline:
        time.sleep(0.05)  # the vanished client's stream is dropped
    assert app.state.hub.quota.active == 0
    assert httpx.get(f"http://{address}/ready", timeout=WAIT_S).json()["status"] == "ready"


def test_a_fast_sender_is_paced_to_real_time(server, audio):
    """2 s of audio sent at once is read no faster than max_ahead_s (0.5 s) ahead."""
    address, _ = server
    with connect(f"ws://{address}/v1/listen", additional_headers=KEY) as ws:
        ws.send(START)
        ws.recv(WAIT_S)
        began = time.monotonic()
        ws.send(audio)
        ws.send(json.dumps({"type": "finalize"}))
        with contextlib.suppress(Exception):
            while json.loads(ws.recv(WAIT_S))["type"] != "done":
                pass
        took = time.monotonic() - began
    assert ws.close_code == 1000
    assert took >= 2.0 - SETTINGS["max_ahead_s"] - 0.05


def test_max_duration_ends_a_stream_with_its_results(model, audio):
    with (
        running_server(model, max_duration_s=1.0) as (address, _, _),
        connect(f"ws://{address}/v1/listen") as ws,
    ):
        ws.send(json.dumps({"type": "start", "interim_results": False}))
        ws.recv(WAIT_S)
        ws.send(audio)  # then nothing: the limit, not the idle timeout, ends it
        received = []
        with contextlib.suppress(Exception):
            while True:
                received.append(json.loads(ws.recv(WAIT_S)))
    assert ws.close_code == 4408
    assert finals(received), "the audio before the limit still gets its results"
    assert received[-1]["code"] == "timeout" and "limit of 1 s" in received[-1]["message"]


class _StalledSocket:
    """A WebSocket whose client sends a start and audio, then stops reading."""

    def __init__(self, audio: bytes) -> None:
        self.incoming = [
            {"type": "websocket.receive", "text": START},
            {"type": "websocket.receive", "bytes": audio},
        ]
        self.sent: list[str] = []
        self.closed_with: int | None = None

    async def receive(self) -> dict:
        if self.incoming:
            return self.incoming.pop(0)
        await asyncio.Event().wait()  # the client sends nothing more
        raise AssertionError("unreachable")

    async def send_text(self, text: str) -> None:
        if self.sent:  # after "ready" the client's window is full: sends never complete
            await asyncio.Event().wait()
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = code


def test_a_stalled_reader_is_dropped(model, audio):
    """A client that stops reading blocks only its own sender; after send_timeout_s its
    stream is dropped and its engine stream closed."""
    from caster.server import ServerSettings
    from caster.server.hub import Hub
    from caster.server.protocol import NativeDialect
    from caster.server.ws import Session

    async def scenario() -> tuple[Session, Hub]:
        hub = Hub(model, ServerSettings(send_timeout_s=0.3))
        hub.engine.start()
        try:
            session = Session(_StalledSocket(audio), hub, NativeDialect({}, "s1"), "s1")
            await asyncio.wait_for(session.run(), WAIT_S)
        finally:
            hub.engine.stop()
        return session, hub

    session, hub = asyncio.run(scenario())
    assert session.outcome == "slow_reader"
    assert session.ws.closed_with == 4408
    assert hub.engine.streams == []
