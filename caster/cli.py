"""Command line: `caster transcribe`, `stream`, `bench`, `train` and `eval`.

Every subcommand is an `add_*_arguments(parser)` / `run_*(args) -> int` pair;
`main` parses and dispatches. Exit status: 0 done, 1 some inputs failed,
2 unusable arguments, model or manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import soxr
from tqdm import tqdm

import caster
from caster.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, AudioError, as_audio, load_audio
from caster.corpus import cli as corpus_cli
from caster.endpoint import EndpointConfig
from caster.engine import Engine
from caster.formats import EXTENSIONS, FORMATS, render
from caster.manifest import (
    ManifestError,
    manifest_requests,
    prediction_record,
    read_manifest,
    score,
    score_table,
    write_jsonl,
)
from caster.model import Model
from caster.results import Segment
from caster.server import cli as server_cli
from caster.train.cli import add_eval_arguments, add_train_arguments, run_eval, run_train
from caster.transcribe import transcribe_many

MODEL_HELP = (
    "a .nemo file, a Hugging Face or caster model directory, or preset:<name>; default: "
    "caster's built-in demonstration model (caster/models/caster-demo-40)"
)
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


class _Formatter(argparse.HelpFormatter):
    """Wrap descriptions, but keep the line breaks of an "examples:" epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caster",
        description="Cache-aware streaming speech recognition (FastConformer-RNNT) without NeMo.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add, run in (
        ("transcribe", "transcribe audio files or a NeMo manifest", add_transcribe_arguments,
         run_transcribe),
        ("stream", "live recognition of a file or of raw PCM on stdin", add_stream_arguments,
         run_stream),
        ("bench", "run the benchmarks in bench/ (source checkout)", add_bench_arguments,
         run_bench),
        ("train", "train or fine-tune a model", add_train_arguments, run_train),
        ("eval", "score a model on manifests (WER/CER)", add_eval_arguments, run_eval),
        ("serve", "serve live (WebSocket) and file (HTTP) transcription", server_cli.add_arguments,
         server_cli.run),
    ):  # fmt: skip
        sub = commands.add_parser(name, help=help_text, formatter_class=_Formatter)
        add(sub)
        sub.set_defaults(run=run)
    data = commands.add_parser("data", help="build training data", formatter_class=_Formatter)
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    build = data_commands.add_parser(
        "build", help="a 40-locale corpus from registry packages", formatter_class=_Formatter
    )
    corpus_cli.add_arguments(build)
    build.set_defaults(run=corpus_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


# ----------------------------------------------------------------------------- transcribe


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Transcribe audio files (wav, flac, ogg, mp3, ...) or the entries of a NeMo JSONL "
        "manifest. Files are batched by length; recordings longer than --long-audio-seconds "
        "are streamed through the encoder so memory stays flat."
    )
    parser.epilog = (
        "examples:\n"
        "  caster transcribe --model model.nemo talk.wav\n"
        "  caster transcribe --model model.nemo --format srt --output-dir subs/ *.mp3\n"
        "  caster transcribe --model model.nemo --manifest test.jsonl --output-dir out/"
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="audio files")
    _add_model_arguments(parser, " (in a manifest: each entry's own language)")
    parser.add_argument(
        "--chunk-ms",
        type=int,
        default=None,
        metavar="MS",
        help="latency whose attention context to use: 80, 160, 320, 560 or 1120 where the "
        "model supports it (default: the model's own); the text equals a stream's at that "
        "latency",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write one file per input there (NAME.txt/.json/.srt/.vtt), or the manifest "
        "with pred_text (NAME.pred.jsonl) and its error rates (NAME.wer.json); "
        "default: standard output",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="JSONL",
        help="NeMo JSONL manifest to transcribe instead of FILES; writes the manifest with "
        "pred_text (JSONL, whatever --format) and reports WER/CER where it has reference text",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="score WER/CER on case-folded text without punctuation",
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=None,
        metavar="S",
        help="padded audio per offline batch (default: 600 on a GPU, 30 on a CPU)",
    )
    parser.add_argument(
        "--long-audio-seconds",
        type=float,
        default=120.0,
        metavar="S",
        help="recordings longer than this take the streaming path (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_transcribe(args: argparse.Namespace) -> int:
    if bool(args.files) == (args.manifest is not None):
        return _usage("give audio files or --manifest, not both and not neither")
    several = len(args.files) > 1 and args.output_dir is None
    if several and args.format in ("srt", "vtt"):
        return _usage(f"--format {args.format} for several files needs --output-dir")
    model = _load_model(args)
    if model is None:
        return 2
    if args.manifest is not None:
        return _transcribe_manifest(model, args)
    try:
        results = transcribe_many(
            model,
            args.files,
            args.language,
            args.chunk_ms,
            batch_seconds=args.batch_seconds,
            long_audio_seconds=args.long_audio_seconds,
        )
    except ValueError as e:
        return _usage(str(e))
    status = 0
    names = _OutputNames(args.output_dir, EXTENSIONS[args.format])
    with _progress(len(args.files), args.no_progress) as bar:
        for result in results:
            bar.update(1)
            if result.error is not None:
                bar.write(f"caster: {result.error}", file=sys.stderr)
                status = 1
                continue
            if args.output_dir is not None:
                names.next(result.source).write_text(render(result, args.format), "utf-8")
            elif args.format == "text" and len(args.files) > 1:
                bar.write(f"{result.source}\t{result.text}", file=sys.stdout)
            else:
                bar.write(render(result, args.format).rstrip("\n"), file=sys.stdout)
    return status


def _transcribe_manifest(model: Model, args: argparse.Namespace) -> int:
    try:
        model.prompt_index(args.language)  # a bad --language is a usage error, not per entry
        manifest = read_manifest(args.manifest)
        requests, notes = manifest_requests(model, manifest, args.language)
        results = transcribe_many(
            model,
            requests,
            None,
            args.chunk_ms,
            batch_seconds=args.batch_seconds,
            long_audio_seconds=args.long_audio_seconds,
        )
    except (ManifestError, ValueError) as e:
        return _usage(str(e))
    for message in manifest.problems + notes:
        print(f"caster: {message}", file=sys.stderr)
    records, scored, failed = [], [], 0
    with _progress(len(requests), args.no_progress) as bar:
        for entry, result in zip(manifest.entries, results, strict=True):
            bar.update(1)
            if result.error is not None:
                bar.write(f"caster: {args.manifest}:{entry.line}: {result.error}", file=sys.stderr)
                failed += 1
                continue
            records.append(prediction_record(entry, result))
            if entry.text is not None:
                scored.append((entry.text, result.text, entry.language or result.language))
    skipped = len(manifest.problems) + failed
    if skipped:
        print(
            f"caster: skipped {skipped} of {len(manifest.problems) + len(manifest.entries)} "
            f"manifest entries ({len(manifest.problems)} unusable lines, {failed} unreadable "
            "audio files)",
            file=sys.stderr,
        )
    scores = score(scored, normalize=args.normalize)
    stem = args.manifest.name.removesuffix(".jsonl").removesuffix(".json")
    if args.output_dir is None:
        write_jsonl(records, sys.stdout)
    else:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        with (args.output_dir / f"{stem}.pred.jsonl").open("w", encoding="utf-8") as out:
            write_jsonl(records, out)
        if scores:
            rates = [{**vars(s), "rate": s.rate} for s in scores]
            (args.output_dir / f"{stem}.wer.json").write_text(json.dumps(rates, indent=2) + "\n")
    for line in score_table(scores) if scores else ():
        print(line, file=sys.stderr)
    return 1 if skipped else 0


class _OutputNames:
    """DIR/<stem><ext> per input; a stem seen before gets -2, -3, ... (never overwrites)."""

    def __init__(self, folder: Path | None, extension: str) -> None:
        self.folder, self.extension = folder, extension
        self.used: set[str] = set()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def next(self, source: str) -> Path:
        assert self.folder is not None
        stem = Path(source).stem or "audio"
        name, n = stem, 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}"
        self.used.add(name)
        return self.folder / f"{name}{self.extension}"


