"""Many files at once: batches and the long-audio path give exactly `Model.transcribe`'s tokens.

Also the output formats (parsed back with the `srt` and `webvtt-py` packages)
and NeMo manifests with WER/CER.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import srt
import webvtt
from conftest import EN_MODEL, PROMPT_MODEL, nemo_path

import caster
from caster.audio import AudioError
from caster.formats import render, result_dict, to_srt, to_vtt
from caster.manifest import (
    manifest_requests,
    normalize_text,
    prediction_record,
    read_manifest,
    score,
)
from caster.results import Segment, Word
from caster.transcribe import FileResult, Request, transcribe_many


@pytest.fixture(scope="module")
def models():
    return {name: caster.load(nemo_path(name)) for name in (EN_MODEL, PROMPT_MODEL)}


@pytest.fixture(scope="module")
def clips(oracle):
    a, b = oracle["inputs/wave_a"], oracle["inputs/wave_b"]
    return {
        "a": a,
        "b": b,
        "ab": np.concatenate([a, 0.5 * b]),
        "b_cut": b[:5000],
        "a_4000": a[:4000],
        "tiny": a[:100],  # under one 10 ms hop: no mel frame at all
    }


def long_clip(oracle, seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio of `seconds`: the fixture waves in shuffled order with quiet gaps."""
    rng = np.random.default_rng(seed)
    waves = [oracle["inputs/wave_a"], oracle["inputs/wave_b"]]
    parts, n = [], 0
    while n < seconds * 16000:
        wave = waves[rng.integers(2)] * rng.uniform(0.4, 1.0)
        gap = (rng.standard_normal(int(rng.uniform(0.1, 1.5) * 16000)) * 1e-3).astype(np.float32)
        parts += [wave.astype(np.float32), gap]
        n += len(wave) + len(gap)
    return np.concatenate(parts)[: int(seconds * 16000)]


def same_tokens(result: FileResult, single: caster.Transcript) -> None:
    assert result.error is None
    assert result.transcript.token_ids == single.token_ids
    assert result.transcript.token_frames == single.token_frames
    assert result.transcript.text == single.text
    assert result.transcript.language == single.language


@pytest.mark.parametrize("name, chunk_ms", [(EN_MODEL, None), (PROMPT_MODEL, 80)])
def test_batched_equals_each_input_alone(models, clips, name, chunk_ms):
    model = models[name]
    inputs = list(clips.values())
    # 8 s batches: several batches, each padded to its longest item.
    results = list(transcribe_many(model, inputs, chunk_ms=chunk_ms, batch_seconds=8))
    assert [r.index for r in results] == list(range(len(inputs)))
    for result, audio in zip(results, inputs, strict=True):
        same_tokens(result, model.transcribe(audio, chunk_ms=chunk_ms))
        assert result.duration == pytest.approx(len(audio) / 16000)
    assert results[-1].transcript.token_ids == [] and results[-1].segments == ()
    assert any(r.transcript.token_ids for r in results)


def test_requests_carry_their_own_language(models, clips):
    model = models[PROMPT_MODEL]
    languages = ["de-DE", None, "fr-FR", "en-US", "auto"]
    audio = [clips["b"], clips["a"], clips["ab"], clips["b"], clips["a_4000"]]
    requests = [Request(x, lang) for x, lang in zip(audio, languages, strict=True)]
    for result, x, lang in zip(transcribe_many(model, requests), audio, languages, strict=True):
        same_tokens(result, model.transcribe(x, language=lang))
    # A plain input takes the call's language.
    (plain,) = transcribe_many(model, [clips["b"]], language="de-DE")
    assert plain.language == "de-DE"


