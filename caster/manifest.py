"""NeMo JSONL manifests in, manifests with `pred_text` out, and WER/CER per language.

A manifest has one JSON object per line: `audio_filepath` (relative paths are
relative to the manifest's folder), optionally `duration`, `text` (the
reference) and a language under `lang`, `language`, `locale` or `source_lang`.
A line that cannot be used is skipped and reported, never fatal. The line parser
(`manifest_lines`) also reads training manifests: `caster.train.data` adds its own
checks (duration and text required, offset) on top.

Error rates are corpus-level (all edits / all reference units, counted by
`caster.scoring`), on the texts as they are (as NeMo and `caster eval` score), or
after a light normalisation (case folded, punctuation removed, whitespace
collapsed) on request. zh, ja, ko and th are scored by characters without
whitespace (CER), all other languages by words (WER).
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from caster.languages import LanguageError
from caster.scoring import ErrorCount, add_count, count_errors, metric_of, pooled_counts, uses_cer
from caster.transcribe import FileResult, Request

if TYPE_CHECKING:
    from caster.model import Model

LANGUAGE_KEYS = ("lang", "language", "locale", "source_lang")
MAX_LINE_BYTES = 1 << 20


class ManifestError(ValueError):
    """A manifest file cannot be read at all (or, in training, cannot be mixed or batched)."""


class ManifestLineError(ValueError):
    """One manifest line cannot be used.

    line:   1-based line number
    reason: a short category ("invalid JSON", "missing field", ...) to count skips by
    detail: what exactly is wrong, may be empty
    """

    def __init__(self, line: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.line, self.reason, self.detail = line, reason, detail


@dataclass(frozen=True)
class ManifestEntry:
    """One usable manifest line.

    line:     1-based line number in the manifest
    audio:    the audio path, resolved against the manifest's folder
    text:     the reference transcript, if the line has one
    language: the language the line names (whitespace stripped), if any
    record:   the line's JSON object as read (written back with `pred_text`)
    """

    line: int
    audio: Path
    text: str | None
    language: str | None
    record: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: list[ManifestEntry]
    problems: list[str]  # "manifest.jsonl:3: why the line was skipped"


@dataclass(frozen=True)
class Score:
    """A corpus-level error rate: `errors / units` over `utterances` utterances."""

    language: str  # a locale, "none" (not given), or "all"
    metric: str  # "wer" or "cer"
    utterances: int
    errors: int
    units: int  # reference words (WER) or characters (CER)

    @property
    def rate(self) -> float:
        return self.errors / self.units if self.units else math.nan


def manifest_lines(path: str | os.PathLike) -> Iterator[ManifestEntry | ManifestLineError]:
    """Parse a NeMo JSONL manifest line by line; blank lines are passed over.

    Yields:
        per non-blank line, in file order, its entry or why it cannot be used.
    Raises:
        ManifestError: the file is missing or cannot be read.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                try:
                    yield _entry(raw, number, path.parent)
                except ManifestLineError as e:
                    yield e
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from e


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a NeMo JSONL manifest, keeping the usable lines and describing the others.

    Raises:
        ManifestError: the file is missing or cannot be read.
    """
    path = Path(path)
    entries, problems = [], []
    for item in manifest_lines(path):
        if isinstance(item, ManifestLineError):
            problems.append(f"{path}:{item.line}: {item}")
        else:
            entries.append(item)
    return Manifest(path, entries, problems)


def manifest_requests(
    model: Model, manifest: Manifest, language: str | None
) -> tuple[list[Request], list[str]]:
    """What to transcribe for each entry, and notes about languages the model lacks.

    `language` (from the user) applies to every entry when given. Otherwise an
    entry's own language is the prompt where the model has a prompt that knows
    it, and the model's default (auto) elsewhere.
    """
    notes = []
    requests = []
    for entry in manifest.entries:
        chosen = language
        if language is None and entry.language is not None and model.config.prompt is not None:
            try:
                model.prompt_index(entry.language)
                chosen = entry.language
            except LanguageError:
                notes.append(
                    f"{manifest.path}:{entry.line}: language {entry.language!r} is not in the "
                    "model's prompt dictionary; transcribed with the default"
                )
        requests.append(Request(entry.audio, chosen))
    return requests, notes


def prediction_record(entry: ManifestEntry, result: FileResult) -> dict[str, Any]:
    """The entry's JSON object with `pred_text` (and `pred_lang` when known) added."""
    record = dict(entry.record)
    record["pred_text"] = result.text
    if result.language is not None:
        record["pred_lang"] = result.language
    return record


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def normalize_text(text: str) -> str:
    """Case folded, punctuation and symbols removed, whitespace collapsed (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(kept.split())


def score(rows: Iterable[tuple[str, str, str | None]], normalize: bool = False) -> list[Score]:
    """Error rates per language, then pooled per metric.

    Args:
        rows: (reference, hypothesis, language) per utterance; rows whose
            reference is empty (after normalisation) are not scored.
        normalize: compare `normalize_text` forms instead of the texts as they are.
    Returns:
        one Score per language (sorted; "none" where no language was given),
        then one "all" Score per metric; empty when nothing could be scored.
    """
    counts: dict[tuple[str], ErrorCount] = {}
    for reference, hypothesis, language in rows:
        if normalize:
            reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
        if reference.strip():
            count = count_errors(reference, hypothesis, uses_cer(language))
            add_count(counts, (language or "none",), count)
    scores = [
        _score(language, metric_of(language), count)
        for (language,), count in sorted(counts.items())
    ]
    pooled = pooled_counts(counts)
    scores += [
        _score("all", metric, pooled[(metric,)]) for metric in ("wer", "cer") if (metric,) in pooled
    ]
    return scores


def _score(language: str, metric: str, count: ErrorCount) -> Score:
    return Score(language, metric, count.utterances, count.errors, count.units)


def score_table(scores: Iterable[Score]) -> Iterator[str]:
    """Lines of a small text table: language, metric, rate (%), utterances, errors/units."""
    yield f"{'language':<10} {'metric':<6} {'rate':>8} {'utts':>6} {'errors':>14}"
    for s in scores:
        yield (
            f"{s.language:<10} {s.metric:<6} {100 * s.rate:>7.2f}% {s.utterances:>6} "
            f"{f'{s.errors}/{s.units}':>14}"
        )


def _entry(raw: bytes, number: int, folder: Path) -> ManifestEntry:
    """One line's entry; raises ManifestLineError saying why the line is unusable."""
    if len(raw) > MAX_LINE_BYTES:
        raise ManifestLineError(number, "line too long", f"over {MAX_LINE_BYTES} bytes")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestLineError(number, "line is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ManifestLineError(number, "invalid JSON", e.msg) from None
    except (ValueError, RecursionError):  # an integer too long to parse, or nesting too deep
        raise ManifestLineError(number, "invalid JSON") from None
    if not isinstance(record, dict):
        raise ManifestLineError(number, "line is not a JSON object", type(record).__name__)
    if "audio_filepath" not in record:
        raise ManifestLineError(number, "missing field", "no audio_filepath")
    audio = record["audio_filepath"]
    if not isinstance(audio, str) or not audio.strip() or "\x00" in audio:
        raise ManifestLineError(number, "bad audio_filepath", repr(audio)[:100])
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise ManifestLineError(number, "text is not a string", type(text).__name__)
    language = next((record[k] for k in LANGUAGE_KEYS if record.get(k) is not None), None)
    if language is not None and not isinstance(language, str):
        raise ManifestLineError(number, "bad language", repr(language)[:100])
    path = Path(audio).expanduser()
    path = path if path.is_absolute() else folder / path
    return ManifestEntry(number, path, text, (language or "").strip() or None, record)