# ----------------------------------------------------------------------------- stream


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Recognize live: interim hypotheses are shown as they change (overwritten on a "
        "terminal, lines marked '…' otherwise) and every final segment is printed with its "
        "times. The input is an audio file, or '-' for raw mono PCM on standard input."
    )
    parser.epilog = (
        "examples:\n"
        "  caster stream --model model.nemo --realtime talk.wav\n"
        "  ffmpeg -loglevel quiet -i talk.mp3 -f s16le -ac 1 -ar 16000 - | \\\n"
        "      caster stream --model model.nemo -"
    )
    parser.add_argument("input", metavar="FILE", help="audio file, or - for raw PCM on stdin")
    _add_model_arguments(parser, "")
    parser.add_argument(
        "--chunk-ms",
        type=int,
        default=None,
        metavar="MS",
        help="latency: 80, 160, 320, 560 or 1120 where the model supports it "
        "(default: the model's own context)",
    )
    parser.add_argument(
        "--realtime", action="store_true", help="feed the audio no faster than real time"
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=16000,
        metavar="HZ",
        help="rate of the raw PCM on stdin (default: %(default)s)",
    )
    parser.add_argument(
        "--encoding",
        choices=["pcm16", "float32"],
        default="pcm16",
        help="sample format of the raw PCM on stdin, little-endian mono (default: %(default)s)",
    )
    parser.add_argument(
        "--silence-ms",
        type=int,
        default=800,
        metavar="MS",
        help="a pause longer than this ends a segment (default: %(default)s)",
    )
    parser.add_argument("--final-only", action="store_true", help="print final segments only")


