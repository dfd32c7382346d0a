"""Many streams on one CUDA GPU, full-size Nemotron 3.5 architecture: bf16 + CUDA graphs.

Prepared for a lent H100/H200 session (no network, about 15 minutes of device time
in all), so it is one process with a hard time limit (--budget-s) that measures,
in order:

1. half precision against float32 on this device: the full preset's encoder
   output (relative error) and its raw random joint's tokens (agreement) on
   synthetic speech; and the NeMo-built fixture models' transcripts where
   ../shared is checked out;
2. streams held in real time at 80 ms and 1120 ms: N streams of one
   `caster.Engine` fed in lock step, as in bench_engine.py (each round feeds
   every stream one chunk of audio, from a pool of threads as a server's
   connections would, then runs `Engine.step`; the round's wall time is the
   latency of every chunk in it). N is held when the p95 round time is below
   the chunk length. N doubles from --start until a round time misses, then is
   bisected; each search gets an equal share of the time left. The fast path
   (the `dtype` model, `Engine(graphs=True)`: fixed-shape steps, CUDA graphs on
   CUDA) is searched first; the baseline (float32, eager) then starts at the N
   the fast path held, so both are measured at that N (the ratio printed).
   Targets (issue #3): 480 streams at 80 ms and 4,800 at 1,120 ms.

As in bench_engine.py, the preset's random weights have their blank bias raised
for the stream runs, so no label is emitted (the joint still runs on every
frame); real speech adds a few decoder iterations per chunk.

Run from the repository root (GPU):
    PYTHONPATH=. .venv/bin/python bench/bench_gpu.py --budget-s 420
Check the script on a CPU (tiny random model, seconds; writes only with --out):
    PYTHONPATH=. .venv/bin/python bench/bench_gpu.py --device cpu --smoke
Writes bench/results/gpu_engine.json and .md (on a CPU without --smoke:
cpu_half_precision.*, e.g. `--device cpu --parts accuracy` for bf16 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from bench_engine import percentile_ms
from bench_streaming import (
    FIXTURES,
    LANGUAGE,
    PRESET,
    RESULTS,
    SAMPLE_RATE,
    agreement,
    encoder_error,
    machine,
    silence_labels,
    synthetic_speech,
)

import caster
from caster.config import ModelConfig
from caster.engine import Engine
from caster.model import Model
from caster.presets import preset_config, random_checkpoint

TARGETS = {80: 480, 1120: 4800}  # streams held, issue #3
FIXTURE_MODELS = ("tiny_streaming_rnnt", "tiny_streaming_rnnt_prompt")


def tiny_config() -> ModelConfig:
    """The preset's family at a few layers and channels: --smoke runs in seconds on a CPU."""
    cfg = preset_config(PRESET.removeprefix("preset:"))
    encoder = replace(cfg.encoder, n_layers=2, d_model=64, n_heads=2, subsampling_conv_channels=16)
    decoder = replace(cfg.decoder, vocab_size=256, pred_hidden=64, joint_hidden=64)
    return replace(cfg, encoder=encoder, decoder=decoder)