@pytest.mark.parametrize("name, chunk_ms, seconds", [(PROMPT_MODEL, None, 60), (EN_MODEL, 160, 30)])
def test_long_audio_path_equals_offline(models, oracle, name, chunk_ms, seconds):
    """Two long recordings, streamed together in 7 s steps; one leaves the batch early."""
    model = models[name]
    inputs = [long_clip(oracle, seconds, seed=1), long_clip(oracle, 10.3, seed=2)]
    offline = list(transcribe_many(model, inputs, chunk_ms=chunk_ms))
    streamed = list(
        transcribe_many(model, inputs, chunk_ms=chunk_ms, long_audio_seconds=5, step_seconds=7)
    )
    for a, b in zip(offline, streamed, strict=True):
        assert a.transcript.token_ids and a.transcript.token_ids == b.transcript.token_ids
        assert a.transcript.token_frames == b.transcript.token_frames
        assert [(s.text, s.start, s.end) for s in a.segments] == [
            (s.text, s.start, s.end) for s in b.segments
        ]


def test_word_and_segment_times_are_monotonic_and_inside_the_audio(models, oracle, clips):
    model = models[EN_MODEL]
    inputs = [long_clip(oracle, 30, seed=3), clips["ab"], clips["b"]]
    for result in transcribe_many(model, inputs):
        assert result.segments, result.source
        # Without language tags the segments hold every token, in order.
        tokens = [t for s in result.segments for t in s.token_ids]
        assert tokens == result.transcript.token_ids
        previous_end = 0.0
        for segment in result.segments:
            assert previous_end <= segment.start <= segment.end <= result.duration
            previous_end = segment.end
        words = result.words
        assert words
        starts = [w.start for w in words]
        assert starts == sorted(starts)
        for w, nxt in itertools.pairwise(words):
            assert w.end <= nxt.start
        assert all(0 <= w.start <= w.end <= result.duration for w in words)
    long = next(iter(transcribe_many(model, inputs[:1])))
    # This tiny model says all but the last piece of "stream" in the first second and
    # that piece 1.5 s later. Segments are cut only before a word start, so the pause
    # inside the word (which used to cut "strea" | "m") leaves one segment and whole words.
    assert [s.text for s in long.segments] == [long.text]
    last = long.words[-1]
    assert last.text == "stream" and last.end - last.start > 1.5


def test_inputs_are_read_lazily_and_errors_reported(models, clips):
    model = models[EN_MODEL]
    endless = itertools.cycle([clips["a"], b"not audio at all"])
    first = list(itertools.islice(transcribe_many(model, endless, window_seconds=1), 3))
    assert [r.index for r in first] == [0, 1, 2]
    assert first[1].error and first[1].transcript is None and first[1].source == "<bytes 1>"
    assert first[0].text == first[2].text == model.transcribe(clips["a"]).text
    with pytest.raises(AudioError):
        list(transcribe_many(model, [b"not audio"], errors="raise"))
    # Bad settings fail at the call, before any input is read.
    with pytest.raises(ValueError, match="batch_seconds"):
        transcribe_many(model, endless, batch_seconds=0)
    with pytest.raises(ValueError, match="chunk_ms"):
        transcribe_many(model, endless, chunk_ms=123)
    with pytest.raises(ValueError, match="language"):
        transcribe_many(model, endless, language="de-DE")


def segment(index: int, text: str, start: float, end: float) -> Segment:
    word = Word(text, start, end, 0.9)
    return Segment(index, text, (word,), start, end, None, True, 0.9, (1,))


