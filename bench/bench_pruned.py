"""Pruned RNN-T loss against the full lattice: forward + backward of the training loss.

The model is caster's built-in one (caster/models/caster-demo-40: joint 160, 2,049 outputs,
where the joint is most of a transducer step), or any `--model`. Each step is the loop's
`TransducerLoss` forward (dither, mel, encoder, prompt, prediction network, loss) and its
backward, on synthetic batches from bench_train (noise utterances of 4-8 s, random targets of
3 tokens/s, as many as fit `--batch-seconds` of padded audio). Baseline, in the same process:
the same step with `model.prune_range` 0 (the joint on every node of the lattice); the pruned
variant adds the simple loss's two heads and runs the joint on `--prune-range` label
positions per frame. The two alternate on the same batches and contexts, so load on a shared
machine hits both alike. The pruned loss is an upper bound of the full one (fewer paths);
with random heads its windows are arbitrary, so the loss values are not compared here
(tests/test_train_loss.py checks the losses; tests/test_train_loop.py that it learns).

Run: PYTHONPATH=. .venv/bin/python bench/bench_pruned.py
Writes bench/results/<device>_pruned.json and .md (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import LANGUAGE, RESULTS, machine, synthetic_batch

import caster
from caster.languages import resolve_language
from caster.model import DEFAULT_MODEL
from caster.train.config import AugmentSection
from caster.train.loop import TransducerLoss, sample_context, step_generator


def timed(loss: TransducerLoss, batch, prompts, context, device) -> dict[str, float]:
    """One forward + backward of `loss` on `batch`: wall and CPU seconds."""
    batch = batch.to(device)
    generator = step_generator(0, 0, 0, 0)
    wall, cpu = time.perf_counter(), time.process_time()
    losses = loss(
        batch.audio, batch.audio_lengths, batch.targets, batch.target_lengths,
        prompts, context, generator,
    )  # fmt: skip
    (losses.sum() / batch.size).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    loss.zero_grad(set_to_none=True)
    return {"wall_s": wall, "cpu_s": cpu, "audio_s": float(batch.audio_lengths.sum()) / 16000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: caster's built-in model")
    parser.add_argument("--prune-range", type=int, default=5)
    parser.add_argument("--batch-seconds", type=float, default=12.0)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = caster.load(args.model, device=device)
    net = model.net.float().train()
    augment = AugmentSection(spec_augment=None)
    variants = {
        "full": TransducerLoss(net, augment).to(device),
        "pruned": TransducerLoss(net, augment, prune_range=args.prune_range).to(device),
    }
    vocab = model.config.decoder.vocab_size
    prompt = resolve_language(LANGUAGE, model.config.prompt)
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for pair in range(args.pairs + 1):  # pair 0 warms up
        batch = synthetic_batch(rng, args.batch_seconds, vocab)
        prompts = None if prompt is None else torch.full((batch.size,), prompt, device=device)
        context = sample_context(model.config.encoder, 0, pair)
        order = list(variants) if pair % 2 else list(variants)[::-1]
        for name in order:
            run = timed(variants[name], batch, prompts, context, device)
            if pair:
                runs[name].append(run)
            print(f"pair {pair} {name}: {batch.size} utt, {run['wall_s']:.3f} s", flush=True)

    def total(name: str, key: str) -> float:
        return sum(r[key] for r in runs[name])

    results: dict[str, Any] = {
        "machine": machine(device),
        "model": Path(args.model or DEFAULT_MODEL).name,
        "prune_range": args.prune_range,
        "batch_seconds": args.batch_seconds,
        "pairs": args.pairs,
        "variants": {
            name: {
                "s_per_step_wall": total(name, "wall_s") / args.pairs,
                "s_per_step_cpu": total(name, "cpu_s") / args.pairs,
                "audio_h_per_wall_h": total(name, "audio_s") / total(name, "wall_s"),
            }
            for name in variants
        },
    }
    full, pruned = results["variants"]["full"], results["variants"]["pruned"]
    results["speedup_wall"] = full["s_per_step_wall"] / pruned["s_per_step_wall"]
    results["speedup_cpu"] = full["s_per_step_cpu"] / pruned["s_per_step_cpu"]
    out = args.out or RESULTS / f"{device.type}_pruned"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Pruned RNN-T loss against the full lattice (training forward + backward)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {m['threads']} "
        f"thread(s). Model: {results['model']}. Batches of at most "
        f"{results['batch_seconds']:g} s of padded noise audio (4-8 s utterances, 3 tokens/s), "
        f"{results['pairs']} pairs after a warm-up pair, alternating.",
        "",
        "| loss | s per step (wall) | s per step (CPU) | audio h / wall h |",
        "|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        label = f"pruned, prune_range {results['prune_range']}" if name == "pruned" else name
        lines.append(
            f"| {label} | {v['s_per_step_wall']:.3f} | {v['s_per_step_cpu']:.3f} "
            f"| {v['audio_h_per_wall_h']:.1f} |"
        )
    lines += [
        "",
        f"Pruned against full: {results['speedup_wall']:.2f}x faster (wall), "
        f"{results['speedup_cpu']:.2f}x (CPU time).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