STREAM_BLOCK_S = 0.1  # audio per feed: interim results follow speech within ~100 ms + latency


def run_stream(args: argparse.Namespace) -> int:
    model = _load_model(args)
    if model is None:
        return 2
    try:
        endpointing = EndpointConfig(silence_ms=args.silence_ms)
        engine = Engine(model, max_batch=1)
        handle = engine.open(args.language, args.chunk_ms, endpointing)
        if args.input == "-":
            blocks = _pcm_blocks(sys.stdin.buffer, args.sample_rate, args.encoding)
        else:
            blocks = _array_blocks(load_audio(args.input, model.config.mel.sample_rate))
    except ValueError as e:
        return _usage(str(e))
    display = _LiveDisplay(sys.stdout, args.final_only)
    start, fed = time.monotonic(), 0.0
    try:
        for block in blocks:
            if args.realtime:
                time.sleep(max(0.0, start + fed - time.monotonic()))
            handle.feed(block)
            fed += len(block) / model.config.mel.sample_rate
            while engine.step():
                pass
            display.show(handle.events())
    except KeyboardInterrupt:  # possibly inside a step: the stream cannot be finished
        display.close()
        return 130
    except ValueError as e:  # malformed PCM
        display.close()
        return _usage(str(e))
    handle.end()
    while engine.step():
        pass
    display.show(handle.events())
    handle.finish()
    display.close()
    return 0


def _array_blocks(samples: np.ndarray) -> Iterator[np.ndarray]:
    step = int(STREAM_BLOCK_S * 16000)
    for i in range(0, len(samples), step):
        yield samples[i : i + step]


