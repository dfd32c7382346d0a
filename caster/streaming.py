"""Streaming recognition: one stream's audio in, events and a transcript out.

`step_streams` is the one batched streaming computation (encoder step, language
prompt, greedy decoding) for any number of streams; `Stream` wraps it for a
single caller feeding audio in pieces of any size. All state is explicit and
belongs to the stream; the model is shared and never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from caster.audio import as_audio
from caster.decoding import DecoderState, Hypothesis, greedy_decode, initial_decoder_state
from caster.encoder import EncoderCache
from caster.mel import MelState, mel_flush, mel_step
from caster.tokenizer import Tokenizer
from caster.transducer import Transducer

if TYPE_CHECKING:
    from caster.model import Model, Transcript


# An encoder step: (chunk, lengths, cache, context) -> (frames, lengths, new cache).
EncoderStep = Callable[
    [Tensor, Tensor, EncoderCache, tuple[int, int]], tuple[Tensor, Tensor, EncoderCache]
]


@dataclass(frozen=True)
class StreamEvent:
    """The current hypothesis of a stream after new tokens arrived (not final)."""

    text: str
    token_ids: list[int]
    language: str | None
    is_final: bool = False


@torch.inference_mode()
def step_streams(
    net: Transducer,
    chunk: Tensor,
    lengths: Tensor,
    prompts: Tensor | None,
    encoder_cache: EncoderCache,
    decoder_state: DecoderState,
    context: tuple[int, int],
    encode: EncoderStep | None = None,
) -> tuple[list[Hypothesis], EncoderCache, DecoderState]:
    """Encode and decode the next chunk of a batch of streams.

    Args:
        chunk: (B, F, T) new mel frames; lengths: (B,) real frames per stream.
        prompts: (B,) language prompt indices, or None for a model without a prompt.
        encoder_cache, decoder_state: the streams' states (batch first).
        context: (left, right) attention context shared by the batch.
        encode: the encoder step to run, `net.encoder.step` by default (the engine
            passes `EncoderGraphs.step` for fixed-shape steps).
    Returns:
        each stream's new labels, and the new states.
    """
    encode = net.encoder.step if encode is None else encode
    encoded, encoded_len, encoder_cache = encode(chunk, lengths, encoder_cache, context)
    encoded = net.apply_prompt(encoded, prompts)
    hyps, decoder_state = greedy_decode(net, encoded, encoded_len, decoder_state)
    return hyps, encoder_cache, decoder_state


@dataclass
class _Progress:
    token_ids: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def extend(self, hyp: Hypothesis) -> None:
        self.token_ids += hyp.token_ids
        self.frames += hyp.frames
        self.scores += hyp.scores


class _IncrementalText:
    """A growing hypothesis's text without re-decoding all of it for every event.

    Tokens before a committed word boundary are decoded once. A boundary is
    committed only where decoding the two sides apart and joining them with
    one space gives exactly the whole decode (checked when committing), so
    interim texts equal `Tokenizer.decode`; the final transcript is decoded
    whole in any case.
    """

    COMMIT_EVERY = 256  # tokens

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._done = 0  # tokens decoded into `_prefix`
        self._prefix = ""
        self._tags: list[str] = []

    def _decode(self, ids: list[int]) -> tuple[str, list[str]]:
        return self._tokenizer.split_language_tags(self._tokenizer.decode(ids))

    def _join(self, tail: str) -> str:
        return f"{self._prefix} {tail}" if self._prefix and tail else self._prefix or tail

    def update(self, ids: list[int]) -> tuple[str, list[str]]:
        """The text of `ids` (which extend the previous call's) and its language tags."""
        tail, tail_tags = self._decode(ids[self._done :])
        if len(ids) - self._done >= 2 * self.COMMIT_EVERY:
            self._commit(ids, len(ids) - self.COMMIT_EVERY)
            tail, tail_tags = self._decode(ids[self._done :])
        return self._join(tail), self._tags + tail_tags

    def _commit(self, ids: list[int], before: int) -> None:
        pieces = self._tokenizer.pieces
        for k in range(before, self._done, -1):
            if not pieces[ids[k]].startswith("▁") or not pieces[ids[k]].strip("▁").isalnum():
                continue
            head, head_tags = self._decode(ids[self._done : k])
            tail, _ = self._decode(ids[k:])
            prefix = f"{self._prefix} {head}" if self._prefix and head else self._prefix or head
            whole, _ = self._decode(ids)
            joined = f"{prefix} {tail}" if prefix and tail else prefix or tail
            if joined == whole:
                self._done, self._prefix = k, prefix
                self._tags += head_tags
            return  # one attempt per call keeps the cost bounded


class Stream:
    """One live audio stream at a fixed latency (chunk size) and language.

    Feed 16 kHz mono samples in pieces of any size with `feed`; `finish` flushes
    the last partial chunk and returns the transcript, which is identical to
    `model.transcribe(all_audio, language, chunk_ms)`.
    """

    def __init__(self, model: Model, prompt: int | None, context: tuple[int, int]) -> None:
        self._model = model
        net = model.net
        self._context = context
        self._prompt = None if prompt is None else torch.tensor([prompt], device=model.device)
        self._mel_state = MelState.initial(model.config.mel, model.device)
        self._pending = torch.zeros(model.config.mel.n_mels, 0, device=model.device)
        self._encoder_cache = net.encoder.initial_cache(1, context, model.device)
        self._decoder_state = initial_decoder_state(net, 1)
        self._first_chunk = True
        self._progress = _Progress()
        self._text = _IncrementalText(model.tokenizer)
        self._finished = False

    @property
    def context(self) -> tuple[int, int]:
        return self._context

    def feed(self, samples: np.ndarray | Sequence[float] | Tensor) -> list[StreamEvent]:
        """Add audio; encode every chunk that is complete. Returns the new events."""
        if self._finished:
            raise RuntimeError("this stream is finished")
        if len(samples) == 0:
            return []
        audio = torch.from_numpy(as_audio(samples)).to(self._model.device)
        frames, self._mel_state = mel_step(
            self._model.net.preprocessor.featurizer, audio, self._mel_state
        )
        self._pending = torch.cat([self._pending, frames], dim=1)
        before = len(self._progress.token_ids)
        encoder = self._model.net.encoder
        while self._pending.shape[1] >= (
            need := encoder.chunk_frames(self._context, self._first_chunk)
        ):
            self._encode(self._pending[:, :need])
            self._pending = self._pending[:, need:]
        if len(self._progress.token_ids) == before:
            return []
        return [self._event(is_final=False)]

    def finish(self) -> Transcript:
        """Flush the remaining audio (the final partial chunk included) and end the stream."""
        if not self._finished:
            self._finished = True
            last = mel_flush(self._model.net.preprocessor.featurizer, self._mel_state)
            rest = torch.cat([self._pending, last], dim=1)
            encoder = self._model.net.encoder
            while rest.shape[1] > 0:
                need = encoder.chunk_frames(self._context, self._first_chunk)
                self._encode(rest[:, :need])
                rest = rest[:, need:]
            self._pending = rest
        p = self._progress
        return self._model.make_transcript(p.token_ids, p.frames, p.scores, self._prompt_index)

    @property
    def _prompt_index(self) -> int | None:
        return None if self._prompt is None else int(self._prompt[0])

    def _encode(self, frames: Tensor) -> None:
        hyps, self._encoder_cache, self._decoder_state = step_streams(
            self._model.net,
            frames[None],
            torch.tensor([frames.shape[1]], device=frames.device),
            self._prompt,
            self._encoder_cache,
            self._decoder_state,
            self._context,
        )
        self._first_chunk = False
        self._progress.extend(hyps[0])

    def _event(self, is_final: bool) -> StreamEvent:
        ids = self._progress.token_ids
        text, tags = self._text.update(ids)
        language = self._model.language_of(self._prompt_index, tags)
        return StreamEvent(text, list(ids), language, is_final)
