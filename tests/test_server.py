"""Round trips through `caster serve`'s app on real loopback sockets.

A uvicorn server runs in a thread on 127.0.0.1 with a free port; clients are
the `websockets` library, httpx, and (when installed) Deepgram's and OpenAI's
own SDKs. Results are compared with the same engine stream run in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
from conftest import PROMPT_MODEL, ROOT, nemo_path  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import caster  # noqa: E402
from caster.engine import Engine  # noqa: E402
from caster.server import ServerSettings, create_app, make_server  # noqa: E402

WAIT_S = 60  # the longest any single receive may take (a loaded CI machine)


@pytest.fixture(scope="module")
def model() -> caster.Model:
    return caster.load(nemo_path(PROMPT_MODEL))


@pytest.fixture(scope="module")
def wave(oracle) -> np.ndarray:
    return oracle["inputs/wave_a"][:32000]  # 2 s at 16 kHz


@contextlib.contextmanager
def running_server(
    model: caster.Model, log_level: str = "warning", tls: dict | None = None, **settings
) -> Iterator[tuple[str, object, object]]:
    """Serve `model` on a free loopback port in a thread; yields (host:port, app, server)."""
    app = create_app(model, ServerSettings(**settings))
    server = make_server(app, "127.0.0.1", 0, log_level=log_level, **(tls or {}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield address, app, server
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def dequantized(audio: bytes) -> np.ndarray:
    """What the server decodes from PCM16 bytes."""
    return np.frombuffer(audio, "<i2").astype(np.float32) / 32768


def stream(
    address: str,
    audio: bytes,
    start: dict | None = None,
    frame_bytes: int = 3200,
    headers: dict | None = None,
    query: str = "",
) -> tuple[list[dict], int | None]:
    """Send a start message, the audio in frames, finalize; return (messages, close code)."""
    messages = []
    with connect(f"ws://{address}/v1/listen{query}", additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "start", **(start or {})}))
        messages.append(json.loads(ws.recv(WAIT_S)))
        for i in range(0, len(audio), frame_bytes):
            ws.send(audio[i : i + frame_bytes])
        ws.send(json.dumps({"type": "finalize"}))
        with contextlib.suppress(Exception):
            while True:
                messages.append(json.loads(ws.recv(WAIT_S)))
    return messages, ws.close_code


def refused(url: str, headers: dict | None = None, send: str | bytes | None = None):
    """Connect (and send one message); return (the error message, the close code)."""
    with connect(url, additional_headers=headers) as ws:
        if send is not None:
            ws.send(send)
        error = json.loads(ws.recv(WAIT_S))
        with contextlib.suppress(Exception):
            ws.recv(WAIT_S)
    return error, ws.close_code


def finals(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["type"] == "result" and m["is_final"]]


def reference(model: caster.Model, samples: np.ndarray, language: str, chunk_ms: int) -> list:
    """The same stream's final segments, computed in-process."""
    engine = Engine(model)
    handle = engine.open(language, chunk_ms)
    handle.feed(samples)
    return list(handle.finish().segments)


def test_websocket_round_trip_matches_engine(model, wave):
    audio = pcm16(wave)
    expected = reference(model, dequantized(audio), "auto", 320)
    assert expected, "the fixture audio should give at least one segment"
    with running_server(model) as (address, _, _):
        messages, code = stream(address, audio, {"language": "auto", "chunk_ms": 320})
    assert code == 1000
    assert messages[0]["type"] == "ready" and messages[0]["chunk_ms"] == 320
    got = finals(messages)
    assert [m["text"] for m in got] == [s.text for s in expected]
    assert [m["end"] for m in got] == [s.end for s in expected]
    assert all(m["language"] == "en-US" for m in got)
    assert messages[-1] == {"type": "done", "duration": 2.0, "segments": len(got)}
    assert [m["type"] for m in messages[-2:]] == ["end_of_utterance", "done"]
    words = [w for m in got for w in m["words"]]
    assert words and all(0 <= w["start"] <= w["end"] <= 2.0 for w in words)


def test_float32_at_another_rate_in_odd_frames_is_resampled(model, wave):
    """f32le at 8 kHz, stereo, cut at byte offsets inside samples: decoded like one buffer."""
    import soxr

    low = soxr.resample(wave, 16000, 8000).astype("<f4")
    stereo = np.stack([low, low], axis=1).tobytes()  # (N, 2) interleaved
    resampled = soxr.ResampleStream(8000, 16000, 1, dtype="float32").resample_chunk(low, last=True)
    expected = reference(model, resampled, "en-US", 160)
    start = {"language": "en-US", "chunk_ms": 160, "encoding": "f32le"}
    start |= {"sample_rate": 8000, "channels": 2, "interim_results": False}
    with running_server(model) as (address, _, _):
        messages, code = stream(address, stereo, start, frame_bytes=1001)
    assert code == 1000
    assert not [m for m in messages if m["type"] == "result" and not m["is_final"]]
    assert [m["text"] for m in finals(messages)] == [s.text for s in expected]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK imports websockets.legacy
