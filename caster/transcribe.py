"""Transcribing many recordings: length-sorted batches, and flat memory for long audio.

`transcribe_many` reads its inputs lazily, a window at a time, and yields one
`FileResult` per input in input order. Inside a window:

- recordings up to `long_audio_seconds` are sorted by length and cut into
  padded batches of at most `batch_seconds` (batch size x longest item); each
  batch is one offline forward (mel, encoder with the chunked-limited mask of
  the chosen latency, language prompt, greedy decoding), exactly what
  `Model.transcribe` computes for one recording;
- longer recordings go through the cache-aware streaming encoder in steps of
  about `step_seconds`, all of the window's long recordings batched together.
  Offline attention costs memory quadratic in the length; a step only attends
  to its own frames and the cached left context, so memory stays flat however
  long the recording. The step is exact for any whole number of chunks, so
  both paths give the same tokens for the same `chunk_ms`.

Word and segment timing reuse the streaming results' machinery
(`caster.results.Lexicon`, `caster.endpoint.segment_cuts`): token frames x the
model's encoder frame length (80 ms; 40 ms for subsampling x4).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from caster.audio import as_audio, load_audio
from caster.config import MelConfig
from caster.decoding import Hypothesis, greedy_decode, initial_decoder_state
from caster.endpoint import EndpointConfig, segment_cuts
from caster.languages import canonical_locale
from caster.mel import MelState, mel_flush, mel_step
from caster.model import AudioInput, Model, Transcript
from caster.results import Lexicon, Segment, Word
from caster.state import select_state
from caster.streaming import step_streams

# Subtitle-sized segments: cut at pauses over 800 ms and before 8 s of speech.
FILE_SEGMENTS = EndpointConfig(silence_ms=800, max_segment_ms=8_000)


@dataclass(frozen=True)
class Request:
    """One input with its own language (else `transcribe_many`'s `language` applies)."""

    audio: AudioInput
    language: str | None


@dataclass(frozen=True)
class FileResult:
    """The result for one input of `transcribe_many`.

    index:      position of the input in the input sequence
    source:     the path as given, or "<array 3>", "<bytes 3>", "<file 3>"
    duration:   seconds of audio (0.0 when it could not be read)
    transcript: the recognition result (None when `error`)
    segments:   final segments with timed words (subtitle-sized, see FILE_SEGMENTS)
    error:      why the input could not be transcribed, else None
    """

    index: int
    source: str
    duration: float
    transcript: Transcript | None
    segments: tuple[Segment, ...]
    error: str | None = None

    @property
    def text(self) -> str:
        return "" if self.transcript is None else self.transcript.text.strip()

    @property
    def language(self) -> str | None:
        return None if self.transcript is None else self.transcript.language

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for s in self.segments for w in s.words)


@dataclass
class _Item:
    index: int
    source: str
    prompt: int | None
    samples: np.ndarray | None = None
    seconds: float = 0.0
    error: ValueError | None = None
    hypothesis: Hypothesis | None = None


