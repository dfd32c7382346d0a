"""Training throughput: audio hours per wall hour for the tiny config and the 0.6B preset.

Each step is the training loop's own optimizer step, `Trainer._optimizer_step` of
`caster.train.loop` (the context drawn from (seed, step) as the loop draws it, the language
prompt, dither, mel, SpecAugment, encoder, prompt, prediction network, RNN-T loss,
backward, gradient clipping, AdamW), on synthetic batches: noise audio of 4-8 s per
utterance with random targets of 3 tokens per second, as many utterances as fit the padded
audio budget of a batch (`data.max_batch_seconds` of examples/train_tiny.yaml for the tiny
model; 16 s, i.e. two utterances, for the 0.6B preset). The Trainer is built from
examples/train_tiny.yaml on a one-line generated manifest (only needed to construct it);
data loading is not timed.

Baseline, in the same process: the same step with the loss computed by `rnnt_loss` on the
full (B, T, U+1, V+1) joint logits instead of the loop's memory-lean `rnnt_loss_from_parts`
(chunked joint under activation checkpointing). The two alternate step by step, each pair on
the same batch and context, so load on a shared machine hits both alike.

Memory: the peak resident set of each step (Linux VmHWM, reset before every step after
returning freed heap to the system), and that peak minus the RSS at the start of the step:
the step's own activations, logits and gradients on top of the weights and optimizer state.

With too little free memory for AdamW's states of the 0.6B model (about 16 bytes per weight
plus activations), or with --no-optimizer, the 0.6B case times forward + backward only, with
the same forward module (`TransducerLoss`), and says so.

Run: PYTHONPATH=. .venv/bin/python bench/bench_train.py   (or `caster bench train`)
Writes bench/results/<device>_train.json and .md (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import soundfile as sf
import torch
from torch import Tensor, nn

from caster.config import DecoderConfig
from caster.languages import NEMOTRON_3_5_LOCALES
from caster.presets import synthetic_tokenizer
from caster.train import loop
from caster.train.config import load_train_config
from caster.train.data import Batch
from caster.train.distributed import init_distributed
from caster.train.evaluate import choose_prompts
from caster.train.loss import (
    DEFAULT_CHUNK_ELEMENTS,
    Reduction,
    rnnt_loss,
    rnnt_loss_from_parts,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "examples" / "train_tiny.yaml"
RESULTS = Path(__file__).parent / "results"
PRESET = "nemotron-3.5-asr-streaming-0.6b"
SAMPLE_RATE = 16000
TOKENS_PER_S = 3.0  # subword tokens per second of speech, roughly
UTTERANCE_S = (4.0, 8.0)
LANGUAGE = "en-US"
# fp32 weights + gradients + AdamW's two moments, bytes per weight.
TRAIN_BYTES_PER_WEIGHT = 16
ACTIVATION_HEADROOM_GB = 4.0
FRAME_S = 0.08  # encoder frame


# ------------------------------------------------------------------------ machine


def machine(device: torch.device) -> dict[str, Any]:
    """The CPU (and GPU), core count, torch version and threads, for the record."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln),
            platform.processor(),
        )
    except (OSError, subprocess.CalledProcessError):
        cpu = platform.processor()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(_meminfo_kb("MemTotal") / 2**20, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {key}")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_memory(device: torch.device) -> float:
    """Return freed heap to the system, restart the peak counters; the RSS now (MB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _status_mb("VmRSS")


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS (MB) since `reset_peak_memory`, and the GPU's peak allocation on CUDA."""
    peaks = {"peak_rss_mb": _status_mb("VmHWM")}
    if device.type == "cuda":
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


# -------------------------------------------------------------------------- setup


def full_logits_loss(
    joint_net: nn.Module,
    enc_proj: Tensor,
    pred_proj: Tensor,
    targets: Tensor,
    enc_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """The baseline: `rnnt_loss` on the full joint, in `rnnt_loss_from_parts`' signature."""
    logits = joint_net(enc_proj[:, :, None, :] + pred_proj[:, None, :, :])  # (B, T, U+1, V+1)
    return rnnt_loss(logits, targets, enc_lengths, target_lengths, blank, reduction)


def build_trainer(workdir: Path, preset: str | None, device: str) -> loop.Trainer:
    """A Trainer from examples/train_tiny.yaml (its model, or `preset`), synthetic tokenizer."""
    wav = workdir / "noise.wav"
    sf.write(wav, np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 0.1, SAMPLE_RATE)
    manifest = workdir / "train.jsonl"
    line = {"audio_filepath": str(wav), "duration": 1.0, "text": "w1 w2", "lang": LANGUAGE}
    manifest.write_text(json.dumps(line) + "\n")
    overrides = [
        f"--output_dir={workdir / 'run'}",
        f"--data.train=[{manifest}]",
        "--data.weights=null",
        "--data.validation=[]",
        "--data.num_workers=0",
        f"--tokenizer.model={workdir / 'tokenizer.model'}",
        "--run.resume=null",
        "--run.progress=false",
        f"--run.device={device}",
    ]
    tags: list[str] = []  # the tiny model's prompt locales need no tokenizer pieces
    if preset is not None:
        overrides += [f"--model.preset={preset}", "--model.config={}", "--model.new_languages=[]"]
        tags = [f"<{locale}>" for locale in NEMOTRON_3_5_LOCALES]  # as the released tokenizer
    cfg = load_train_config(TINY_YAML, overrides)
    vocab = loop.model_config(cfg.model).decoder.vocab_size
    (workdir / "tokenizer.model").write_bytes(synthetic_tokenizer(vocab, tags))
    return loop.Trainer(cfg, init_distributed(device))


def synthetic_batch(rng: np.random.Generator, budget_s: float, vocab: int) -> Batch:
    """Noise utterances of 4-8 s, as many as fit `budget_s` of padded audio (at least one)."""
    seconds: list[float] = []
    while True:
        d = float(rng.uniform(*UTTERANCE_S))
        if seconds and (len(seconds) + 1) * max([*seconds, d]) > budget_s:
            break
        seconds.append(d)
    samples = [int(s * SAMPLE_RATE) for s in seconds]
    tokens = [max(1, round(s * TOKENS_PER_S)) for s in seconds]
    audio = torch.zeros(len(seconds), max(samples))  # (B, N)
    targets = torch.zeros(len(seconds), max(tokens), dtype=torch.long)  # (B, U)
    for i, (n, u) in enumerate(zip(samples, tokens, strict=True)):
        audio[i, :n] = torch.from_numpy(0.1 * rng.standard_normal(n).astype(np.float32))
        # Ids 1..vocab-1: never <unk> (0) or the blank (vocab).
        targets[i, :u] = torch.from_numpy(rng.integers(1, vocab, u))
    return Batch(
        audio,
        torch.tensor(samples),
        targets,
        torch.tensor(tokens),
        [LANGUAGE] * len(seconds),
        list(range(len(seconds))),
    )


# ------------------------------------------------------------------------ stepping


def forward_backward(trainer: loop.Trainer, batch: Batch) -> dict[str, Any]:
    """Forward + backward of the loop's TransducerLoss, no optimizer (memory fallback)."""
    cfg, device = trainer.cfg, trainer.info.device
    context = loop.sample_context(trainer.config.encoder, cfg.seed, trainer.step)
    generator = loop.step_generator(cfg.seed, trainer.step, 0, 0)
    prompts = choose_prompts(
        batch.languages, trainer.config.prompt, cfg.run.prompt_mode, cfg.run.auto_ratio, generator
    )
    batch = batch.to(device)
    with trainer._autocast():
        losses = trainer.model(
            batch.audio,
            batch.audio_lengths,
            batch.targets,
            batch.target_lengths,
            None if prompts is None else prompts.to(device),
            context,
            generator,
        )
        (losses.sum() / batch.size).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(losses.detach().mean()), "context": list(context)}


def timed_step(
    trainer: loop.Trainer, batch: Batch, step: int, variant: str, optimizer: bool
) -> dict[str, Any]:
    """One training step of `variant` ("lean" or "full"); times, peak memory, loss."""
    device = trainer.info.device
    # Both variants of a pair draw the same context: the loop draws it from (seed, step).
    trainer.step = step
    patch = (
        mock.patch.object(loop, "rnnt_loss_from_parts", full_logits_loss)
        if variant == "full"
        else contextlib.nullcontext()
    )
    start_rss = reset_peak_memory(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with patch:
        result = trainer._optimizer_step([batch]) if optimizer else forward_backward(trainer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result is None:
        raise RuntimeError("the training step skipped a non-empty batch")
    peaks = peak_memory(device)
    frames = math.ceil(float(batch.audio_lengths.max()) / SAMPLE_RATE / FRAME_S)
    labels = int(batch.target_lengths.max())
    return {
        "variant": variant,
        "step": step,
        "audio_s": float(batch.audio_lengths.sum()) / SAMPLE_RATE,
        "utterances": batch.size,
        "wall_s": wall,
        "cpu_s": cpu,
        "start_rss_mb": start_rss,
        **peaks,
        "step_peak_mb": peaks["peak_rss_mb"] - start_rss,
        "loss": result["loss"],
        "context": result["context"],
        "joint_chunks": lean_chunks(batch.size, frames, labels, trainer.config.decoder),
    }


def lean_chunks(utterances: int, frames: int, labels: int, decoder: DecoderConfig) -> int:
    """Joint chunks `rnnt_loss_from_parts` runs at its default chunk size; 1: all at once."""
    per_frame = utterances * (labels + 1) * (decoder.blank_id + 1)  # logits of one frame
    return math.ceil(frames / max(1, DEFAULT_CHUNK_ELEMENTS // per_frame))


def run_case(
    name: str,
    trainer: loop.Trainer,
    budget_s: float,
    min_pairs: int,
    seconds: float,
    optimizer: bool,
) -> dict[str, Any]:
    """One warm-up step per variant, then lean/full pairs until `seconds` (>= min_pairs)."""
    rng = np.random.default_rng(0)
    vocab = trainer.config.decoder.vocab_size
    params = sum(p.numel() for p in trainer.params)
    print(f"== {name}: {params / 1e6:.1f}M trained weights", flush=True)
    warm = synthetic_batch(rng, budget_s, vocab)
    for variant in ("lean", "full"):
        r = timed_step(trainer, warm, 0, variant, optimizer)
        print(f"   warm-up {variant}: {r['wall_s']:.2f} s", flush=True)
    steps = []
    started = time.perf_counter()
    pair = 0
    while pair < min_pairs or time.perf_counter() - started < seconds:
        pair += 1
        batch = synthetic_batch(rng, budget_s, vocab)
        order = ("lean", "full") if pair % 2 else ("full", "lean")
        for variant in order:
            r = timed_step(trainer, batch, pair, variant, optimizer)
            steps.append(r)
            print(
                f"   pair {pair} {variant}: {r['utterances']} utt, {r['audio_s']:.1f} s audio, "
                f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['step_peak_mb']:.0f}), "
                f"loss {r['loss']:.1f}",
                flush=True,
            )
    summary = {v: summarise([s for s in steps if s["variant"] == v]) for v in ("lean", "full")}
    lean, full = summary["lean"], summary["full"]
    return {
        "trained_weights": params,
        "step": "AdamW optimizer step" if optimizer else "forward + backward only",
        "batch_budget_s": budget_s,
        "variants": summary,
        "lean_vs_full": {
            "throughput_wall": lean["audio_h_per_wall_h"] / full["audio_h_per_wall_h"],
            "throughput_cpu": lean["audio_h_per_cpu_h"] / full["audio_h_per_cpu_h"],
            "peak_rss": lean["peak_rss_mb"] / full["peak_rss_mb"],
            "step_peak": lean["step_peak_mb"] / full["step_peak_mb"],
        },
        "steps": steps,
    }


def loss_only(
    trainer: loop.Trainer, utterances: int, seconds: float, budget_s: float
) -> dict[str, Any]:
    """The two loss paths alone, forward + backward, on the model's joint and a larger batch.

    `utterances` utterances of `seconds` each, 3 tokens per second; random joint inputs.
    """
    device = trainer.info.device
    decoder = trainer.config.decoder
    frames, labels = round(seconds / FRAME_S), round(seconds * TOKENS_PER_S)
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(utterances, frames, decoder.joint_hidden, generator=g)  # (B, T, J)
    pred = torch.randn(utterances, labels + 1, decoder.joint_hidden, generator=g)  # (B, U+1, J)
    targets = torch.randint(1, decoder.vocab_size, (utterances, labels), generator=g)
    enc_lengths = torch.full((utterances,), frames)
    target_lengths = torch.full((utterances,), labels)
    joint_net = trainer.net.joint.joint_net
    out: dict[str, Any] = {
        "utterances": utterances,
        "seconds_each": seconds,
        "frames": frames,
        "labels": labels,
        "full_logits_mb": utterances * frames * (labels + 1) * (decoder.blank_id + 1) * 4 / 2**20,
        "joint_chunks": lean_chunks(utterances, frames, labels, decoder),
    }
    order = (("lean", rnnt_loss_from_parts), ("full", full_logits_loss))
    started = time.perf_counter()
    while "full" not in out or time.perf_counter() - started < budget_s:
        for variant, loss_fn in order:
            e, p = enc.to(device).requires_grad_(), pred.to(device).requires_grad_()
            args = (targets.to(device), enc_lengths.to(device), target_lengths.to(device))
            start_rss = reset_peak_memory(device)
            wall, cpu = time.perf_counter(), time.process_time()
            loss_fn(joint_net, e, p, *args, decoder.blank_id, reduction="sum").backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            trainer.optimizer.zero_grad(set_to_none=True)
            peaks = peak_memory(device)
            run = out.setdefault(variant, {"runs": 0, "wall_s": 0.0, "cpu_s": 0.0, "peak_mb": 0.0})
            run["runs"] += 1
            run["wall_s"] += wall
            run["cpu_s"] += cpu
            peak = peaks.get("peak_gpu_mb", peaks["peak_rss_mb"] - start_rss)
            run["peak_mb"] = max(run["peak_mb"], peak)
            print(f"   loss only {variant}: {wall:.2f} s, +{run['peak_mb']:.0f} MB", flush=True)
    lean, full = out["lean"], out["full"]
    out["lean_vs_full"] = {
        "speed_cpu": (full["cpu_s"] / full["runs"]) / (lean["cpu_s"] / lean["runs"]),
        "peak": lean["peak_mb"] / full["peak_mb"],
    }
    return out


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    audio = sum(s["audio_s"] for s in steps)
    wall = sum(s["wall_s"] for s in steps)
    cpu = sum(s["cpu_s"] for s in steps)
    out = {
        "steps": len(steps),
        "utterances": sum(s["utterances"] for s in steps),
        "audio_s": audio,
        "wall_s": wall,
        "cpu_s": cpu,
        "audio_h_per_wall_h": audio / wall,
        "audio_h_per_cpu_h": audio / cpu,
        "s_per_step_wall": wall / len(steps),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in steps),
        "step_peak_mb": max(s["step_peak_mb"] for s in steps),
        "max_joint_chunks": max(s["joint_chunks"] for s in steps),
    }
    if "peak_gpu_mb" in steps[0]:
        out["peak_gpu_mb"] = max(s["peak_gpu_mb"] for s in steps)
    return out


# -------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    lines = [
        "# Training throughput (caster.train.loop steps, synthetic audio)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB{gpu}; torch "
        f"{m['torch']}, {m['threads']} thread(s). Load average at start "
        f"{results['load_average_start']}, at end {results['load_average_end']} "
        "(other processes shared the machine: the CPU-time columns are this process's own).",
        "",
        "Each step: the loop's `Trainer._optimizer_step` (context drawn per step from the "
        "trained contexts, prompt, dither, mel, SpecAugment, encoder, RNN-T loss, backward, "
        "clipping, AdamW) on noise utterances of 4-8 s with random targets of 3 tokens/s. "
        "`lean` is the loop's `rnnt_loss_from_parts`; `full` (the baseline) is `rnnt_loss` "
        "on the full (B, T, U+1, V+1) joint logits; the two alternate on the same batches. "
        "Step peak = peak RSS during the step minus the RSS at its start: activations, "
        "logits and the gradients (freed after each step), not the weights and optimizer state.",
        "",
        "| model | step | RNN-T loss | steps | utt/step | audio s/step | s/step (wall) "
        "| audio h / wall h | audio h / CPU h | peak RSS MB | step peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        for variant, v in case["variants"].items():
            cells = [
                name,
                case["step"],
                variant,
                str(v["steps"]),
                f"{v['utterances'] / v['steps']:.1f}",
                f"{v['audio_s'] / v['steps']:.1f}",
                f"{v['s_per_step_wall']:.2f}",
                f"{v['audio_h_per_wall_h']:.2f}",
                f"{v['audio_h_per_cpu_h']:.2f}",
                f"{v['peak_rss_mb']:.0f}",
                f"{v['step_peak_mb']:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Lean loss against the full-logits baseline (ratio lean / full):", ""]
    lines += ["| model | throughput (wall) | throughput (CPU) | peak RSS | step peak |"]
    lines += ["|---|---|---|---|---|"]
    for name, case in results["cases"].items():
        r = case["lean_vs_full"]
        cells = [f"{r[k]:.2f}" for k in ("throughput_wall", "throughput_cpu", "peak_rss")]
        lines.append(f"| {name} | " + " | ".join([*cells, f"{r['step_peak']:.2f}"]) + " |")
    for name, case in results["cases"].items():
        chunks = case["variants"]["lean"]["max_joint_chunks"]
        lines.append(
            f"\n{name}: {case['trained_weights'] / 1e6:.1f}M weights, batches of at most "
            f"{case['batch_budget_s']:g} s of padded audio; {case['step']}. The lean loss ran "
            f"the joint in at most {chunks} chunk(s) per step "
            "(its default chunk holds 2^26 logits); with one chunk it differs from the "
            "baseline only by recomputing the joint's logits in the backward pass."
        )
    if "loss_only" in results:
        lo = results["loss_only"]
        lines += [
            "",
            f"## Loss alone on the 0.6B joint, a larger batch ({results['loss_only_model']})",
            "",
            f"joint_net + RNN-T loss, forward + backward, on random joint inputs: "
            f"{lo['utterances']} utterances of {lo['seconds_each']:g} s ({lo['frames']} frames, "
            f"{lo['labels']} labels each); the full logits take {lo['full_logits_mb']:.0f} MB, "
            f"the lean loss runs {lo['joint_chunks']} chunk(s).",
            "",
            "| RNN-T loss | runs | s per run (wall) | s per run (CPU) | peak MB above start |",
            "|---|---|---|---|---|",
        ]
        for variant in ("lean", "full"):
            v = lo[variant]
            lines.append(
                f"| {variant} | {v['runs']} | {v['wall_s'] / v['runs']:.2f} | "
                f"{v['cpu_s'] / v['runs']:.2f} | {v['peak_mb']:.0f} |"
            )
        r = lo["lean_vs_full"]
        lines += [
            "",
            f"Lean / full: speed (CPU) {r['speed_cpu']:.2f}, peak memory {r['peak']:.2f}.",
        ]
    lines += ["", *results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tiny-seconds", type=float, default=90.0, help="tiny: timed seconds")
    parser.add_argument("--big-seconds", type=float, default=120.0, help="0.6B: timed seconds")
    parser.add_argument("--big-batch-seconds", type=float, default=16.0)
    parser.add_argument("--loss-utterances", type=int, default=8, help="loss alone: batch")
    parser.add_argument("--loss-seconds", type=float, default=30.0, help="loss alone: seconds")
    parser.add_argument("--skip-big", action="store_true", help="only the tiny model")
    parser.add_argument("--no-optimizer", action="store_true", help="0.6B: forward + backward only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "machine": machine(device),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cases": {},
        "notes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(Path(tmp), None, args.device)
        budget = trainer.cfg.data.max_batch_seconds
        results["cases"]["tiny (examples/train_tiny.yaml)"] = run_case(
            "tiny", trainer, budget, 3, args.tiny_seconds, optimizer=True
        )
    del trainer
    if not args.skip_big:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(Path(tmp), PRESET, args.device)
            weights = sum(p.numel() for p in trainer.params)
            need_gb = weights * TRAIN_BYTES_PER_WEIGHT / 2**30 + ACTIVATION_HEADROOM_GB
            free_gb = _meminfo_kb("MemAvailable") / 2**20
            optimizer = not args.no_optimizer and (device.type == "cuda" or free_gb >= need_gb)
            if not optimizer:
                results["notes"].append(
                    f"0.6B: forward + backward only, no AdamW step ({free_gb:.1f} GB available, "
                    f"about {need_gb:.1f} GB needed with AdamW's states, or --no-optimizer)."
                )
            results["cases"][f"{PRESET} (random init)"] = run_case(
                "0.6B", trainer, args.big_batch_seconds, 2, args.big_seconds, optimizer
            )
            print("== loss alone, 0.6B joint", flush=True)
            results["loss_only_model"] = PRESET
            results["loss_only"] = loss_only(trainer, args.loss_utterances, 8.0, args.loss_seconds)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.type}_train"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
