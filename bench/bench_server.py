"""Server load: how many real-time streams one `caster serve` process holds.

N concurrent loopback clients (asyncio + websockets, caster.v1 protocol) each
stream utterances of real audio (the fixture waveform, looped) at real-time
pace in 100 ms frames, with interim results on, send `finalize` and wait for
the stream's last final result. The final-result latency of an utterance is
the time from sending its last audio byte to receiving its final result: the
server must then decode everything still pending for that stream, so a server
that falls behind real time shows it here at once. Clients start staggered
over one utterance and reconnect for the next one, like independent callers.

A stream count is *held* when the p95 latency stays below the chunk length
(the server answers before the next chunk of audio would be complete). The
sweep doubles N until that fails, then bisects; the server runs in its own
process (loaded once per model), the clients in this one, on the same cores.
Past the held count it measures the overload: the latency at twice the first
failing count, and a server limited to the held count (`max_streams`) facing
1.5x as many clients, which refuses the extra streams with close code 4429.

    python bench/bench_server.py [--model preset:nemotron-3.5-asr-streaming-0.6b]
        [--chunk-ms 320] [--seconds 20] [--out bench/results]

Without --model it runs the tiny prompt fixture model at 320 ms and the
full-size 3.5 preset (random weights: the released model's compute) at 320 and
1120 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "nemo"
FULL_SIZE = "preset:nemotron-3.5-asr-streaming-0.6b"
# (model, chunk_ms): the tiny fixture model, and the full-size architecture at the
# default latency and at its longest chunk, where one step serves 1.12 s of audio.
DEFAULT_RUNS = (
    (str(FIXTURES / "tiny_streaming_rnnt_prompt.nemo"), 320),
    (FULL_SIZE, 320),
    (FULL_SIZE, 1120),
)
SAMPLE_RATE = 16_000
FRAME_S = 0.1  # audio per WebSocket message
UTTERANCE_S = 8.0  # audio per connection: the fixture waveform looped
RESULT_TIMEOUT_S = 20.0  # a final result later than this counts as `late`
LANGUAGE = "en-US"


@dataclass
class Trial:
    """One load level: N clients for `seconds`."""

    clients: int
    max_streams: int
    utterances: int = 0  # finished with a final result
    refused: int = 0  # closed with too_many_streams (4429)
    failed: int = 0  # any other error
    late: int = 0  # no final result within RESULT_TIMEOUT_S of the last audio
    latencies_s: list[float] = field(default_factory=list)
    max_send_lag_s: float = 0.0  # how late the client's real-time pacing ran
    errors: list[str] = field(default_factory=list)  # the first few failures
    load_average: tuple[float, float] | None = None  # 1-min load before and after
    chunks: int = 0  # stream chunks the engine decoded
    step_s: float | None = None  # mean compute time of the batched step per chunk
    p50_s: float | None = None
    p95_s: float | None = None

    def summarize(self) -> None:
        if self.latencies_s:
            self.p50_s = round(float(np.percentile(self.latencies_s, 50)), 4)
            self.p95_s = round(float(np.percentile(self.latencies_s, 95)), 4)


# ------------------------------------------------------------------ server


def serve(model: str, port: int, max_streams: int) -> None:
    """Run `caster serve`'s app for `model` on 127.0.0.1:`port` (in this process)."""
    import torch

    import caster
    from caster.server import ServerSettings, create_app, make_server

    loaded = caster.load(model)
    if model.startswith("preset:"):
        # Random weights emit max_symbols tokens on every frame (10 per 80 ms, some
        # 30x a real model's rate), each a prediction-network and joint call. A
        # blank logit raised out of reach makes it emit none: the encoder, which
        # dominates, costs exactly what the released model's does; decoding costs
        # its minimum, one joint call per frame (real speech adds ~5 calls/s).
        with torch.no_grad():
            loaded.net.joint.joint_net[-1].bias[loaded.config.decoder.vocab_size] += 1e4
    settings = ServerSettings(max_streams=max_streams, idle_timeout_s=120.0)
    server = make_server(create_app(loaded, settings), port=port, log_level="error")
    server.run()