def transcribe_many(
    model: Model,
    inputs: Iterable[AudioInput | Request],
    language: str | None = None,
    chunk_ms: int | None = None,
    *,
    batch_seconds: float | None = None,
    long_audio_seconds: float = 120.0,
    step_seconds: float = 30.0,
    window_seconds: float = 3600.0,
    segmenting: EndpointConfig = FILE_SEGMENTS,
    errors: Literal["keep", "raise"] = "keep",
) -> Iterator[FileResult]:
    """Transcribe many recordings, lazily, in input order.

    Args:
        model: the loaded model.
        inputs: paths, file bytes, binary file objects or float32 16 kHz arrays,
            or `Request`s that carry their own language.
        language: the language of inputs that are not `Request`s (as for
            `Model.transcribe`).
        chunk_ms: latency whose attention context to use (None: the model's default).
        batch_seconds: most padded audio in one offline batch (items x longest).
            None: 600 s on a GPU; 30 s on a CPU, where a batch costs each item
            more than running it alone (bench/results/cpu_engine.md), so only
            short recordings of similar length share one.
        long_audio_seconds: recordings longer than this take the streaming path.
        step_seconds: audio per streaming step of the long path.
        window_seconds: audio read ahead and sorted together (at least one input).
        segmenting: where the transcript of a file is cut into segments.
        errors: "keep" reports an unusable input in its `FileResult.error`;
            "raise" raises its AudioError (or the LanguageError of a `Request`).

    Raises:
        ValueError: a bad language, chunk size or setting (at once, before any input is read).
    """
    default_prompt = model.prompt_index(language)
    context = model.config.context_for_chunk_ms(chunk_ms)
    if batch_seconds is None:
        batch_seconds = 600.0 if model.device.type == "cuda" else 30.0
    for name, value in (
        ("batch_seconds", batch_seconds),
        ("long_audio_seconds", long_audio_seconds),
        ("step_seconds", step_seconds),
        ("window_seconds", window_seconds),
    ):
        if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if errors not in ("keep", "raise"):
        raise ValueError(f"errors must be 'keep' or 'raise', got {errors!r}")
    if not isinstance(segmenting, EndpointConfig):
        raise TypeError(f"segmenting must be an EndpointConfig, not {type(segmenting)}")
    runner = _Runner(model, context, batch_seconds, long_audio_seconds, step_seconds, segmenting)
    return runner.run(inputs, default_prompt, window_seconds, errors)


