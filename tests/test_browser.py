"""The live-captions page in a real headless Chromium with a fake microphone.

Chromium plays a wav file as its microphone (`--use-file-for-fake-audio-capture`);
the page captures it with an AudioWorklet, streams it to `/v1/listen` and shows
the captions. The test passes only if the page's final captions equal what
`caster transcribe` gives for the same audio, and checks on the way that the
audio the page sent is that file's samples, bit for bit.

How the audio stays exact (measured with Chromium 156, Debian):
- The fake capture device runs at 44.1 kHz (stereo copies of the file's mono
  channel), so the wav is 44.1 kHz and the page's AudioContext runs at the
  track's own rate: no resampling in the browser. The server resamples to
  16 kHz as `caster transcribe` does for the same file: the test checks that
  the model gets exactly the samples `caster transcribe` reads.
- The wav is float32: Chromium converts a 16-bit wav to float asymmetrically
  (positive samples / 32767, negative / 32768), soundfile divides by 32768,
  so int16 files would reach the model 1/32767 louder on one side.
- The capture device may start before the page listens, and it loops the file. The
  file therefore starts with 1 s of exact zeros, which the page skips
  (`skipSilence`), and the page stops itself after the speech's duration
  (`?seconds=`), so it sends exactly one pass of the speech.

Needs Debian's `chromium` and Playwright's Python package
(`scripts/install_browser.sh`); skipped without them, except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from caster.audio import load_audio, resample
from tests.conftest import PROMPT_MODEL, ROOT, nemo_path

CHROMIUM = "/usr/bin/chromium"
MIC_RATE = 44_100  # the rate of Chromium's fake capture device
LEAD_IN_S = 1.0  # exact zeros before the speech: room for the page to start listening
LANGUAGE = "en-US"
CHUNK_MS = 320
# Set to NAME.png to keep screenshots of the page: NAME-interim.png while the first
# interim caption shows, NAME.png when done (bench/results/browser.png).
SCREENSHOT_ENV = "CASTER_BROWSER_SCREENSHOT"
CAPTURE_TRIES = 3  # sessions run when Chromium's fake microphone slips (see the test)


def _require_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        missing.append("Debian's chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        message = f"{' and '.join(missing)} missing: run scripts/install_browser.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Served:
    url: str
    fed: list[np.ndarray]  # every array the server fed to its engine, in order


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The app serving the prompt fixture model on a free loopback port."""
    _require_browser()
    import caster
    from caster.server import create_app, make_server

    app = create_app(caster.load(nemo_path(PROMPT_MODEL)))
    engine = app.state.hub.engine
    fed: list[np.ndarray] = []
    feed = engine.feed

    def recording_feed(stream: Any, samples: np.ndarray) -> None:
        fed.append(np.array(samples, dtype=np.float32))
        feed(stream, samples)

    engine.feed = recording_feed  # what reaches the model, to compare with the file
    server = make_server(app, log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", fed)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _caster_transcribe(path: Path) -> str:
    """The text of `caster transcribe` for one file, as a user runs it."""
    command = [
        sys.executable, "-m", "caster", "transcribe", "--no-progress",
        "--model", str(nemo_path(PROMPT_MODEL)),
        "--language", LANGUAGE, "--chunk-ms", str(CHUNK_MS), str(path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@dataclass
class PageRun:
    sent: list[bytes]  # binary WebSocket messages: the audio
    messages: list[str]  # text ones: start and finalize
    finals: list[list[str]]  # [language, text] of each final caption
    interims: int  # interim captions left at the end


def _run_page(served: Served, mic_wav: Path, seconds: float) -> PageRun:
    """One live-captions session in headless Chromium with `mic_wav` as the microphone."""
    from playwright.sync_api import sync_playwright

    sent: list[bytes] = []  # binary WebSocket messages: the audio
    messages: list[str] = []  # text ones: start and finalize
    served.fed.clear()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync",  # Playwright gives it a new empty profile directory
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}",
            ],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 960, "height": 420})
            page.on(
                "websocket",
                lambda ws: ws.on(
                    "framesent",
                    lambda payload: (sent if isinstance(payload, bytes) else messages).append(
                        payload
                    ),
                ),
            )
            page.goto(
                f"{served.url}/?language={LANGUAGE}&chunk_ms={CHUNK_MS}&seconds={seconds:.6f}"
            )
            page.click("#start")
            screenshot = os.environ.get(SCREENSHOT_ENV)
            if screenshot:
                page.wait_for_selector(".segment.interim", timeout=30_000)
                page.screenshot(path=screenshot.removesuffix(".png") + "-interim.png")
            page.wait_for_function(
                "['done', 'error'].includes(document.body.dataset.state)", timeout=30_000
            )
            status = page.inner_text("#status")
            assert page.evaluate("document.body.dataset.state") == "done", status
            finals = page.eval_on_selector_all(
                ".segment.final",
                "rows => rows.map(r => [r.querySelector('.lang').textContent,"
                " r.querySelector('.text').textContent])",
            )
            interims = page.locator(".segment.interim").count()
            if screenshot:
                page.screenshot(path=screenshot)
        finally:
            browser.close()
    return PageRun(sent, messages, finals, interims)


def test_page_captions_equal_caster_transcribe(
    served: Served, oracle: dict[str, np.ndarray], tmp_path: Path
) -> None:
    speech = resample(oracle["inputs/wave_a"], 16_000, MIC_RATE)  # (176400,) float32
    assert speech[0] != 0, "the page starts sending at the first non-zero sample"
    seconds = len(speech) / MIC_RATE
    speech_wav, mic_wav = tmp_path / "speech.wav", tmp_path / "mic.wav"
    sf.write(speech_wav, speech, MIC_RATE, subtype="FLOAT")
    lead_in = np.zeros(round(LEAD_IN_S * MIC_RATE), np.float32)
    sf.write(mic_wav, np.concatenate([lead_in, speech]), MIC_RATE, subtype="FLOAT")
    expected = _caster_transcribe(speech_wav)
    assert expected, "caster transcribe gave no text: the comparison would be empty"

    # Chromium's fake capture device plays the file in real time; on a loaded machine it
    # now and then slips a block (same length, later samples shifted). That is detected
    # exactly (the page's audio is compared with the file) and the session is run again.
    for _ in range(CAPTURE_TRIES):
        run = _run_page(served, mic_wav, seconds)
        audio = np.frombuffer(b"".join(run.sent), dtype="<f4")
        if np.array_equal(audio, speech):
            break
    start = json.loads(run.messages[0])
    assert (start["sample_rate"], start["encoding"]) == (MIC_RATE, "f32le"), (
        f"the page captured at {start['sample_rate']} Hz: this Chromium's fake microphone "
        f"does not run at the {MIC_RATE} Hz of the test's wav, so it resampled the file"
    )
    assert len(audio) == len(speech), f"the page sent {len(audio)} samples, not {len(speech)}"
    assert np.array_equal(audio, speech), (
        f"the page did not send the file's samples unaltered in {CAPTURE_TRIES} sessions"
    )
    model_input = np.concatenate(served.fed)
    assert np.array_equal(model_input, load_audio(speech_wav)), (
        f"the server fed the model {len(model_input)} samples that are not what caster "
        f"transcribe reads from the file ({len(load_audio(speech_wav))} samples)"
    )
    assert run.interims == 0, "an interim caption was left after the stream finished"
    assert run.finals, "no final captions"
    assert {language for language, _ in run.finals} == {LANGUAGE}
    assert " ".join(text for _, text in run.finals) == expected
