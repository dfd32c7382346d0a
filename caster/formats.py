"""Output formats for transcribed files: plain text, JSON, SubRip (SRT) and WebVTT."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from caster.results import Segment
from caster.transcribe import FileResult

FORMATS = ("text", "json", "srt", "vtt")
EXTENSIONS = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
_BLANK = re.compile(r"\s+")


def result_dict(result: FileResult) -> dict[str, Any]:
    """A JSON-ready description of one file's result.

    Keys: file, duration (s), text, language, segments (index, start, end, text,
    language, confidence, words: text, start, end, confidence), and error when
    the file could not be transcribed. Times are seconds, rounded to the ms.
    """
    out: dict[str, Any] = {
        "file": result.source,
        "duration": round(result.duration, 3),
        "text": result.text,
        "language": result.language,
        "segments": [_segment_dict(s) for s in result.segments],
    }
    if result.error is not None:
        out["error"] = result.error
    return out


def to_json(result: FileResult) -> str:
    """`result_dict` as one line of JSON (UTF-8 text, not escaped)."""
    return json.dumps(result_dict(result), ensure_ascii=False)


def to_srt(segments: Sequence[Segment]) -> str:
    """SubRip subtitles: one numbered cue per segment with text."""
    cues = []
    for segment in _cued(segments):
        start, end = _timestamp(segment.start, ","), _timestamp(segment.end, ",")
        cues.append(f"{len(cues) + 1}\n{start} --> {end}\n{_one_line(segment.text)}\n")
    return "\n".join(cues)


def to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT subtitles: a header, then one cue per segment with text."""
    cues = ["WEBVTT\n"]
    for segment in _cued(segments):
        start, end = _timestamp(segment.start, "."), _timestamp(segment.end, ".")
        cues.append(f"{start} --> {end}\n{_vtt_escape(_one_line(segment.text))}\n")
    return "\n".join(cues)


def render(result: FileResult, fmt: str) -> str:
    """One file's result in `fmt` (one of FORMATS), ending with a newline."""
    if fmt == "text":
        return result.text + "\n"
    if fmt == "json":
        return to_json(result) + "\n"
    if fmt == "srt":
        return to_srt(result.segments)
    if fmt == "vtt":
        return to_vtt(result.segments)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _cued(segments: Sequence[Segment]) -> list[Segment]:
    """Segments that make a cue: with text, in time order (as they always are)."""
    return [s for s in segments if s.text.strip()]


def _one_line(text: str) -> str:
    # A blank line ends a cue in both formats: keep every cue on one line.
    return _BLANK.sub(" ", text).strip()


def _vtt_escape(text: str) -> str:
    # Cue text is HTML-like: &, < and > must be escaped (a bare "-->" would end the cue).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _segment_dict(segment: Segment) -> dict[str, Any]:
    return {
        "index": segment.index,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
        "language": segment.language,
        "confidence": round(segment.confidence, 4),
        "words": [
            {
                "text": w.text,
                "start": round(w.start, 3),
                "end": round(w.end, 3),
                "confidence": round(w.confidence, 4),
            }
            for w in segment.words
        ],
    }