class _Runner:
    def __init__(
        self,
        model: Model,
        context: tuple[int, int],
        batch_seconds: float,
        long_audio_seconds: float,
        step_seconds: float,
        segmenting: EndpointConfig,
    ) -> None:
        self.model = model
        self.context = context
        rate = model.config.mel.sample_rate
        self.batch_samples = int(batch_seconds * rate)
        self.long_samples = int(long_audio_seconds * rate)
        self.step_seconds = step_seconds
        self.segmenting = segmenting
        self.lexicon = Lexicon(model.tokenizer, model.config.encoder_frame_ms)

    def run(
        self,
        inputs: Iterable[AudioInput | Request],
        default_prompt: int | None,
        window_seconds: float,
        errors: str,
    ) -> Iterator[FileResult]:
        window: list[_Item] = []
        seconds = 0.0
        for index, entry in enumerate(inputs):
            item = self._load(index, entry, default_prompt)
            if item.error is not None and errors == "raise":
                raise item.error
            window.append(item)
            seconds += item.seconds
            if seconds >= window_seconds:
                yield from self._window(window)
                window, seconds = [], 0.0
        yield from self._window(window)

    def _load(self, index: int, entry: AudioInput | Request, default_prompt: int | None) -> _Item:
        audio = entry.audio if isinstance(entry, Request) else entry
        source = _source_name(index, audio)
        item = _Item(index, source, default_prompt)
        try:
            if isinstance(entry, Request):
                item.prompt = self.model.prompt_index(entry.language)
            if isinstance(audio, str | os.PathLike | bytes | bytearray) or hasattr(audio, "read"):
                item.samples = load_audio(audio, self.model.config.mel.sample_rate)
            else:
                item.samples = as_audio(audio)
            item.seconds = len(item.samples) / self.model.config.mel.sample_rate
        except ValueError as e:  # AudioError, LanguageError: reported per input
            item.error = e
        return item

    def _window(self, items: list[_Item]) -> Iterator[FileResult]:
        """Compute a window's inputs; yield each result once it and all before it are done."""
        readable = [i for i in items if i.samples is not None]
        hop = self.model.config.mel.hop_length
        for i in readable:
            if len(i.samples) < hop:  # under one mel frame: nothing to encode
                i.hypothesis = Hypothesis([], [], [])
        short = [i for i in readable if hop <= len(i.samples) <= self.long_samples]
        long = [i for i in readable if len(i.samples) > self.long_samples]
        waiting = deque(items)
        short.sort(key=lambda i: len(i.samples), reverse=True)
        batch: list[_Item] = []
        for item in short:
            # Sorted longest first: the batch's padded size is its first item's times its count.
            if batch and len(batch[0].samples) * (len(batch) + 1) > self.batch_samples:
                self._offline(batch)
                yield from self._done(waiting)
                batch = []
            batch.append(item)
        if batch:
            self._offline(batch)
        if long:
            self._streaming(long)
        yield from self._done(waiting)

    def _done(self, waiting: deque[_Item]) -> Iterator[FileResult]:
        while waiting and (waiting[0].error is not None or waiting[0].hypothesis is not None):
            item = waiting.popleft()
            yield self._result(item)
            item.samples = None  # let the audio go as soon as its result is out

    @torch.inference_mode()
    def _offline(self, items: list[_Item]) -> None:
        """One padded batch through the offline path of `Model.transcribe`."""
        net, device = self.model.net, self.model.device
        lengths = torch.tensor([len(i.samples) for i in items], device=device)
        audio = torch.zeros(len(items), int(lengths.max()), device=device)  # (B, N)
        for b, item in enumerate(items):
            audio[b, : len(item.samples)] = torch.from_numpy(item.samples)
        mel, mel_len = net.preprocessor(audio, lengths)  # (B, F, T)
        encoded, encoded_len = net.encoder(mel, mel_len, self.context)  # (B, T', D)
        encoded = net.apply_prompt(encoded, _prompts(items, device))
        hyps, _ = greedy_decode(net, encoded, encoded_len, initial_decoder_state(net, len(items)))
        for item, hyp in zip(items, hyps, strict=True):
            item.hypothesis = hyp

    @torch.inference_mode()
    def _streaming(self, items: list[_Item]) -> None:
        """Long recordings, batched, through the streaming encoder in multi-chunk steps.

        Each step takes `chunks` whole chunks per stream (the first step the
        stream's shorter first chunk plus chunks-1 more), so chunk boundaries
        fall where the offline mask puts them; a stream's last step takes what
        is left, and a stream with nothing left leaves the batch.
        """
        net, device = self.model.net, self.model.device
        encoder, featurizer = net.encoder, net.preprocessor.featurizer
        mel_cfg = self.model.config.mel
        hop = mel_cfg.hop_length
        later = encoder.chunk_frames(self.context, first=False)
        chunks = max(1, round(self.step_seconds * mel_cfg.sample_rate / (later * hop)))
        first_need = encoder.chunk_frames(self.context, first=True) + (chunks - 1) * later
        need = chunks * later
        everyone = streams = [_LongStream(item, mel_cfg, device) for item in items]
        cache = encoder.initial_cache(len(items), self.context, device)
        decoder = initial_decoder_state(net, len(items))
        prompts = _prompts(items, device)
        first = True
        while streams:
            wanted = first_need if first else need
            pieces = [s.take(wanted, featurizer, hop, device) for s in streams]
            if any(p.shape[1] == 0 for p in pieces):  # these streams have ended: they leave
                keep = [b for b, p in enumerate(pieces) if p.shape[1] > 0]
                streams, pieces = [streams[b] for b in keep], [pieces[b] for b in keep]
                cache, decoder = select_state(cache, keep), select_state(decoder, keep)
                prompts = None if prompts is None else prompts[keep]
                if not streams:
                    break
            lengths = torch.tensor([p.shape[1] for p in pieces], device=device)
            batch = pieces[0].new_zeros(len(pieces), pieces[0].shape[0], int(lengths.max()))
            for b, piece in enumerate(pieces):
                batch[b, :, : piece.shape[1]] = piece  # (B, F, T), zero padded
            hyps, cache, decoder = step_streams(
                net, batch, lengths, prompts, cache, decoder, self.context
            )
            for stream, hyp in zip(streams, hyps, strict=True):
                stream.extend(hyp)
            first = False
        for stream in everyone:
            stream.item.hypothesis = stream.hypothesis

    def _result(self, item: _Item) -> FileResult:
        if item.error is not None or item.hypothesis is None:
            error = None if item.error is None else str(item.error)
            return FileResult(item.index, item.source, 0.0, None, (), error)
        hyp = item.hypothesis
        transcript = self.model.make_transcript(hyp.token_ids, hyp.frames, hyp.scores, item.prompt)
        segments = file_segments(
            self.model, self.lexicon, transcript, item.prompt, item.seconds, self.segmenting
        )
        return FileResult(item.index, item.source, item.seconds, transcript, segments)