def test_deepgram_sdk_connects_unchanged(model, wave):
    deepgram = pytest.importorskip("deepgram")
    from deepgram.environment import DeepgramClientEnvironment

    audio = pcm16(wave)
    expected = reference(model, dequantized(audio), "auto", None)
    with running_server(model, api_keys=("dg-secret",)) as (address, _, _):
        env = DeepgramClientEnvironment(
            base=f"http://{address}",
            production=f"ws://{address}",
            agent=f"ws://{address}",
            agent_rest=f"http://{address}",
        )
        client = deepgram.DeepgramClient(api_key="dg-secret", environment=env)
        options = {"model": "nova-3", "encoding": "linear16", "sample_rate": 16000}
        with client.listen.v1.connect(**options, interim_results=True, language="multi") as conn:
            for i in range(0, len(audio), 6400):
                conn.send_media(audio[i : i + 6400])
            conn.send_close_stream()
            received = list(conn)
    kinds = [type(m).__name__ for m in received]
    assert kinds[-1] == "ListenV1Metadata" and received[-1].duration == 2.0
    results = [m for m in received if type(m).__name__ == "ListenV1Results"]
    final = [m for m in results if m.is_final]
    assert all(m.speech_final for m in final)
    assert len(final) < len(results), "interim results were asked for"
    assert [m.channel.alternatives[0].transcript for m in final] == [s.text for s in expected]
    assert final[0].channel.alternatives[0].words[0].punctuated_word


def test_deepgram_finalize_keeps_the_stream_going(model, wave):
    """Finalize: results of the audio so far (from_finalize), then the stream goes on."""
    audio = pcm16(wave)
    with running_server(model) as (address, _, _):
        url = f"ws://{address}/v1/listen?model=x&encoding=linear16&sample_rate=16000"
        with connect(url) as ws:
            ws.send(audio)
            ws.send(json.dumps({"type": "Finalize"}))
            ws.send(json.dumps({"type": "KeepAlive"}))
            ws.send(audio)
            ws.send(json.dumps({"type": "CloseStream"}))
            received = []
            with contextlib.suppress(Exception):
                while True:
                    received.append(json.loads(ws.recv(WAIT_S)))
    results = [m for m in received if m["type"] == "Results"]
    assert len(results) == 2 and all(m["is_final"] for m in results)
    assert results[0]["from_finalize"] and not results[1]["from_finalize"]
    first, second = (m["channel"]["alternatives"][0] for m in results)
    assert first["transcript"] == second["transcript"]
    # The second copy's times continue after the first 2 s.
    assert second["words"][0]["start"] == pytest.approx(first["words"][0]["start"] + 2.0)
    assert received[-1]["type"] == "Metadata" and received[-1]["duration"] == 4.0


@pytest.fixture(scope="module")
def wav_bytes(wave) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_openai_transcriptions_every_format(model, wav_bytes):
    expected = model.transcribe(wav_bytes, "auto").text.strip()
    url_path = "/v1/audio/transcriptions"
    with running_server(model, api_keys=("k1",)) as (address, _, _):
        client = httpx.Client(base_url=f"http://{address}", timeout=WAIT_S)
        auth = {"Authorization": "Bearer k1"}

        def post(**data) -> httpx.Response:
            files = {"file": ("a.wav", wav_bytes, "audio/wav")}
            return client.post(
                url_path, files=files, data={"model": "caster", **data}, headers=auth
            )

        assert post().json() == {"text": expected}
        assert post(response_format="text").text == expected + "\n"
        srt = post(response_format="srt").text
        assert srt.startswith("1\n00:00:00,000 --> ") and expected in srt
        vtt = post(response_format="vtt")
        assert vtt.text.startswith("WEBVTT\n") and vtt.headers["content-type"].startswith(
            "text/vtt"
        )
        verbose = post(response_format="verbose_json", **{"timestamp_granularities[]": "word"})
        body = verbose.json()
        assert body["text"] == expected and body["duration"] == 2.0
        assert body["language"] == "en-US"
        assert " ".join(s["text"] for s in body["segments"]) == expected
        assert [w["word"] for w in body["words"]] == expected.split()
        bad = post(response_format="docx")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
        broken = client.post(
            url_path, files={"file": ("a.wav", b"RIFF0000WAVE", "audio/wav")}, headers=auth
        )
        assert broken.status_code == 400 and "audio" in broken.json()["error"]["message"]
        unknown = post(language="xx-XX")
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "language"
        assert client.post(url_path, files={"file": ("a.wav", wav_bytes)}).status_code == 401