def _pcm_blocks(stream: object, sample_rate: int, encoding: str) -> Iterator[np.ndarray]:
    """Raw little-endian mono PCM from a binary stream, as 16 kHz float32 blocks."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"--sample-rate {sample_rate} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz"
        )
    dtype = np.dtype("<i2") if encoding == "pcm16" else np.dtype("<f4")
    resampler = None if sample_rate == 16000 else soxr.ResampleStream(sample_rate, 16000, 1)
    want = max(1, int(STREAM_BLOCK_S * sample_rate)) * dtype.itemsize
    leftover = b""
    while True:
        data = stream.read(want)
        last = not data
        data, leftover = leftover + (data or b""), b""
        whole = len(data) - len(data) % dtype.itemsize
        data, leftover = data[:whole], data[whole:]
        samples = np.zeros(0, dtype=np.float32)
        if data:  # as_audio scales int16 PCM to [-1, 1] and rejects NaN/Inf
            samples = as_audio(np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("=")))
        if resampler is not None:
            samples = resampler.resample_chunk(samples, last=last)
        if samples.size:
            yield samples
        if last:
            return


class _LiveDisplay:
    """Interim hypotheses overwrite one terminal line (or print as '… ' lines); finals stay."""

    def __init__(self, out: TextIO, final_only: bool) -> None:
        self.out = out
        self.final_only = final_only
        self.tty = out.isatty()
        self.interim = False  # an interim line is on screen

    def show(self, segments: Sequence[Segment]) -> None:
        for s in segments:
            if s.is_final:
                self._clear()
                self.out.write(f"[{s.start:8.2f} - {s.end:8.2f}] {s.text}\n")
            elif not self.final_only:
                self._clear()
                if self.tty:
                    width = max(20, os.get_terminal_size(self.out.fileno()).columns - 3)
                    self.out.write("… " + s.text[-width:])
                    self.interim = True
                else:
                    self.out.write(f"… {s.text}\n")
        self.out.flush()

    def close(self) -> None:
        self._clear()
        self.out.flush()

    def _clear(self) -> None:
        if self.interim:
            self.out.write("\r\033[K")
            self.interim = False


# ----------------------------------------------------------------------------- bench


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    suites = ", ".join(_bench_suites()) or "none found"
    parser.description = (
        "Run the benchmark scripts in the source checkout's bench/ folder, each in its own "
        f"process (available: {suites}). Arguments after the suite name go to its script; "
        "see `caster bench SUITE --help`."
    )
    parser.add_argument(
        "suite", nargs="?", default=None, help="which benchmark (default: every bench_*.py)"
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def run_bench(args: argparse.Namespace) -> int:
    suites = _bench_suites()
    if not suites:
        return _usage(f"no benchmarks found: {BENCH_DIR} is part of the source checkout only")
    if args.suite is not None and args.suite not in suites:
        return _usage(f"unknown benchmark {args.suite!r}; available: {', '.join(suites)}")
    chosen = [args.suite] if args.suite is not None else list(suites)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR.parent), *sys.path])}
    status = 0
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        command = [sys.executable, str(suites[name]), *args.script_args]
        status = max(status, subprocess.run(command, env=env, check=False).returncode)
    return status


def _bench_suites() -> dict[str, Path]:
    """Suite name -> script: bench/bench_<name>.py."""
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


# ----------------------------------------------------------------------------- helpers


def _add_model_arguments(parser: argparse.ArgumentParser, language_note: str) -> None:
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument(
        "--language",
        default=None,
        metavar="LOCALE",
        help="locale such as en-US, or auto; default: auto where the model has a language "
        f"prompt{language_note}",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="CPU fast path: int8 weights for the large layers (accuracy cost in bench/results)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bf16", "fp16"],
        default="float32",
        help="GPU fast path: run the encoder and prediction network in bf16 or fp16 "
        "(mel, prompt and joint stay float32; accuracy cost in bench/results)",
    )


def _load_model(args: argparse.Namespace) -> Model | None:
    try:
        return caster.load(args.model, device=args.device, int8=args.int8, dtype=args.dtype)
    except (ValueError, OSError, RuntimeError) as e:  # bad file, bad device
        name = args.model if args.model is not None else "the default model"
        print(f"caster: cannot load {name}: {e}", file=sys.stderr)
        return None


def _progress(total: int, off: bool) -> tqdm:
    # disable=None: a bar only when stderr is a terminal.
    return tqdm(total=total, unit="file", file=sys.stderr, disable=True if off else None)


def _usage(message: str) -> int:
    print(f"caster: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