class _LongStream:
    """A long recording being fed to the streaming encoder: its mel state and pending frames."""

    def __init__(self, item: _Item, mel_cfg: MelConfig, device: torch.device) -> None:
        self.item = item
        self.mel_state = MelState.initial(mel_cfg, device)
        self.position = 0  # samples turned into mel frames so far
        self.pending = torch.zeros(mel_cfg.n_mels, 0, device=device)  # (F, k) not yet encoded
        self.flushed = False
        self.hypothesis = Hypothesis([], [], [])

    def take(
        self, frames: int, featurizer: torch.nn.Module, hop: int, device: torch.device
    ) -> torch.Tensor:
        """The next `frames` mel frames (fewer at the end), computed piece by piece."""
        samples = self.item.samples
        parts, have = [self.pending], self.pending.shape[1]
        while have < frames and not self.flushed:
            end = min(len(samples), self.position + (frames - have) * hop)
            piece = torch.from_numpy(samples[self.position : end]).to(device)
            new, self.mel_state = mel_step(featurizer, piece, self.mel_state)
            self.position = end
            if end == len(samples):
                # mel_step holds back the frames whose window reaches past the audio.
                new = torch.cat([new, mel_flush(featurizer, self.mel_state)], dim=1)
                self.flushed = True
            parts.append(new)
            have += new.shape[1]
        pending = torch.cat(parts, dim=1)
        self.pending = pending[:, frames:]
        return pending[:, :frames]

    def extend(self, hyp: Hypothesis) -> None:
        self.hypothesis.token_ids.extend(hyp.token_ids)
        self.hypothesis.frames.extend(hyp.frames)
        self.hypothesis.scores.extend(hyp.scores)


def file_segments(
    model: Model,
    lexicon: Lexicon,
    transcript: Transcript,
    prompt: int | None,
    duration: float,
    segmenting: EndpointConfig = FILE_SEGMENTS,
) -> tuple[Segment, ...]:
    """Cut a whole recording's transcript into final segments with timed words.

    The same rules as a stream's endpointing (`segment_cuts`), applied once to
    all tokens; in auto mode a segment's language is the last tag the model
    emitted up to it.

    Args:
        transcript: the recording's result; prompt: its prompt index.
        duration: seconds of audio (word and segment times never pass it).
    """
    ids, frames, scores = transcript.token_ids, transcript.token_frames, transcript.token_logprobs
    if not ids:
        return ()
    cuts = segment_cuts(segmenting, lexicon.frame_ms, ids, frames, lexicon.starts_word, 0, 0)
    bounds = [0, *cuts, len(ids)]
    fixed = None if prompt is None else canonical_locale(prompt, model.config.prompt)
    seen = None
    segments = []
    for start, end in itertools.pairwise(bounds):
        language = None
        if prompt is not None:
            seen = lexicon.last_language(ids[start:end]) or seen
            language = fixed or seen
        segment = lexicon.segment(
            len(segments), ids[start:end], frames[start:end], scores[start:end],
            language, True, duration,
        )  # fmt: skip
        if segment.text or segment.words:
            segments.append(segment)
    return tuple(segments)


def _prompts(items: list[_Item], device: torch.device) -> torch.Tensor | None:
    if items[0].prompt is None:
        return None
    return torch.tensor([i.prompt for i in items], device=device)


def _source_name(index: int, audio: object) -> str:
    if isinstance(audio, str | os.PathLike):
        return os.fspath(audio)
    if isinstance(audio, bytes | bytearray):
        return f"<bytes {index}>"
    if hasattr(audio, "read"):
        return str(getattr(audio, "name", f"<file {index}>"))
    return f"<array {index}>"