def test_openai_sdk_client(model, wav_bytes):
    openai = pytest.importorskip("openai")
    with running_server(model, api_keys=("k1",)) as (address, _, _):
        client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="k1", max_retries=0)
        result = client.audio.transcriptions.create(
            model="caster",
            file=("a.wav", wav_bytes),
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
        assert result.text == model.transcribe(wav_bytes, "auto").text.strip()
        assert result.words and result.segments[0].start == 0.0
        wrong = openai.OpenAI(base_url=f"http://{address}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.audio.transcriptions.create(model="caster", file=("a.wav", wav_bytes))


def test_health_ready_metrics_and_static(model, wave):
    with running_server(model, max_streams=3) as (address, _, _):
        stream(address, pcm16(wave[:8000]))
        client = httpx.Client(base_url=f"http://{address}", timeout=WAIT_S)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {
            "status": "ready",
            "active_streams": 0,
            "max_streams": 3,
        }
        text = client.get("/metrics").text
        for name in (
            "caster_active_streams 0.0",
            'caster_streams_total{protocol="caster"} 1.0',
            "caster_chunk_latency_seconds_bucket",
            "caster_real_time_factor",
            "caster_audio_seconds_total 0.5",
        ):
            assert name in text
        page = client.get("/")
        assert page.status_code in (200, 404)  # the page ships separately
        assert client.get("/v1/listen").status_code in (400, 404, 405)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_tls(model, wave, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=WAIT_S,
    )  # fmt: skip
    trust = ssl.create_default_context(cafile=str(cert))
    tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with running_server(model, tls=tls) as (address, _, _):
        assert httpx.get(f"https://{address}/health", verify=trust).status_code == 200
        with connect(f"wss://{address}/v1/listen", ssl=trust) as ws:
            ws.send(json.dumps({"type": "start"}))
            assert json.loads(ws.recv(WAIT_S))["type"] == "ready"


def test_cors_is_off_unless_origins_are_named(model):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    with running_server(model, cors_origins=("https://app.example",)) as (address, _, _):
        url = f"http://{address}/v1/audio/transcriptions"
        allowed = httpx.options(url, headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(url, headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400
    with running_server(model) as (address, _, _):
        plain = httpx.get(f"http://{address}/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in plain.headers


def test_api_keys_bearer_query_and_logs(model, wave):
    audio = pcm16(wave[:8000])
    collect = _Collect()
    names = ("uvicorn.access", "uvicorn.error", "caster.server")
    settings = {"api_keys": ("alpha", "beta-key-123"), "log_level": "info"}
    with contextlib.ExitStack() as cleanup:
        # After the start: uvicorn's logging setup replaces its loggers' handlers.
        address = cleanup.enter_context(running_server(model, **settings))[0]
        for name in names:
            logger = logging.getLogger(name)
            logger.addHandler(collect)
            cleanup.callback(logger.removeHandler, collect)
            cleanup.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.INFO)
        messages, code = stream(address, audio, headers={"Authorization": "Bearer beta-key-123"})
        assert code == 1000 and messages[-1]["type"] == "done"
        messages, code = stream(address, audio, query="?token=alpha")
        assert code == 1000 and messages[-1]["type"] == "done"
        url = f"ws://{address}/v1/listen"
        unauthorized = {"type": "error", "code": "unauthorized"}
        unauthorized["message"] = "a valid API key is required"
        assert refused(url, {"Authorization": "Bearer wrong"}) == (unauthorized, 4401)
        assert refused(url) == (unauthorized, 4401)
        assert refused(url + "?token=alph") == (unauthorized, 4401)
        # Deepgram's browser scheme: the key as the second offered subprotocol.
        deepgram = url + "?model=x&encoding=linear16"
        with connect(deepgram, subprotocols=["token", "alpha"]) as ws:
            assert ws.subprotocol == "token"
            ws.send(json.dumps({"type": "CloseStream"}))
            assert json.loads(ws.recv(WAIT_S))["type"] == "Metadata"
        assert httpx.get(f"http://{address}/v1/listen?token=alpha").status_code < 500
    logged = "\n".join(collect.lines)
    assert "/v1/listen?token=***" in logged and "opened (key-1)" in logged
    assert "alpha" not in logged and "beta-key-123" not in logged


def test_max_streams_refused_and_per_key_limit(model):
    settings = {"max_streams": 2, "api_keys": ("a", "b"), "max_streams_per_key": 1}
    with running_server(model, **settings) as (address, _, _):
        url = f"ws://{address}/v1/listen"
        start = json.dumps({"type": "start"})
        with connect(url, additional_headers={"Authorization": "Bearer a"}) as first:
            first.send(start)
            assert json.loads(first.recv(WAIT_S))["type"] == "ready"
            error, code = refused(url, {"Authorization": "Bearer a"})
            assert error["code"] == "too_many_streams" and code == 4429
            assert "API key" in error["message"]
            with connect(url, additional_headers={"Authorization": "Bearer b"}) as second:
                second.send(start)
                assert json.loads(second.recv(WAIT_S))["type"] == "ready"
                assert httpx.get(f"http://{address}/ready").json()["status"] == "full"
                error, code = refused(url, {"Authorization": "Bearer b"})
                assert error["code"] == "too_many_streams" and code == 4429
                assert "full" in error["message"]
        text = httpx.get(f"http://{address}/metrics").text
        assert 'caster_rejected_connections_total{reason="too_many_streams"} 2.0' in text


def test_load_raises_chunk_size_within_the_clients_limit(model):
    with running_server(model, max_streams=4, load_threshold=0.5) as (address, _, _):
        url = f"ws://{address}/v1/listen"
        start = {"type": "start", "chunk_ms": 160, "max_chunk_ms": 560}
        with connect(url) as quiet:
            quiet.send(json.dumps(start))
            assert json.loads(quiet.recv(WAIT_S))["chunk_ms"] == 160
            with connect(url) as loaded:
                loaded.send(json.dumps(start))
                assert json.loads(loaded.recv(WAIT_S))["chunk_ms"] == 560


def test_shutdown_gives_open_streams_their_final_results(model, wave):
    audio = pcm16(wave)
    expected = reference(model, dequantized(audio), "auto", 320)
    with running_server(model) as (address, _, server):
        with connect(f"ws://{address}/v1/listen") as ws:
            ws.send(json.dumps({"type": "start", "chunk_ms": 320, "interim_results": False}))
            assert json.loads(ws.recv(WAIT_S))["type"] == "ready"
            ws.send(audio)
            time.sleep(0.2)
            server.should_exit = True  # as SIGTERM does; no finalize from the client
            received = []
            with contextlib.suppress(Exception):
                while True:
                    received.append(json.loads(ws.recv(WAIT_S)))
        assert ws.close_code == 1001
    assert [m["text"] for m in finals(received)] == [s.text for s in expected]
    assert received[-1] == {
        "type": "error",
        "code": "shutting_down",
        "message": "the server is shutting down",
    }


def test_cli_options_and_environment(tmp_path, monkeypatch):
    import argparse

    from caster.server import cli

    monkeypatch.setenv("CASTER_MODEL", "preset:x")
    monkeypatch.setenv("CASTER_MAX_STREAMS", "5")
    monkeypatch.setenv("CASTER_API_KEYS", "k1,k2")
    keyfile = tmp_path / "keys"
    keyfile.write_text("k3\n\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--api-key-file", str(keyfile), "--cors-origin", "*"])
    settings = cli.settings_from_args(args)
    assert args.model == "preset:x" and args.port == 8000
    assert settings.max_streams == 5 and settings.api_keys == ("k1", "k2", "k3")
    assert settings.cors_origins == ("*",)
    keyfile.write_text("\n")
    with pytest.raises(ValueError, match="has no keys"):
        cli.settings_from_args(parser.parse_args(["--api-key-file", str(keyfile)]))
    monkeypatch.setenv("CASTER_PORT", "eighty")
    bad = argparse.ArgumentParser()
    cli.add_arguments(bad)
    with pytest.raises(SystemExit):
        bad.parse_args([])


def test_sigterm_drains_streams_in_a_real_process(wave):
    """`caster serve` in a subprocess: SIGTERM gives an open stream its results, then exits."""
    import os
    import queue
    import re
    import signal
    import subprocess
    import sys

    script = (
        "import argparse, sys\n"
        "from caster.server import cli\n"
        "parser = argparse.ArgumentParser()\n"
        "cli.add_arguments(parser)\n"
        "sys.exit(cli.run(parser.parse_args()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", script, "--model", str(nemo_path(PROMPT_MODEL)), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    reader = None
    try:
        # A thread reads stderr (a buffered pipe defeats select) and keeps it drained.
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in process.stderr])
        reader.start()
        deadline, address = time.monotonic() + WAIT_S, None
        while address is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                found = re.search(r"running on http://(127\.0\.0\.1:\d+)", lines.get(timeout=1))
                address = found and found.group(1)
        assert address, "the server did not start"
        with connect(f"ws://{address}/v1/listen") as ws:
            ws.send(json.dumps({"type": "start", "interim_results": False}))
            assert json.loads(ws.recv(WAIT_S))["type"] == "ready"
            ws.send(pcm16(wave))
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            received = []
            with contextlib.suppress(Exception):
                while True:
                    received.append(json.loads(ws.recv(WAIT_S)))
        assert ws.close_code == 1001
        assert finals(received) and received[-1]["code"] == "shutting_down"
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert process.wait(WAIT_S) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
        if reader is not None:
            reader.join(WAIT_S)  # at EOF once the process is gone
        process.stderr.close()