def vtt_time(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes // 60):02d}:{int(minutes % 60):02d}:{secs:06.3f}"


def test_srt_and_vtt_parse_with_standard_parsers(models, oracle):
    (result,) = transcribe_many(models[EN_MODEL], [long_clip(oracle, 30, seed=3)])
    segments = [
        *result.segments,
        segment(99, "a < b & c --> d", 3661.5, 3662.25),
        segment(100, "two\n\nlines", 3663.0, 3664.0),
        segment(101, "  ", 3665.0, 3666.0),  # no text: no cue
    ]
    cues = [s for s in segments if s.text.strip()]
    subs = list(srt.parse(to_srt(segments)))
    assert [s.index for s in subs] == list(range(1, len(cues) + 1))
    for sub, seg in zip(subs, cues, strict=True):
        assert sub.start.total_seconds() == pytest.approx(seg.start, abs=5e-4)
        assert sub.end.total_seconds() == pytest.approx(seg.end, abs=5e-4)
        assert sub.content == " ".join(seg.text.split())
    captions = list(webvtt.from_string(to_vtt(segments)))
    assert len(captions) == len(cues)
    for caption, seg in zip(captions, cues, strict=True):
        assert caption.start == vtt_time(seg.start) and caption.end == vtt_time(seg.end)
    assert captions[-2].text == "a &lt; b &amp; c --&gt; d"
    assert captions[-2].start == "01:01:01.500"
    assert captions[-1].text == "two lines"


def test_json_and_text_outputs(models, clips):
    (result,) = transcribe_many(models[PROMPT_MODEL], [clips["b"]], language="de-DE")
    data = json.loads(render(result, "json"))
    assert data == result_dict(result)
    assert data["text"] == result.text and data["language"] == "de-DE"
    assert data["segments"][0]["words"][0].keys() == {"text", "start", "end", "confidence"}
    assert render(result, "text") == result.text + "\n"
    with pytest.raises(ValueError, match="format"):
        render(result, "docx")


def test_manifest_reading_prediction_and_scores(models, clips, tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", clips["a"], 16000)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "b.wav", clips["b"], 16000)
    lines = [
        {"audio_filepath": "a.wav", "text": "the speech model", "duration": 4.0, "lang": "en-US"},
        {"audio_filepath": str(tmp_path / "sub" / "b.wav"), "text": "wir sind", "lang": "de-DE"},
        "{broken",
        {"text": "no audio"},
        {"audio_filepath": "a.wav", "text": 5},
        [1, 2],
        {"audio_filepath": "a.wav", "language": "xx-YY"},
        "[" * 100_000,  # too deep for the JSON parser: a skipped line, not a crash
    ]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n"
    )
    manifest = read_manifest(manifest_path)
    assert [e.line for e in manifest.entries] == [1, 2, 7]
    assert manifest.entries[0].audio == tmp_path / "a.wav"
    assert len(manifest.problems) == 5 and "m.jsonl:3: invalid JSON" in manifest.problems[0]
    assert manifest.problems[-1] == f"{manifest_path}:8: invalid JSON"
    model = models[PROMPT_MODEL]
    requests, notes = manifest_requests(model, manifest, None)
    assert [r.language for r in requests] == ["en-US", "de-DE", None]
    assert len(notes) == 1 and "xx-YY" in notes[0]
    assert [r.language for r in manifest_requests(model, manifest, "fr-FR")[0]] == ["fr-FR"] * 3
    results = list(transcribe_many(model, requests))
    record = prediction_record(manifest.entries[1], results[1])
    assert record["pred_text"] == model.transcribe(clips["b"], language="de-DE").text.strip()
    assert record["pred_lang"] == "de-DE" and record["text"] == "wir sind"
    with pytest.raises(ValueError, match="cannot read manifest"):
        read_manifest(tmp_path / "missing.jsonl")


def test_error_rates_per_language():
    rows = [
        ("the cat sat", "the cat", "en-US"),  # 1 deletion / 3 words
        ("a b", "a c", "en-US"),  # 1 substitution / 2 words
        ("你好 世界", "你好世", "zh-CN"),  # 1 deletion / 4 characters
        ("", "ignored", "en-US"),
        ("Hello, World!", "hello world", None),
    ]
    scores = {(s.language, s.metric): s for s in score(rows)}
    assert (scores["en-US", "wer"].errors, scores["en-US", "wer"].units) == (2, 5)
    assert scores["zh-CN", "cer"].rate == 0.25
    assert scores["none", "wer"].rate == 1.0  # case and punctuation count ...
    assert score(rows, normalize=True)[1].rate == 0.0  # ... unless normalised
    assert (scores["all", "wer"].errors, scores["all", "wer"].units) == (4, 7)
    assert scores["all", "cer"].utterances == 1
    assert score([("", "x", None)]) == []
    assert normalize_text("  Ça, va?  BIEN!") == "ça va bien"