def load_models(args: argparse.Namespace) -> tuple[Model, Model]:
    """(float32 baseline, fast `dtype` model), the same random weights."""
    if args.smoke:
        return (
            Model(random_checkpoint(tiny_config()), args.device),
            Model(random_checkpoint(tiny_config()), args.device, args.dtype),
        )
    return caster.load(PRESET, args.device), caster.load(PRESET, args.device, dtype=args.dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return machine()["cpu"]


# ------------------------------------------------------------------- accuracy


def fixture_transcripts(device: torch.device, dtype: str) -> list[dict]:
    """The NeMo-built fixture models: transcripts identical in `dtype` and float32."""
    oracle = np.load(FIXTURES / "oracle.npz")
    rows = []
    for name in FIXTURE_MODELS:
        path = FIXTURES / f"{name}.nemo"
        ref, half = caster.load(path, device), caster.load(path, device, dtype=dtype)
        languages = ["en-US", "de-DE", "fr-FR", "auto"] if ref.config.prompt else [None]
        same = total = 0
        lowest = 1.0
        for wave in ("wave_a", "wave_b"):
            audio = oracle[f"inputs/{wave}"]
            for language in languages:
                for chunk_ms in ref.config.supported_chunk_ms():
                    a = ref.transcribe(audio, language=language, chunk_ms=chunk_ms).token_ids
                    b = half.transcribe(audio, language=language, chunk_ms=chunk_ms).token_ids
                    total, same = total + 1, same + (a == b)
                    lowest = min(lowest, agreement(a, b))
        rows.append({"model": name, "transcripts": total, "identical": same, "lowest": lowest})
        print(f"fixture {name}: {same}/{total} identical, lowest agreement {lowest}", flush=True)
    return rows


def half_accuracy(base: Model, fast: Model, args: argparse.Namespace) -> dict:
    """`fast` (half precision) against float32 on this device."""
    audio = synthetic_speech(args.accuracy_s, seed=7)
    rows = []
    for chunk_ms in args.chunks:
        a = base.transcribe(audio, language=LANGUAGE, chunk_ms=chunk_ms).token_ids
        b = fast.transcribe(audio, language=LANGUAGE, chunk_ms=chunk_ms).token_ids
        rows.append(
            {
                "chunk_ms": chunk_ms,
                "seconds": args.accuracy_s,
                "labels_fp32": len(a),
                "labels_half": len(b),
                "agreement": round(agreement(a, b), 4),
                "encoder_rel_error": round(encoder_error(base, fast, audio, chunk_ms), 5),
            }
        )
        print(f"accuracy {rows[-1]}", flush=True)
    fixtures: list[dict] | str = "not run (--smoke)"
    if not args.smoke:
        fixtures = f"not run: no {FIXTURES} here"
        if (FIXTURES / "oracle.npz").is_file():
            fixtures = fixture_transcripts(torch.device(args.device), args.dtype)
    return {"preset": rows, "fixtures": fixtures}


# -------------------------------------------------------------------- streams


def run_streams(
    engine: Engine,
    audio: np.ndarray,
    streams: int,
    chunk_ms: int,
    rounds: int,
    pool: ThreadPoolExecutor,
    threads: int,
    deadline: float,
    warmup: int = 4,
) -> dict:
    """Feed `streams` streams one chunk each per round (`threads` groups of them fed from
    `pool` at once) and step; time each round.

    Warm-up rounds cover the streams' first chunks (eager steps) and the capture
    of new CUDA graph buckets. A run past `deadline` stops (cut_short), after at
    least one timed round if it got that far.
    """
    handles = [engine.open(language=LANGUAGE, chunk_ms=chunk_ms) for _ in range(streams)]
    step = chunk_ms * SAMPLE_RATE // 1000
    span = (warmup + rounds) * step
    offsets = [(i * 9973 * 16) % (len(audio) - span) for i in range(streams)]
    groups = [range(k, streams, threads) for k in range(threads)]

    def feed(group: range, r: int) -> None:
        for i in group:
            handles[i].feed(audio[offsets[i] + r * step : offsets[i] + (r + 1) * step])

    feeds, steps, walls, short = [], [], [], 0
    for r in range(warmup + rounds):
        if time.perf_counter() > deadline and (r < warmup or walls):
            break
        t0 = time.perf_counter()
        list(pool.map(feed, groups, [r] * len(groups)))
        t1 = time.perf_counter()
        advanced = engine.step()
        t2 = time.perf_counter()
        if r >= warmup:
            feeds.append(t1 - t0)
            steps.append(t2 - t1)
            walls.append(t2 - t0)
            short += advanced < streams  # a stream without a whole chunk this round
    for handle in handles:
        handle.close()
    if not walls:
        return {"streams": streams, "held": False, "held_step": False, "cut_short": True}
    chunk_s = chunk_ms / 1000
    return {
        "streams": streams,
        "rounds": len(walls),
        "cut_short": len(walls) < rounds,
        "round_p50_ms": percentile_ms(walls, 50),
        "round_p95_ms": percentile_ms(walls, 95),
        "step_p50_ms": percentile_ms(steps, 50),
        "step_p95_ms": percentile_ms(steps, 95),
        "feed_p95_ms": percentile_ms(feeds, 95),
        "held": float(np.percentile(walls, 95)) < chunk_s,
        "held_step": float(np.percentile(steps, 95)) < chunk_s,
        "rounds_missing_a_stream": short,
    }


def search(
    measure: Callable[[int], dict], start: int, limit: int, deadline: float
) -> tuple[int, list[dict]]:
    """The most streams held: double from `start` (halve if it misses), then bisect
    to within 1/16. Returns (most held, every run)."""
    rows: dict[int, dict] = {}
    held, failed, n = 0, None, start

    def ok(n: int) -> bool:
        rows[n] = measure(n)
        return rows[n]["held"]

    while failed is None and n <= limit and time.perf_counter() < deadline:
        if ok(n):
            held, n = n, 2 * n
        else:
            failed = n
    while held == 0 and failed is not None and failed > 1 and time.perf_counter() < deadline:
        n = failed // 2
        if ok(n):
            held = n
        else:
            failed = n
    while failed is not None and failed - held > max(1, held // 16):
        if time.perf_counter() > deadline:
            break
        n = (held + failed) // 2
        if ok(n):
            held = n
        else:
            failed = n
    return held, [rows[n] for n in sorted(rows)]


def measure_with(
    make_engine: Callable[[], Engine],
    audio: np.ndarray,
    chunk_ms: int,
    rounds: int,
    pool: ThreadPoolExecutor,
    threads: int,
    deadline: float,
    label: str,
) -> Callable[[int], dict]:
    """`run_streams` for one configuration; the engine is kept between runs (its CUDA
    graphs with it) and replaced only after a failed step (out of memory)."""
    engine = make_engine()

    def measure(n: int) -> dict:
        nonlocal engine
        try:
            row = run_streams(engine, audio, n, chunk_ms, rounds, pool, threads, deadline)
        except Exception as e:  # out of memory, or any failure: recorded, the run goes on
            cause = e.__cause__ or e
            row = {"streams": n, "held": False, "held_step": False, "error": repr(cause)[:200]}
            engine = make_engine()
        if torch.cuda.is_available():
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        print(f"{chunk_ms:5d} ms {label:10s} {row}", flush=True)
        return row

    return measure


def streams_held(
    base: Model, fast: Model, args: argparse.Namespace, end: float, pool: ThreadPoolExecutor
) -> list[dict]:
    """Per chunk size: the fast path's search; at the N it held, the fast model without
    graphs (what the graphs add); then the baseline's search from that N."""
    audio = synthetic_speech(120.0, seed=11)
    out = []
    searches = 2 * len(args.chunks)

    def measure(label: str, model: Model, graphs: bool, chunk_ms: int, deadline: float) -> Callable:
        rounds = max(args.min_rounds, round(args.timed_s * 1000 / chunk_ms))
        return measure_with(
            lambda: Engine(model, args.max_batch, graphs),
            audio,
            chunk_ms,
            rounds,
            pool,
            args.feed_threads,
            deadline,
            label,
        )

    for chunk_ms in args.chunks:
        deadline = time.perf_counter() + (end - time.perf_counter()) / searches
        fast_held, fast_runs = search(
            measure("fast", fast, True, chunk_ms, deadline),
            args.start[chunk_ms],
            args.max_streams,
            deadline,
        )
        n = max(1, fast_held)
        half_eager = measure("half eager", fast, False, chunk_ms, end)(n)
        deadline = time.perf_counter() + (end - time.perf_counter()) / (searches - 1)
        base_held, base_runs = search(
            measure("baseline", base, False, chunk_ms, deadline), n, args.max_streams, deadline
        )
        searches -= 2
        at_n = {
            "streams": n,
            "fast": {r["streams"]: r for r in fast_runs}.get(n),
            "half_eager": half_eager,
            "baseline": {r["streams"]: r for r in base_runs}.get(n),
        }
        summary = {
            "chunk_ms": chunk_ms,
            "fast": {"held": fast_held, "runs": fast_runs},
            "baseline": {"held": base_held, "runs": base_runs},
            "ratio_held": round(fast_held / base_held, 2) if base_held else None,
            "at_fast_n": at_n,
            "target": None if args.smoke else TARGETS.get(chunk_ms),
        }
        p95 = {k: (at_n[k] or {}).get("round_p95_ms") for k in ("fast", "half_eager", "baseline")}
        print(
            f"{chunk_ms} ms: fast {fast_held} streams, baseline {base_held}, ratio "
            f"{summary['ratio_held']}; round p95 at N={n}: fast {p95['fast']}, half eager "
            f"{p95['half_eager']}, baseline {p95['baseline']} ms",
            flush=True,
        )
        out.append(summary)
    return out


# ---------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    a, m = report["args"], report["machine"]
    lines = [
        f"# bench_gpu.py on {report['device']}",
        "",
        f"Run {report['time']}, {report['run_s']} s; torch {m['torch']}, host {m['cpu']} "
        f"({m['cores']} cores). Model: {report['model']}.",
        "",
        report["note"],
    ]
    if "accuracy_error" in report:
        lines += ["", f"The accuracy part failed: {report['accuracy_error']}"]
    accuracy = report.get("accuracy")
    if accuracy:
        lines += [
            "",
            f"## {a['dtype']} against float32 on this device",
            "",
            "| chunk | audio s | labels fp32 / half | token agreement | encoder rel. error |",
            "|---|---|---|---|---|",
        ]
        for r in accuracy["preset"]:
            lines.append(
                f"| {r['chunk_ms']} ms | {r['seconds']} | {r['labels_fp32']} / "
                f"{r['labels_half']} | {r['agreement']} | {r['encoder_rel_error']} |"
            )
        fixtures = accuracy["fixtures"]
        lines += [
            "",
            "The token agreement is that of the preset's raw random joint (about 125 labels/s, "
            "many near-ties among 13,088 outputs, so one flipped argmax shifts a frame's other "
            "labels): a bound on how far the outputs move, not a word error rate. The trained "
            "fixture models are the better guide:",
            "",
        ]
        if isinstance(fixtures, str):
            lines.append(f"NeMo-built fixture models: {fixtures}.")
        else:
            for r in fixtures:
                lines.append(
                    f"- fixture {r['model']}: {r['identical']}/{r['transcripts']} transcripts "
                    f"identical, lowest token agreement {r['lowest']}"
                )
    held = report.get("streams_held")
    if held:
        lines += [
            "",
            "## Streams held in real time (p95 round time < chunk)",
            "",
            f"Fast path: {a['dtype']} + `Engine(graphs=True)` (fixed-shape steps, CUDA graphs "
            f"on CUDA); baseline: float32, eager; both `max_batch` {a['max_batch']}. A round: "
            f"feed every stream one chunk ({a['feed_threads']} feeding threads, mel on the "
            f"host) + `Engine.step`. Budget {a['budget_s']} s for everything.",
            "",
            "| chunk | fast path | baseline | ratio | at the fast path's N: round p95 ms, fast "
            "/ half precision eager / baseline | target |",
            "|---|---|---|---|---|---|",
        ]
        for s in held:
            target = s["target"]
            met = target is not None and s["fast"]["held"] >= target
            verdict = "-" if target is None else f"{target}: {'met' if met else 'MISSED'}"
            at = s["at_fast_n"]
            p95 = " / ".join(
                str((at[k] or {}).get("round_p95_ms", "-"))
                for k in ("fast", "half_eager", "baseline")
            )
            lines.append(
                f"| {s['chunk_ms']} ms | {s['fast']['held']} | {s['baseline']['held']} | "
                f"{s['ratio_held']} | N={at['streams']}: {p95} | {verdict} |"
            )
        lines += [
            "",
            "Every run (ms; 'held' by the round, 'step' = `Engine.step` alone):",
            "",
            "| chunk | path | N | rounds | round p50 / p95 | step p50 / p95 | feed p95 | held "
            "| held by step | peak GiB | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in held:
            runs = [("fast", r) for r in s["fast"]["runs"]]
            runs.append(("half eager", s["at_fast_n"]["half_eager"]))
            runs += [("baseline", r) for r in s["baseline"]["runs"]]
            for label, r in runs:
                lines.append(
                    f"| {s['chunk_ms']} | {label} | {r['streams']} | {r.get('rounds', '-')} "
                    f"| {r.get('round_p50_ms', '-')} / {r.get('round_p95_ms', '-')} "
                    f"| {r.get('step_p50_ms', '-')} / {r.get('step_p95_ms', '-')} "
                    f"| {r.get('feed_p95_ms', '-')} | {r['held']} | {r['held_step']} "
                    f"| {r.get('peak_memory_gib', '-')} | {r.get('error', '')} |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", help="the fast path's dtype: bf16 or fp16")
    parser.add_argument("--budget-s", type=float, default=420.0, help="hard limit for it all")
    parser.add_argument("--chunks", type=int, nargs="+", default=[80, 1120])
    parser.add_argument("--parts", nargs="+", default=["accuracy", "streams"])
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--max-streams", type=int, default=16384)
    parser.add_argument("--start", type=int, nargs="+", help="first N per chunk size")
    parser.add_argument("--timed-s", type=float, default=3.0, help="audio per timed run")
    parser.add_argument("--min-rounds", type=int, default=8)
    parser.add_argument("--feed-threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--accuracy-s", type=float, default=15.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few streams")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget_s, args.max_streams, args.accuracy_s = min(args.budget_s, 60.0), 4, 2.0
        args.timed_s, args.min_rounds = 0.0, 3
    default_starts = [128, 1024] if args.device.startswith("cuda") and not args.smoke else [1, 1]
    starts = args.start or [default_starts[min(i, 1)] for i in range(len(args.chunks))]
    args.start = dict(zip(args.chunks, starts, strict=True))
    if args.out is None and not args.smoke:
        name = "gpu_engine" if args.device.startswith("cuda") else "cpu_half_precision"
        args.out = RESULTS / name
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    end = begin + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (--device cpu --smoke checks the script)")
        return 0
    # Feeding threads each run small mel computations: one intra-op thread apiece.
    torch.set_num_threads(1)
    base, fast = load_models(args)
    report: dict = {
        "device": device_name(device),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": "tiny random (--smoke)" if args.smoke else f"{PRESET} (random weights)",
        "args": {k: str(v) for k, v in vars(args).items()}
        | {"budget_s": args.budget_s, "out": args.out and args.out.name},  # no machine paths
        "note": "Random weights, synthetic speech-like audio. Nothing here is a word error "
        "rate: the accuracy rows bound how far half precision moves this architecture's "
        "outputs. Stream runs: blank bias raised, no labels emitted.",
    }
    if "accuracy" in args.parts:
        try:
            report["accuracy"] = half_accuracy(base, fast, args)
        except Exception as e:  # the stream runs are worth having without it
            report["accuracy_error"] = repr(e)[:500]
    if "streams" in args.parts:
        silence_labels(base)
        silence_labels(fast)
        with ThreadPoolExecutor(args.feed_threads) as pool:
            report["streams_held"] = streams_held(base, fast, args, end, pool)
    report["run_s"] = round(time.perf_counter() - begin, 1)
    text = markdown(report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
