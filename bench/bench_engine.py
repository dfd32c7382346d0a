"""Many-stream and file-batch CPU benchmark of the full-size Nemotron 3.5 architecture.

Measures, in one process:
- streams held in real time: N streams of one `caster.Engine` fed in lock
  step, one chunk of audio each per round (no sleeping: each round feeds every
  stream a chunk, then runs `Engine.step`). A round's time (feeding = mel, plus
  the step) is the latency of every chunk in it; N streams are held when the
  p95 round time is at most the chunk length. N is searched upward (1, 2, 4,
  8, 12, 16, 24, ...) and then bisected. Baseline, in the same process: the
  same N streams stepped one at a time (`Engine(max_batch=1)`);
- file transcription speed: `caster.transcribe.transcribe_many` on a batch of
  synthetic WAV files, against `Model.transcribe` one file at a time, as audio
  seconds per wall (and CPU) second;
in int8 (`caster.quantize`) and float32.

As in bench_streaming.py, the preset's random weights have their blank bias
raised so no label is emitted (the joint still runs on every frame); what
labels at a speech-like rate would add to a round is estimated from the
measured cost of one batched decoder iteration (see `label_estimate`).

Streams fed in lock step is the batcher's best case: in a server, streams
start at different times and each step takes the streams that are ready.

Run: PYTHONPATH=. .venv/bin/python bench/bench_engine.py [--threads N]
(or `caster bench engine`). Writes bench/results/cpu_engine.json and .md
(about 7 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile
import torch
from bench_streaming import (
    LANGUAGE,
    PRESET,
    RESULTS,
    SAMPLE_RATE,
    SPEECH_LABELS_PER_S,
    machine,
    silence_labels,
    synthetic_speech,
    timed,
)

import caster
from caster.decoding import initial_decoder_state
from caster.engine import Engine
from caster.model import Model
from caster.quantize import quantize_model
from caster.transcribe import transcribe_many

SEARCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
FRAME_S = 0.08  # one encoder frame


def percentile_ms(times: list[float], q: float) -> float:
    return round(float(np.percentile(times, q)) * 1e3, 1)


def run_streams(
    model: Model,
    audio: np.ndarray,
    streams: int,
    chunk_ms: int,
    max_batch: int,
    rounds: int,
    warmup: int = 2,
) -> dict:
    """Feed `streams` streams one chunk each per round and step the engine; time each round.

    Each stream reads the same long recording from its own offset, so batch
    rows differ.
    """
    engine = Engine(model, max_batch=max_batch)
    handles = [engine.open(language=LANGUAGE, chunk_ms=chunk_ms) for _ in range(streams)]
    step = chunk_ms * SAMPLE_RATE // 1000
    offsets = [(i * 9973 * 16) % (len(audio) - (warmup + rounds) * step) for i in range(streams)]
    walls, cpus, feeds, short = [], [], [], 0

    def one_round(r: int) -> int:
        t0 = time.perf_counter()
        for handle, offset in zip(handles, offsets, strict=True):
            handle.feed(audio[offset + r * step : offset + (r + 1) * step])
        feeds.append(time.perf_counter() - t0)
        return engine.step()

    for r in range(warmup + rounds):
        wall, cpu, advanced = timed(lambda r=r: one_round(r))
        if r >= warmup:
            walls.append(wall)
            cpus.append(cpu)
            short += advanced < streams  # a stream without a whole chunk this round
    for handle in handles:
        handle.close()
    chunk_s = chunk_ms / 1000
    return {
        "streams": streams,
        "max_batch": max_batch,
        "rounds": rounds,
        "wall_p50_ms": percentile_ms(walls, 50),
        "wall_p95_ms": percentile_ms(walls, 95),
        "cpu_p50_ms": percentile_ms(cpus, 50),
        "cpu_p95_ms": percentile_ms(cpus, 95),
        "feed_mean_ms": round(float(np.mean(feeds[warmup:])) * 1e3, 2),
        "held_wall": float(np.percentile(walls, 95)) <= chunk_s,
        "held_cpu": float(np.percentile(cpus, 95)) <= chunk_s,
        "rounds_missing_a_stream": short,
    }


def batched_label_step(model: Model, batch: int, repeats: int = 30) -> float:
    """CPU seconds of one greedy iteration that emits a label in every row of a
    batch: the joint on `batch` frames and the prediction network on `batch` labels."""
    net = model.net
    state = initial_decoder_state(net, batch).predictor
    frame = torch.randn(batch, model.config.decoder.joint_hidden)
    label = torch.full((batch,), 5)
    with torch.inference_mode():
        t0 = time.process_time()
        for _ in range(repeats):
            state = net.predict(label, state)
            torch.log_softmax(net.joint.joint_net(frame + state.output), -1).max(dim=-1)
        return (time.process_time() - t0) / repeats


def expected_max_labels(streams: int, rate: float, cap: int) -> float:
    """E[max over streams of the labels on one frame], labels ~ Poisson(rate) per
    stream and frame, at most `cap` (the decoder's max_symbols)."""
    cdf, term, total = 0.0, math.exp(-rate), 0.0
    for k in range(1, cap + 1):
        cdf += term  # P(X <= k - 1)
        term *= rate / k
        total += 1.0 - cdf**streams
    return total


def label_estimate(model: Model, streams: int, chunk_ms: int, batched: bool) -> float:
    """CPU seconds that labels at SPEECH_LABELS_PER_S add to one round (an upper bound).

    The greedy decoder runs one extra batched iteration per frame for as many
    labels as the busiest stream emits on that frame, each costed here at a
    full-batch iteration (it really runs the joint only on the rows still
    decoding and the prediction network only on the rows that emitted). One
    stream at a time pays its own labels.
    """
    frames = chunk_ms / 1000 / FRAME_S
    rate = SPEECH_LABELS_PER_S * FRAME_S
    cap = model.config.decoder.max_symbols
    if batched:
        return frames * expected_max_labels(streams, rate, cap) * batched_label_step(model, streams)
    return streams * frames * rate * batched_label_step(model, 1)


def search(
    model: Model,
    audio: np.ndarray,
    chunk_ms: int,
    max_batch: int | None,
    rounds: int,
    deadline: float,
) -> list[dict]:
    """Runs at growing N until the p95 round CPU time passes the chunk, then bisect
    between the last N held and the first not held. max_batch None: all N in one batch."""
    rows: dict[int, dict] = {}

    def measure(n: int) -> dict:
        r = run_streams(model, audio, n, chunk_ms, max_batch or n, rounds)
        rows[n] = r
        print(
            f"{chunk_ms:5d} ms N={n:3d} {'batched' if max_batch is None else 'one by one':10s} "
            f"wall p50/p95 {r['wall_p50_ms']:7.1f}/{r['wall_p95_ms']:7.1f} ms  cpu p50/p95 "
            f"{r['cpu_p50_ms']:7.1f}/{r['cpu_p95_ms']:7.1f} ms  held {r['held_cpu']}",
            flush=True,
        )
        return r

    held, failed = 0, None
    for n in SEARCH:
        if time.perf_counter() > deadline:
            break
        if measure(n)["held_cpu"]:
            held = n
        else:
            failed = n
            break
    while failed is not None and failed - held > max(1, held // 8):
        if time.perf_counter() > deadline:
            break
        n = (held + failed) // 2
        if measure(n)["held_cpu"]:
            held = n
        else:
            failed = n
    return [rows[n] for n in sorted(rows)]


def most_held(rows: list[dict], clock: str) -> int:
    """The largest N held with every smaller measured N held too."""
    best = 0
    for r in rows:
        if not r[f"held_{clock}"]:
            break
        best = r["streams"]
    return best


def streams_held(
    models: dict[str, Model], audio: np.ndarray, configs: list[tuple[str, int, int]], budget: float
) -> list[dict]:
    out = []
    for precision, chunk_ms, rounds in configs:
        model = models[precision]
        deadline = time.perf_counter() + budget / len(configs)
        batched = search(model, audio, chunk_ms, None, rounds, deadline)
        # The baseline runs the same N up to the first it does not hold (its round
        # time grows linearly in N from there).
        baseline = []
        for r in batched:
            b = run_streams(model, audio, r["streams"], chunk_ms, 1, rounds)
            baseline.append(b)
            print(
                f"{chunk_ms:5d} ms N={b['streams']:3d} one by one  wall p50/p95 "
                f"{b['wall_p50_ms']:7.1f}/{b['wall_p95_ms']:7.1f} ms  cpu p50/p95 "
                f"{b['cpu_p50_ms']:7.1f}/{b['cpu_p95_ms']:7.1f} ms  held {b['held_cpu']}",
                flush=True,
            )
            r["baseline_cpu_p95_ms"] = b["cpu_p95_ms"]
            r["baseline_wall_p95_ms"] = b["wall_p95_ms"]
            r["speedup_cpu_p95"] = round(b["cpu_p95_ms"] / r["cpu_p95_ms"], 2)
            if not b["held_cpu"]:
                break
        for r in batched:
            r["label_ms_est"] = round(label_estimate(model, r["streams"], chunk_ms, True) * 1e3, 1)
            r["baseline_label_ms_est"] = round(
                label_estimate(model, r["streams"], chunk_ms, False) * 1e3, 1
            )
            r["held_cpu_with_labels"] = r["cpu_p95_ms"] + r["label_ms_est"] <= chunk_ms
        for r, b in zip(batched, baseline, strict=False):
            b["held_cpu_with_labels"] = b["cpu_p95_ms"] + r["baseline_label_ms_est"] <= chunk_ms
        summary = {
            "precision": precision,
            "chunk_ms": chunk_ms,
            "held_cpu": most_held(batched, "cpu"),
            "held_wall": most_held(batched, "wall"),
            "held_cpu_with_labels": most_held(batched, "cpu_with_labels"),
            "baseline_held_cpu": most_held(baseline, "cpu"),
            "baseline_held_wall": most_held(baseline, "wall"),
            "baseline_held_cpu_with_labels": most_held(baseline, "cpu_with_labels"),
            "runs": batched,
            "baseline_runs": baseline,
        }
        searched_to = batched[-1]["streams"]
        summary["search_complete"] = not batched[-1]["held_cpu"] or searched_to == SEARCH[-1]
        out.append(summary)
    return out


def file_speed(models: dict[str, Model], seconds: list[float]) -> list[dict]:
    """Audio seconds per second: `transcribe_many` on the batch vs `Model.transcribe` per file."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, s in enumerate(seconds):
            path = Path(tmp) / f"file{i}.wav"
            soundfile.write(path, synthetic_speech(s, seed=20 + i), SAMPLE_RATE, subtype="PCM_16")
            paths.append(path)
        warm = Path(tmp) / "warm.wav"
        soundfile.write(warm, synthetic_speech(2.0, seed=99), SAMPLE_RATE, subtype="PCM_16")
        total = sum(seconds)
        for precision, model in models.items():
            model.transcribe(warm, language=LANGUAGE)
            wall, cpu, _ = timed(
                lambda model=model: list(transcribe_many(model, paths, language=LANGUAGE))
            )
            # batch_seconds = the longest file: no batch holds more padded audio than that.
            s_wall, s_cpu, _ = timed(
                lambda model=model: list(
                    transcribe_many(model, paths, language=LANGUAGE, batch_seconds=max(seconds))
                )
            )
            b_wall, b_cpu, _ = timed(
                lambda model=model: [model.transcribe(p, language=LANGUAGE) for p in paths]
            )
            row = {
                "precision": precision,
                "files": len(paths),
                "audio_s": round(total, 1),
                "batch_wall_s": round(wall, 2),
                "batch_cpu_s": round(cpu, 2),
                "small_batch_wall_s": round(s_wall, 2),
                "small_batch_cpu_s": round(s_cpu, 2),
                "small_batch_audio_s_per_cpu_s": round(total / s_cpu, 2),
                "small_batch_speedup_cpu": round(b_cpu / s_cpu, 2),
                "one_by_one_wall_s": round(b_wall, 2),
                "one_by_one_cpu_s": round(b_cpu, 2),
                "audio_s_per_wall_s": round(total / wall, 2),
                "audio_s_per_cpu_s": round(total / cpu, 2),
                "baseline_audio_s_per_wall_s": round(total / b_wall, 2),
                "baseline_audio_s_per_cpu_s": round(total / b_cpu, 2),
                "speedup_wall": round(b_wall / wall, 2),
                "speedup_cpu": round(b_cpu / cpu, 2),
            }
            rows.append(row)
            print("files", row, flush=True)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Many streams and file batches on CPU, full-size Nemotron 3.5 architecture",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {m['threads']} "
        f"thread(s), quantized engine {m['quantized_engine']}. Load average at start "
        f"{[round(x, 2) for x in m['load_average']]}, at end "
        f"{[round(x, 2) for x in report['load_average_end']]}. Run time {report['run_s']} s.",
        "",
        report["note"],
        "",
        "## Streams held in real time (p95 chunk latency <= chunk length)",
        "",
        "N streams fed in lock step; a round = feed every stream one chunk (mel) + "
        "`Engine.step`. Batched: `Engine(max_batch=N)`, one batch. Baseline: "
        "`Engine(max_batch=1)`, the same streams one at a time. 'With labels': CPU p95 plus "
        f"the estimated cost of {SPEECH_LABELS_PER_S} labels/s per stream (an upper bound).",
        "",
        "| precision | chunk | most streams held, batched: CPU / wall / CPU with labels "
        "| baseline one at a time: CPU / wall / CPU with labels | ratio (CPU) | search |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["streams_held"]:
        ratio = round(s["held_cpu"] / s["baseline_held_cpu"], 2) if s["baseline_held_cpu"] else "-"
        searched = "complete" if s["search_complete"] else "cut short (time)"
        lines.append(
            f"| {s['precision']} | {s['chunk_ms']} ms | {s['held_cpu']} / {s['held_wall']} / "
            f"{s['held_cpu_with_labels']} | {s['baseline_held_cpu']} / "
            f"{s['baseline_held_wall']} / {s['baseline_held_cpu_with_labels']} | {ratio} "
            f"| {searched} |"
        )
    lines += [
        "",
        "Every run (round times in ms; baseline = the same N one at a time):",
        "",
        "| precision | chunk | N | batched CPU p50 / p95 | batched wall p50 / p95 "
        "| baseline CPU p95 | baseline wall p95 | speedup (CPU p95) | labels est. batched "
        "/ baseline | mel feed (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["streams_held"]:
        for r in s["runs"]:
            base = [r.get(k, "not run") for k in ("baseline_cpu_p95_ms", "baseline_wall_p95_ms")]
            lines.append(
                f"| {s['precision']} | {s['chunk_ms']} | {r['streams']} | {r['cpu_p50_ms']} / "
                f"{r['cpu_p95_ms']} | {r['wall_p50_ms']} / {r['wall_p95_ms']} "
                f"| {base[0]} | {base[1]} | {r.get('speedup_cpu_p95', '-')} "
                f"| {r['label_ms_est']} / {r['baseline_label_ms_est']} | {r['feed_mean_ms']} |"
            )
    lines += [
        "",
        "## File transcription speed",
        "",
        "Audio seconds per second: `transcribe_many` on the batch of WAV files (read, "
        "length-sorted, padded offline batches; default `batch_seconds=600` puts all files "
        "in one batch) vs `Model.transcribe` one file at a time (the baseline), default "
        "attention context. 'Small batches': `batch_seconds` = the longest file, so a batch "
        "pads to at most that much audio.",
        "",
        "| precision | files | audio s | batch: audio s per wall s / CPU s "
        "| one at a time: audio s per wall s / CPU s | speedup wall / CPU "
        "| small batches: audio s per CPU s / speedup CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["file_speed"]:
        lines.append(
            f"| {r['precision']} | {r['files']} | {r['audio_s']} | {r['audio_s_per_wall_s']} / "
            f"{r['audio_s_per_cpu_s']} | {r['baseline_audio_s_per_wall_s']} / "
            f"{r['baseline_audio_s_per_cpu_s']} | {r['speedup_wall']} / {r['speedup_cpu']} "
            f"| {r['small_batch_audio_s_per_cpu_s']} / {r['small_batch_speedup_cpu']} |"
        )
    lines += ["", "## Target", ""]
    for s in report["streams_held"]:
        if s["precision"] == "int8" and s["chunk_ms"] == 560:
            verdict = "met" if s["held_cpu_with_labels"] >= 8 else "MISSED"
            lines.append(
                f"- >= 8 concurrent streams held at 560 ms (int8): {s['held_cpu']} held by CPU "
                f"time, {s['held_wall']} by wall time, {s['held_cpu_with_labels']} with the "
                f"label estimate: {verdict}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the search")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds at 560 ms")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], help="streams, files, float32")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_engine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantiz.*")
    start = time.perf_counter()
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    model = caster.load(PRESET)
    quantized = quantize_model(model)
    silence_labels(model, quantized)
    models = {"int8": quantized, "float32": model}
    if "float32" in args.skip:
        del models["float32"]
    report["note"] = (
        "Random weights (the preset), synthetic speech-like audio. The joint's blank bias is "
        "raised so no labels are emitted (random weights emit either max_symbols labels on a "
        "frame or none); the joint still runs on every frame. 'CPU' is this process's CPU "
        "time per round (1 thread: the figure to compare on a shared machine); 'wall' "
        "includes waiting for a core while other processes run."
    )
    audio = synthetic_speech(120.0, seed=11)
    if "streams" not in args.skip:
        configs = [("int8", 560, args.rounds), ("int8", 160, 2 * args.rounds)]
        if "float32" in models:
            configs.append(("float32", 560, max(5, args.rounds // 2)))
        report["streams_held"] = streams_held(models, audio, configs, args.budget)
    if "files" not in args.skip:
        seconds = [round(float(s), 1) for s in np.linspace(10, 30, args.files)]
        report["file_speed"] = file_speed(models, seconds)
    report["load_average_end"] = list(os.getloadavg())
    report["run_s"] = round(time.perf_counter() - start, 1)
    report.setdefault("streams_held", [])
    report.setdefault("file_speed", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