class ServerProcess:
    """The server in a subprocess, so its compute is not this process's event loop."""

    def __init__(self, model: str, max_streams: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, __file__, "--serve", model, "--port", str(self.port),
                   "--max-streams", str(max_streams)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 300  # the full-size preset takes ~20 s to build
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server for {model} did not start")
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/listen"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                return True
        except OSError:
            return False

    def idle(self, timeout: float = 60.0) -> None:
        """Wait until no stream is open (the previous trial's have closed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                    if json.load(r)["active_streams"] == 0:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server's streams did not close")

    def step_totals(self) -> tuple[float, float]:
        """(seconds, chunks) of `caster_chunk_latency_seconds`: the compute time of the
        engine step that decoded each stream's chunk, summed, and the chunk count."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("caster_chunk_latency_seconds_sum", "caster_chunk_latency_seconds_count"):
                values[name] = float(value)
        return (
            values.get("caster_chunk_latency_seconds_sum", 0.0),
            values.get("caster_chunk_latency_seconds_count", 0.0),
        )

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------ clients


async def utterance(url: str, frames: list[bytes], chunk_ms: int, trial: Trial) -> None:
    """One connection: stream `frames` at real-time pace, finalize, time the final result."""
    import websockets

    # No endpointing: the utterance is one segment, made final by `finalize`.
    start = {"type": "start", "language": LANGUAGE, "chunk_ms": chunk_ms,
             "sample_rate": SAMPLE_RATE, "encoding": "pcm_s16le", "interim_results": True,
             "endpointing": {"silence_ms": None, "max_segment_ms": None}}  # fmt: skip
    loop = asyncio.get_running_loop()
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        try:
            await ws.send(json.dumps(start))
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except websockets.ConnectionClosed as e:  # refused before the start was read
            if e.rcvd is None or e.rcvd.code != 4429:
                raise
            first = {"type": "error", "code": "too_many_streams"}
        if first["type"] == "error":
            if first["code"] != "too_many_streams":
                raise RuntimeError(f"refused: {first}")
            trial.refused += 1
            await asyncio.sleep(1.0)  # a caller retries later
            return
        finals: list[float] = []

        async def receive() -> float | None:
            """The arrival time of the stream's last result (None: it failed)."""
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "result" and event["is_final"]:
                    finals.append(loop.time())
                elif event["type"] == "done":  # right after the last final, if any
                    return finals[-1] if finals else loop.time()
                elif event["type"] == "error":
                    raise RuntimeError(f"stream failed: {event}")
            return None

        receiver = asyncio.create_task(receive())
        try:
            t0 = loop.time()
            for i, frame in enumerate(frames):
                delay = t0 + i * FRAME_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    trial.max_send_lag_s = max(trial.max_send_lag_s, -delay)
                await ws.send(frame)
            sent = loop.time()
            await ws.send(json.dumps({"type": "finalize"}))
            arrived = await asyncio.wait_for(asyncio.shield(receiver), RESULT_TIMEOUT_S)
        except asyncio.TimeoutError:
            trial.late += 1
            return
        finally:
            receiver.cancel()
        if arrived is None:
            raise RuntimeError("the connection closed before done")
        trial.utterances += 1
        trial.latencies_s.append(round(arrived - sent, 4))


async def client(url: str, frames: list[bytes], chunk_ms: int, trial: Trial, end: float) -> None:
    """One caller: utterance after utterance, the last one started before `end` (loop time)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(random.uniform(0, len(frames) * FRAME_S))  # independent callers
    while loop.time() < end:
        try:
            await utterance(url, frames, chunk_ms, trial)
        except Exception as e:  # a dropped connection counts as a failure, it never aborts
            trial.failed += 1
            if len(trial.errors) < 5:
                trial.errors.append(repr(e)[:200])
            await asyncio.sleep(FRAME_S)


def run_trial(
    server: ServerProcess, frames: list[bytes], clients: int, chunk_ms: int, seconds: float,
    max_streams: int,
) -> Trial:  # fmt: skip
    """N clients for `seconds` (plus the stagger) against an idle server."""
    server.idle()
    trial = Trial(clients=clients, max_streams=max_streams)
    load_before = os.getloadavg()[0]
    step_before = server.step_totals()

    async def main() -> None:
        end = asyncio.get_running_loop().time() + len(frames) * FRAME_S + seconds
        await asyncio.gather(
            *(client(server.url, frames, chunk_ms, trial, end) for _ in range(clients))
        )

    asyncio.run(main())
    trial.load_average = (round(load_before, 2), round(os.getloadavg()[0], 2))
    step_after = server.step_totals()
    trial.chunks = round(step_after[1] - step_before[1])
    if trial.chunks:
        trial.step_s = round((step_after[0] - step_before[0]) / trial.chunks, 4)
    trial.summarize()
    print(
        f"  N={clients:3d}: {trial.utterances} utterances, p50 {trial.p50_s} s, "
        f"p95 {trial.p95_s} s, refused {trial.refused}, late {trial.late}, failed "
        f"{trial.failed}, step {trial.step_s} s, send lag {trial.max_send_lag_s:.3f} s, "
        f"load {trial.load_average}",
        flush=True,
    )
    return trial


def held(trial: Trial, chunk_ms: int) -> bool:
    return (
        trial.failed == 0
        and trial.refused == 0
        and trial.late == 0
        and trial.p95_s is not None
        and trial.p95_s < chunk_ms / 1000
    )


def bench_model(model: str, chunk_ms: int, seconds: float, max_clients: int) -> dict:
    """Sweep N for one model; then the overload past it and at the stream limit.

    A load level that fails is run a second time and counts as held if the
    repeat passes: the machine may be shared, and one burst of other work
    should not end the sweep. Both runs are reported.
    """
    frames = audio_frames()
    print(f"{model} at {chunk_ms} ms chunks", flush=True)
    sweep: list[Trial] = []
    server_limit = 4 * max_clients  # never reached in the sweep
    server = ServerProcess(model, max_streams=server_limit)

    def level(n: int) -> bool:
        for _ in range(2):
            sweep.append(run_trial(server, frames, n, chunk_ms, seconds, server_limit))
            if held(sweep[-1], chunk_ms):
                return True
        return False

    try:
        run_trial(server, frames, 1, chunk_ms, 5.0, server_limit)  # warm-up
        ok, bad, n = 0, None, 1
        while n <= max_clients:  # double until it fails
            if not level(n):
                bad = n
                break
            ok, n = n, 2 * n
        while bad is not None and bad - ok > 1 and (bad - ok) / bad > 0.1:  # bisect
            n = (ok + bad) // 2
            ok, bad = (n, bad) if level(n) else (ok, n)
        overload = None
        if bad is not None and 2 * bad <= max_clients:  # well past the limit
            overload = run_trial(server, frames, 2 * bad, chunk_ms, seconds, server_limit)
    finally:
        server.close()
    limited = None
    if ok:
        server = ServerProcess(model, max_streams=ok)
        try:
            limited = run_trial(server, frames, ok + max(2, ok // 2), chunk_ms, seconds, ok)
        finally:
            server.close()
    return {
        "model": model if model.startswith("preset:") else Path(model).name,
        "chunk_ms": chunk_ms,
        "held_streams": ok,
        "first_failing_streams": bad,
        "sweep": [asdict(t) for t in sorted(sweep, key=lambda t: t.clients)],
        "overload": asdict(overload) if overload else None,
        "at_stream_limit": asdict(limited) if limited else None,
    }


def audio_frames() -> list[bytes]:
    """UTTERANCE_S of the fixture waveform, looped, as 100 ms pcm_s16le frames."""
    wave = np.load(FIXTURES / "oracle.npz")["inputs/wave_a"]
    n = round(UTTERANCE_S * SAMPLE_RATE)
    audio = np.tile(wave, -(-n // len(wave)))[:n]
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    step = round(FRAME_S * SAMPLE_RATE) * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def markdown(results: dict) -> str:
    """The results as the tables of bench/results/server.md."""
    m = results["machine"]
    lines = [
        "# Server load: real-time streams held by one `caster serve` process",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; server and clients on the "
        "same cores, over loopback.",
        "",
        "Each client streams 8 s utterances of the fixture waveform (looped) at real-time "
        "pace in 100 ms pcm_s16le frames, interim results on, then `finalize`. Latency: "
        "last audio byte sent -> final result received. Held: p95 latency below the chunk "
        "length, nothing refused, failed or late (> 20 s). `step` is the mean compute time "
        "of the batched engine step that decoded each chunk (server metrics); `load` the "
        "1-minute load average before/after the trial (this benchmark's own server and "
        "clients make about 2-3; more is other work on the machine). "
        "A failing load level is run twice (a burst of other work should not end the "
        "sweep). `refused` counts connection attempts: a refused caller retries after 1 s. "
        "The full-size preset has random weights with the blank logit raised so that it "
        "emits no tokens (see `serve`): its encoder costs what the released model's does.",
        "",
    ]
    for run in results["runs"]:
        lines += [
            f"## {run['model']} at {run['chunk_ms']} ms chunks: {run['held_streams']} streams held",
            "",
            "| clients | stream limit | utterances | p50 s | p95 s | refused | late | failed "
            "| step s | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = list(run["sweep"])
        for name in ("overload", "at_stream_limit"):
            if run[name]:
                rows.append({**run[name], "note": name})
        for t in rows:
            label = str(t["clients"]) + (f" ({t['note']})" if "note" in t else "")
            limit = t["max_streams"] if t.get("note") == "at_stream_limit" else "-"
            lines.append(
                f"| {label} | {limit} | {t['utterances']} | {t['p50_s']} | {t['p95_s']} "
                f"| {t['refused']} | {t['late']} | {t['failed']} | {t['step_s']} "
                f"| {t['load_average'][0]}/{t['load_average'][1]} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", help="model to serve (repeatable; default: see above)"
    )
    parser.add_argument(
        "--chunk-ms", type=int, action="append", help="chunk size(s) with --model (default 320)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per trial")
    parser.add_argument("--max-clients", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--serve", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-streams", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.max_streams)
        return
    random.seed(0)
    results = {
        "machine": machine(),
        "setup": {
            "frame_s": FRAME_S,
            "utterance_s": UTTERANCE_S,
            "seconds_per_trial": args.seconds,
            "language": LANGUAGE,
            "encoding": "pcm_s16le",
            "interim_results": True,
        },
        "runs": [],
    }
    runs = DEFAULT_RUNS
    if args.model:
        runs = tuple((m, c) for m in args.model for c in (args.chunk_ms or [320]))
    for model, chunk_ms in runs:
        results["runs"].append(bench_model(model, chunk_ms, args.seconds, args.max_clients))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "server.md").write_text(markdown(results))
    for run in results["runs"]:
        print(f"{run['model']} @ {run['chunk_ms']} ms: {run['held_streams']} streams held")


if __name__ == "__main__":
    main()
