"""`caster data build`: command-line front end of `caster.corpus.build`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from caster.corpus.asterisk import AsteriskError
from caster.corpus.build import ENGINES, SPLITS, BuildConfig, CorpusError, build
from caster.corpus.synth import SynthesisError
from caster.corpus.text import TEXT_SOURCES, TextSourceError
from caster.languages import NEMOTRON_3_5_LOCALES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `caster data build` to its (sub)parser."""
    parser.add_argument("--out", required=True, help="output folder (manifests and audio)")
    parser.add_argument(
        "--locales",
        default=",".join(NEMOTRON_3_5_LOCALES),
        help="comma-separated locales (default: all 40 of Nemotron 3.5)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated speech sources of {', '.join(ENGINES)} (default: all)",
    )
    parser.add_argument(
        "--text-sources",
        default=",".join(TEXT_SOURCES),
        help=f"comma-separated text sources of {', '.join(TEXT_SOURCES)} (default: all)",
    )
    parser.add_argument(
        "--max-per-split",
        type=int,
        default=None,
        help="at most N sentences (and recorded prompts) per locale, split and engine",
    )
    parser.add_argument(
        "--voices-per-sentence",
        type=int,
        default=1,
        help="synthesized versions of each training sentence (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="build seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=2, help="rendering processes; 0 = in-process (default 2)"
    )
    parser.add_argument("--no-augment", action="store_true", help="no reverberation or noise")
    parser.add_argument(
        "--max-duration", type=float, default=20.0, help="skip longer utterances (s, default 20)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the corpus; print the manifest line counts. Returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = BuildConfig(
        out=Path(args.out),
        locales=_list(args.locales),
        engines=_list(args.engines),
        text_sources=_list(args.text_sources),
        max_per_split=args.max_per_split,
        voices_per_sentence=args.voices_per_sentence,
        seed=args.seed,
        workers=args.workers,
        augment=not args.no_augment,
        max_duration_s=args.max_duration,
        progress=not args.no_progress,
    )
    try:
        report = build(config)
    except (CorpusError, TextSourceError, AsteriskError, SynthesisError) as e:
        print(f"caster data build: {e}", file=sys.stderr)
        return 2
    print(f"{'locale':8} " + " ".join(f"{split:>6}" for split in SPLITS))
    for locale in config.locales:
        counts = " ".join(f"{report.lines.get((split, locale), 0):6d}" for split in SPLITS)
        print(f"{locale:8} {counts}")
    print(f"rendered {report.rendered}, reused {report.reused}, skipped {report.skipped.total()}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {count:5d}: {reason}")
    return 0


def _list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run `caster data build` on its own (`python -m caster.corpus.cli --out DIR ...`)."""
    parser = argparse.ArgumentParser(prog="caster data build", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
