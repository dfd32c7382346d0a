"""Timed results of a stream: words and segments built from emitted tokens.

Token times come from the encoder frame on which the greedy decoder emitted
each token (the model's `encoder_frame_ms` per frame: 80 ms, 40 ms for
subsampling x4). A word is a run of SentencePiece pieces that
starts with a "▁" piece; language-tag pieces ("<de-DE>") are no words, and in
`auto` mode they name the segment's language. Confidences are exp(mean
log-probability) of the tokens involved, i.e. the geometric mean of their
probabilities under the joint, in (0, 1].
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caster.tokenizer import Tokenizer

if TYPE_CHECKING:
    from caster.model import Transcript

WORD_START = "▁"
# Scripts written without spaces between words: each piece is its own word, so
# that word times and segment cuts stay fine-grained in zh-CN, ja-JP and th-TH.
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "IDEOGRAPHIC")


@dataclass(frozen=True)
class Word:
    """One word; times in seconds from the stream start."""

    text: str
    start: float
    end: float
    confidence: float


@dataclass(frozen=True)
class Segment:
    """A stretch of a stream's transcript, delivered as an event.

    An interim segment (is_final False) is the current hypothesis of the open
    segment and is replaced by later events of the same `index`; a final one
    never changes. Concatenating the token_ids of a stream's final segments
    gives exactly the stream's tokens.
    """

    index: int  # segment number within the stream, from 0
    text: str  # language tags removed
    words: tuple[Word, ...]
    start: float  # seconds: the first token's frame
    end: float  # seconds: the end of the last token's frame, clipped to the audio
    language: str | None
    is_final: bool
    confidence: float
    token_ids: tuple[int, ...]  # raw ids, language tags included


@dataclass(frozen=True)
class StreamResult:
    """What `Engine.finish` returns: the whole transcript and every final segment."""

    transcript: Transcript
    segments: tuple[Segment, ...]


class Lexicon:
    """Per-token facts that words and endpointing need, computed once per model.

    Args:
        tokenizer: the model's tokenizer.
        frame_ms: the model's encoder frame length (`ModelConfig.encoder_frame_ms`).
    """

    def __init__(self, tokenizer: Tokenizer, frame_ms: int) -> None:
        self.tokenizer = tokenizer
        self.frame_ms = frame_ms
        pieces = tokenizer.pieces
        tags = tokenizer.language_tag_ids
        self.language_of: dict[int, str] = tags
        self.punctuation_only = [
            bool(p.lstrip(WORD_START))
            and all(c in tokenizer.punctuation for c in p.lstrip(WORD_START))
            for p in pieces
        ]
        self.starts_word = [
            i not in tags and not self.punctuation_only[i] and _starts_word(p)
            for i, p in enumerate(pieces)
        ]

    def words(
        self,
        token_ids: Sequence[int],
        frames: Sequence[int],
        scores: Sequence[float],
        duration: float,
    ) -> list[Word]:
        """Group a segment's tokens into timed words.

        A punctuation-only piece ("," or "▁,") joins the word before it; a piece
        of an unspaced script is a word of its own. A word ends with its last
        token's frame (+ one frame), but never after the next word starts nor after
        `duration` seconds, so start and end times never decrease.
        """
        groups: list[list[int]] = []
        for i, token in enumerate(token_ids):
            if token in self.language_of:
                continue
            if not groups or self.starts_word[token]:
                groups.append([i])
            else:
                groups[-1].append(i)
        words = []
        for n, group in enumerate(groups):
            text = self.tokenizer.decode([token_ids[i] for i in group]).strip()
            if not text:  # a bare "▁" piece right before another word start
                continue
            start = min(self.frame_seconds(frames[group[0]]), duration)
            end = self.frame_seconds(frames[group[-1]] + 1)
            if n + 1 < len(groups):
                end = min(end, self.frame_seconds(frames[groups[n + 1][0]]))
            end = max(start, min(end, duration))
            words.append(Word(text, start, end, _confidence([scores[i] for i in group])))
        return words

    def segment(
        self,
        index: int,
        token_ids: Sequence[int],
        frames: Sequence[int],
        scores: Sequence[float],
        language: str | None,
        is_final: bool,
        duration: float,
    ) -> Segment:
        """A segment from its tokens (at least one), their frames and log-probabilities."""
        text, _ = self.tokenizer.split_language_tags(self.tokenizer.decode(token_ids))
        words = self.words(token_ids, frames, scores, duration)
        start = min(self.frame_seconds(frames[0]), duration)
        end = max(start, min(self.frame_seconds(frames[-1] + 1), duration))
        return Segment(
            index=index,
            text=text.strip(),
            words=tuple(words),
            start=start,
            end=end,
            language=language,
            is_final=is_final,
            confidence=_confidence(scores),
            token_ids=tuple(token_ids),
        )

    def frame_seconds(self, frame: int) -> float:
        """Start time of an encoder frame in seconds (exact to the millisecond)."""
        return frame * self.frame_ms / 1000

    def last_language(self, token_ids: Sequence[int]) -> str | None:
        """The locale of the last language tag among the tokens, if any."""
        for token in reversed(token_ids):
            if token in self.language_of:
                return self.language_of[token]
        return None


def _starts_word(piece: str) -> bool:
    if piece.startswith(WORD_START):
        return True
    first = piece[:1]
    return bool(first) and unicodedata.name(first, "").startswith(_UNSPACED_SCRIPTS)


def _confidence(logprobs: Sequence[float]) -> float:
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 1.0
