"""Command line: `caster train CONFIG.yaml [--key=value ...]`, `caster eval MANIFEST --model M`.

Each subcommand is an `add_*_arguments(parser)` / `run_*(args) -> int` pair that
`caster/cli.py` attaches to its subparsers. Under `torchrun` the same `caster train`
command trains data-parallel in every process (see `caster.train.distributed`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from caster.train.evaluate import ErrorCounts


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train or fine-tune a cache-aware FastConformer-RNNT model. Every config key can be "
        "overridden as --section.key=value (the value is YAML), e.g. --optim.lr=3e-4 "
        "--data.train=[a.jsonl,b.jsonl]. See examples/train_tiny.yaml for every key."
    )
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--key=value",
        help="config overrides, dotted keys",
    )


def run_train(args: argparse.Namespace) -> int:
    from caster.train.config import load_train_config
    from caster.train.loop import train

    main = os.environ.get("RANK", "0") == "0"  # torchrun's other processes report only problems
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        cfg = load_train_config(args.config, args.overrides)
        exported = train(cfg)
    except ValueError as e:
        print(f"caster: {e}", file=sys.stderr)
        return 2
    if exported is not None and main:
        print(f"model written to {exported} and {exported.parent / 'model.nemo'}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score a model on manifests: WER (CER for zh, ja, ko, th) per chunk size and language."
    )
    parser.add_argument("manifests", nargs="+", help="JSON-lines manifests with reference text")
    parser.add_argument(
        "--model",
        default=None,
        help="a .nemo file, a Hugging Face or caster model directory, or preset:<name>; "
        "default: caster's built-in demonstration model",
    )
    parser.add_argument(
        "--language",
        default=None,
        help="prompt every utterance with this locale, or 'auto' (default: each "
        "utterance's own language from the manifest, auto where it has none)",
    )
    parser.add_argument(
        "--chunk-ms",
        type=int,
        nargs="+",
        default=None,
        help="chunk sizes to score (default: one per trained attention context)",
    )
    parser.add_argument("--batch-seconds", type=float, default=120.0, help="audio per batch")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--format", choices=["text", "json"], default="text")


def run_eval(args: argparse.Namespace) -> int:
    import caster
    from caster.languages import resolve_language
    from caster.train.data import SkipCounter, read_manifest
    from caster.train.evaluate import (
        error_rates,
        language_id_rates,
        prompt_modes,
        score_entries,
        trained_chunk_ms,
    )

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        model = caster.load(args.model, device=args.device)
        config = model.config
        chunks = args.chunk_ms or trained_chunk_ms(config)
        for ms in chunks:
            config.context_for_chunk_ms(ms)  # rejects impossible chunk sizes up front
        index = None if args.language is None else resolve_language(args.language, config.prompt)
        if index is None:  # each utterance's own language (or no prompt at all)
            modes = prompt_modes(config.prompt, "language")
        else:

            def fixed(languages: list[str | None]) -> torch.Tensor:
                return torch.full((len(languages),), index, dtype=torch.long)

            modes = {args.language: fixed}
        skips = SkipCounter()
        entries = [e for path in args.manifests for e in read_manifest(path, skips)]
        scores = score_entries(
            model, entries, chunks, modes, args.batch_seconds, args.workers, skips
        )
    except ValueError as e:
        print(f"caster: {e}", file=sys.stderr)
        return 2
    if skips.total:
        print(f"caster: not scored: {skips.summary()}", file=sys.stderr)
    if args.format == "json":
        rates = error_rates(scores.errors) | language_id_rates(scores.language_id)
        print(json.dumps(rates, indent=2))
    else:
        print(format_report(scores.errors))
        for key, accuracy in language_id_rates(scores.language_id).items():
            print(f"language identification {key}: {100.0 * accuracy:.2f}%")
    return 0


def format_report(counts: ErrorCounts) -> str:
    """A table: one row per chunk size, prompt mode and language, plus pooled rows."""
    from caster.scoring import metric_of, pooled_counts

    rows = [
        (ms, mode, language, metric_of(language).upper(), count)
        for (ms, mode, language), count in sorted(counts.items())
    ]
    languages = {language for _, _, language in counts}
    if len(languages) > 1:
        for (ms, mode, metric), count in pooled_counts(counts).items():
            rows.append((ms, mode, "all", metric.upper(), count))
    rows.sort(key=lambda r: (r[0], r[1], r[2] == "all", r[2]))
    header = f"{'chunk':>8}  {'prompt':<10} {'language':<10} {'metric':<6} {'rate':>8}"
    lines = [f"{header}  errors/units"]
    for ms, mode, language, metric, count in rows:
        rate = 100.0 * count.errors / max(count.units, 1)
        lines.append(
            f"{ms:>5} ms  {mode:<10} {language:<10} {metric:<6} {rate:7.2f}%  "
            f"{count.errors}/{count.units}"
        )
    return "\n".join(lines)
