"""Word and character error counts: which metric a language gets, per utterance and pooled.

zh, ja, ko and th are written without spaces between words, so they are scored by
characters without whitespace (CER); every other language by words (WER). Rates are
corpus-level: all edits over all reference units, so counts are added (per language,
then over languages of one metric) before dividing. `caster transcribe --manifest`
(`caster.manifest`) and `caster eval` / training validation (`caster.train.evaluate`)
both count with this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import jiwer

# Languages scored by character error rate: their text has no spaces between words.
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th"})

_Key = TypeVar("_Key", bound=tuple)


def uses_cer(language: str | None) -> bool:
    """Whether a language is scored by characters: zh, ja, ko, th in any locale spelling.

    "zh", "zh-CN", "zh_CN" and "ZH-cn" all count as zh.
    """
    if language is None:
        return False
    return language.strip().replace("_", "-").split("-")[0].lower() in CER_LANGUAGES


def metric_of(language: str | None) -> str:
    """The metric of a language: "cer" (zh, ja, ko, th), else "wer"."""
    return "cer" if uses_cer(language) else "wer"


@dataclass(frozen=True)
class ErrorCount:
    """Edits against a reference: `errors` over `units` reference words or characters."""

    errors: int = 0
    units: int = 0
    utterances: int = 0

    def __add__(self, other: ErrorCount) -> ErrorCount:
        return ErrorCount(
            self.errors + other.errors,
            self.units + other.units,
            self.utterances + other.utterances,
        )

    @property
    def rate(self) -> float:
        """errors / units; NaN when there are no reference units."""
        return self.errors / self.units if self.units else math.nan


def count_errors(reference: str, hypothesis: str, by_character: bool) -> ErrorCount:
    """One utterance's edits (substitutions + deletions + insertions) and reference units.

    Args:
        reference: the reference text.
        hypothesis: the recognised text.
        by_character: count characters without whitespace (CER) instead of words (WER).
    """
    if by_character:
        ref, hyp = "".join(reference.split()), "".join(hypothesis.split())
        units, hyp_units = len(ref), len(hyp)
    else:
        ref, hyp = " ".join(reference.split()), " ".join(hypothesis.split())
        units, hyp_units = len(ref.split()), len(hyp.split())
    if units == 0 or hyp_units == 0:
        # Every unit is an insertion or a deletion (jiwer < 4 rejects an empty reference).
        return ErrorCount(max(units, hyp_units), units, 1)
    out = jiwer.process_characters(ref, hyp) if by_character else jiwer.process_words(ref, hyp)
    return ErrorCount(out.substitutions + out.deletions + out.insertions, units, 1)


def add_count(counts: dict[_Key, ErrorCount], key: _Key, count: ErrorCount) -> None:
    """Add `count` to `counts[key]` (starting from zero)."""
    counts[key] = counts.get(key, ErrorCount()) + count


def merge_counts(parts: Iterable[Mapping[_Key, ErrorCount]]) -> dict[_Key, ErrorCount]:
    """The counts of several processes (or data shards) added key by key."""
    merged: dict[_Key, ErrorCount] = {}
    for part in parts:
        for key, count in part.items():
            add_count(merged, key, count)
    return merged


def pooled_counts(counts: Mapping[_Key, ErrorCount]) -> dict[tuple[Any, ...], ErrorCount]:
    """Counts added over languages of one metric.

    Args:
        counts: keys whose last item is a language (anything else is kept).
    Returns:
        the same keys with the language replaced by its metric ("wer" or "cer"), in the
        order of the sorted input keys.
    """
    pooled: dict[tuple[Any, ...], ErrorCount] = {}
    for key in sorted(counts):
        add_count(pooled, (*key[:-1], metric_of(key[-1])), counts[key])
    return pooled
