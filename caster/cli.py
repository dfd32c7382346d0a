"""Command line: `caster transcribe FILES...`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import caster
from caster.config import STANDARD_CHUNK_MS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caster", description="Cache-aware streaming speech recognition."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser(
        "transcribe",
        help="transcribe audio files",
        description="Transcribe audio files (wav, flac, ogg, mp3, ...) and print the text.",
    )
    t.add_argument("files", nargs="+", help="audio files")
    t.add_argument(
        "--model",
        required=True,
        help="a .nemo file, a Hugging Face or caster model directory, or preset:<name>",
    )
    t.add_argument("--language", default=None, help="locale such as en-US, or auto (default)")
    t.add_argument(
        "--chunk-ms",
        type=int,
        default=None,
        choices=STANDARD_CHUNK_MS,
        help="latency whose attention context to use (default: the model's own)",
    )
    t.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = caster.load(args.model, device=args.device)
    except ValueError as e:
        print(f"caster: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.files:
        try:
            result = model.transcribe(path, language=args.language, chunk_ms=args.chunk_ms)
        except ValueError as e:  # bad audio, language or chunk size: report, go on
            print(f"caster: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        if args.format == "json":
            print(json.dumps({"file": path, **dataclasses.asdict(result)}, ensure_ascii=False))
        else:
            print(result.text.strip() if len(args.files) == 1 else f"{path}\t{result.text.strip()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
