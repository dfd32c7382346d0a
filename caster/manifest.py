"""NeMo JSONL manifests in, manifests with `pred_text` out, and WER/CER per language.

A manifest has one JSON object per line: `audio_filepath` (relative paths are
relative to the manifest's folder), optionally `duration`, `text` (the
reference) and a language under `lang`, `language`, `locale` or `source_lang`.
A line that cannot be used is skipped and reported, never fatal.

Error rates are corpus-level (all edits / all reference units) with `jiwer`, on
the texts as they are (as NeMo and `caster eval` score), or after a light
normalisation (case folded, punctuation removed, whitespace collapsed) on
request. zh, ja, ko and th are scored by characters without whitespace (CER),
all other languages by words (WER).
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jiwer

from caster.languages import LanguageError
from caster.model import Model
from caster.transcribe import FileResult, Request

LANGUAGE_KEYS = ("lang", "language", "locale", "source_lang")
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th"})
MAX_LINE_CHARS = 1 << 20


class ManifestError(ValueError):
    """The manifest file itself cannot be read."""


@dataclass(frozen=True)
class ManifestEntry:
    """One usable manifest line.

    line:     1-based line number in the manifest
    audio:    the audio path, resolved against the manifest's folder
    text:     the reference transcript, if the line has one
    language: the language the line names, if any
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


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a NeMo JSONL manifest, keeping the usable lines and describing the others.

    Raises:
        ManifestError: the file is missing, unreadable or not UTF-8 text.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    entries, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(_entry(line, number, path.parent))
        except ValueError as e:
            problems.append(f"{path}:{number}: {e}")
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


def metric_for(language: str | None) -> str:
    """The metric of a language: "cer" for zh, ja, ko and th, else "wer"."""
    if language is None:
        return "wer"
    return "cer" if language.replace("_", "-").split("-")[0].lower() in CER_LANGUAGES else "wer"


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
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for reference, hypothesis, language in rows:
        if normalize:
            reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
        if reference.strip():
            groups[language or "none"].append((reference, hypothesis))
    scores = [_score(language, groups[language]) for language in sorted(groups)]
    for metric in ("wer", "cer"):
        pooled = [s for s in scores if s.metric == metric]
        if pooled:
            scores.append(
                Score(
                    "all",
                    metric,
                    sum(s.utterances for s in pooled),
                    sum(s.errors for s in pooled),
                    sum(s.units for s in pooled),
                )
            )
    return scores


def _score(language: str, pairs: list[tuple[str, str]]) -> Score:
    metric = metric_for(None if language == "none" else language)
    if metric == "cer":
        # Spaces are not characters of these scripts: compare the characters alone.
        refs = ["".join(r.split()) for r, _ in pairs]
        hyps = ["".join(h.split()) for _, h in pairs]
        out = jiwer.process_characters(refs, hyps)
        units = sum(len(r) for r in refs)
    else:
        refs = [" ".join(r.split()) for r, _ in pairs]
        hyps = [" ".join(h.split()) for _, h in pairs]
        out = jiwer.process_words(refs, hyps)
        units = sum(len(r.split()) for r in refs)
    errors = out.substitutions + out.deletions + out.insertions
    return Score(language, metric, len(pairs), errors, units)


def score_table(scores: Iterable[Score]) -> Iterator[str]:
    """Lines of a small text table: language, metric, rate (%), utterances, errors/units."""
    yield f"{'language':<10} {'metric':<6} {'rate':>8} {'utts':>6} {'errors':>14}"
    for s in scores:
        yield (
            f"{s.language:<10} {s.metric:<6} {100 * s.rate:>7.2f}% {s.utterances:>6} "
            f"{f'{s.errors}/{s.units}':>14}"
        )


def _entry(line: str, number: int, folder: Path) -> ManifestEntry:
    if len(line) > MAX_LINE_CHARS:
        raise ValueError(f"line is longer than {MAX_LINE_CHARS} characters")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    audio = record.get("audio_filepath")
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError("no audio_filepath string")
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    language = next((record[k] for k in LANGUAGE_KEYS if record.get(k) is not None), None)
    if language is not None and not isinstance(language, str):
        raise ValueError(f"the language must be a string, got {language!r}")
    path = Path(audio).expanduser()
    path = path if path.is_absolute() else folder / path
    return ManifestEntry(number, path, text, language, record)
