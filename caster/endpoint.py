"""Endpointing: where a stream's transcript is cut into final segments.

Like NeMo's `GreedyEndpointing` (architecture.md §6), a segment ends after a run
of blank frames strictly longer than `silence_ms`, and a long segment is cut at
the first word start past `max_segment_ms`. Cutting only groups tokens: the
decoder state runs on across segments, so the tokens are exactly those of an
uncut stream. The blank-run rule looks at the gap between consecutive token
frames and, like GreedyEndpointing, cuts before the first word start at or after
such a gap: punctuation and language tags emitted after the gap stay with the
segment before it, and a word's piece emitted after a long pause (an untrained
model's "strea" ... "m") does not split the word. A stream also ends its open
segment once the blank frames after its last token are long enough
(`trailing_silence_ends`); that rule cannot wait for the next token, so in a
stream stepped in chunks shorter than such a pause a piece after it still
starts a new segment. Both rules use only blank frames and "▁" word starts, so
they work in every locale. Frames are encoder frames of the model's
`encoder_frame_ms` (80 ms, or 40 ms for subsampling x4).

Optionally a voice-activity detector decides silence instead of blank frames:
Silero VAD (`caster.vad`, needs `pip install silero-vad`), whose per-stream
state is saved and restored with the stream. A VAD cut waits until the decoder
has reached the silence, so it falls after every token of the speech before it;
unlike the blank-run rule, where it falls depends on how far the decoder had got.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # caster.vad imports this module for EndpointError
    from caster.vad import VadState


class EndpointError(ValueError):
    """An endpointing setting is invalid, or the voice-activity detector is unavailable."""


@dataclass(frozen=True)
class EndpointConfig:
    """When a stream's open segment becomes final.

    silence_ms: a run of silence strictly longer than this ends the segment
        (blank frames of the decoder, or non-speech of the VAD when `vad`);
        0 ends it on the first blank frame after a token; None never.
    max_segment_ms: cut a segment at the first word that starts this long
        after the segment's first token; None: no limit.
    vad: use Silero VAD (needs the `silero-vad` package) instead of blank frames.
    vad_threshold: speech probability at or above which a VAD window is speech.
    """

    silence_ms: int | None = 800
    max_segment_ms: int | None = 20_000
    vad: bool = False
    vad_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.silence_ms is not None and (
            not isinstance(self.silence_ms, int) or self.silence_ms < 0
        ):
            raise EndpointError(f"silence_ms must be an int >= 0 or None, got {self.silence_ms!r}")
        if self.max_segment_ms is not None and (
            not isinstance(self.max_segment_ms, int) or self.max_segment_ms <= 0
        ):
            raise EndpointError(
                f"max_segment_ms must be an int > 0 or None, got {self.max_segment_ms!r}"
            )
        if not isinstance(self.vad, bool):
            raise EndpointError(f"vad must be True or False, got {self.vad!r}")
        if not isinstance(self.vad_threshold, float | int) or not 0 < self.vad_threshold < 1:
            raise EndpointError(f"vad_threshold must lie in (0, 1), got {self.vad_threshold!r}")

    def silence_frames(self, frame_ms: int) -> int | None:
        """A blank run longer than this many encoder frames of `frame_ms` ends a segment.

        run * frame_ms > silence_ms  <=>  run > silence_ms // frame_ms for whole runs.
        """
        return None if self.silence_ms is None else self.silence_ms // frame_ms

    def max_frames(self, frame_ms: int) -> int | None:
        """Encoder frames of `frame_ms` after which a segment is cut at the next word start."""
        if self.max_segment_ms is None:
            return None
        return math.ceil(self.max_segment_ms / frame_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> EndpointConfig:
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise EndpointError(f"malformed endpointing settings: {d!r}")
        return cls(**d)


def segment_cuts(
    config: EndpointConfig,
    frame_ms: int,
    token_ids: Sequence[int],
    frames: Sequence[int],
    starts_word: Sequence[bool],
    open_start: int,
    first_new: int,
) -> list[int]:
    """Where new segments start among newly emitted tokens.

    A cut falls before a token that starts a word (language tags and punctuation
    do not), when a blank run longer than `silence_ms` lies between the previous
    word start and this token, or when the token comes `max_segment_ms` or more
    after the segment's first token.

    Args:
        config: the stream's endpointing.
        frame_ms: the model's encoder frame length (ms).
        token_ids: (U,) every token of the stream so far.
        frames: (U,) the frame of each.
        starts_word: per token id (vocabulary-sized), whether that piece starts a word.
        open_start: index of the first token of the open segment.
        first_new: index of the first token emitted since the last call.
    Returns:
        ascending token indices i > open_start: a final segment ends before each.
    """
    silence = None if config.vad else config.silence_frames(frame_ms)
    longest = config.max_frames(frame_ms)
    first = max(first_new, open_start + 1)
    # A long blank run among earlier tokens, after the last word start before them,
    # still cuts at the first word start among the new ones.
    last_start = first - 1
    while last_start > open_start and not starts_word[token_ids[last_start]]:
        last_start -= 1
    paused = any(_long_gap(frames, j, silence) for j in range(last_start + 1, first))
    cuts = []
    start = open_start
    for i in range(first, len(frames)):
        paused = paused or _long_gap(frames, i, silence)
        if not starts_word[token_ids[i]]:
            continue
        if paused or (longest is not None and frames[i] - frames[start] >= longest):
            cuts.append(i)
            start = i
        paused = False
    return cuts


def _long_gap(frames: Sequence[int], i: int, silence: int | None) -> bool:
    """Whether more than `silence` blank frames lie between tokens i - 1 and i."""
    return silence is not None and frames[i] - frames[i - 1] - 1 > silence


def trailing_silence_ends(
    config: EndpointConfig,
    frame_ms: int,
    last_frame: int,
    decoded_frames: int,
    vad: VadState | None,
) -> bool:
    """Whether the silence after the open segment's last token ends the segment now.

    Args:
        frame_ms: the model's encoder frame length (ms).
        last_frame: frame of the open segment's last token.
        decoded_frames: encoder frames the decoder has consumed so far.
        vad: the stream's VAD state when `config.vad`.
    """
    if config.silence_ms is None:
        return False
    if not config.vad:
        return decoded_frames - 1 - last_frame > config.silence_frames(frame_ms)
    if vad is None or vad.silence_ms is None:
        return False
    # Cut only once the decoder has reached the silence, so the speech before it
    # has all its tokens in the segment.
    decoded_ms = decoded_frames * frame_ms
    return vad.silence_ms > config.silence_ms and vad.speech_ended_by(decoded_ms)
