"""A stream's state, and its bytes: what `Engine.save` writes and `Engine.restore` reads.

`StreamState` is everything a stream carries from one chunk to the next. As
bytes it is a safetensors file: the tensors (mel, encoder and decoder states,
tokens, VAD state) under fixed names, and a JSON header with the format tag,
version, a fingerprint of the model's architecture and vocabulary, and the
stream's settings and counters, in the safetensors metadata under "caster".

The bytes come from outside and are untrusted: the header is read from the
safetensors preamble before any tensor is parsed, and every field and tensor
(names, dtypes, shapes, finiteness, ranges, and consistency with each other and
with the model) is checked, so a bad state raises `StreamStateError`, never an
obscure failure in a later step.

Float states are saved in the dtype the model ran in (bf16 for a bf16 model) and
converted to the restoring model's dtype, so a stream can move between a GPU
running bf16 and a CPU running float32.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from caster.decoding import DecoderState, initial_decoder_state
from caster.encoder import EncoderCache
from caster.endpoint import EndpointConfig, EndpointError
from caster.languages import LanguageError
from caster.mel import MelState
from caster.model import Model
from caster.transducer import PredictorState
from caster.vad import VAD_CONTEXT, VAD_WINDOW, SileroVad, VadState

STATE_FORMAT = "caster-stream"
STATE_VERSION = 1
CACHE_FIELDS = fields(EncoderCache)
_VAD_TENSORS = ("context", "leftover", "h", "c")  # VadState fields saved as "vad.<name>"
# Saved tensors whose length varies with the stream (the others have the model's shapes).
_VARIABLE_TENSORS = ("mel.pending", "mel.last_sample", "pending")
_TOKEN_TENSORS = ("tokens.ids", "tokens.frames", "tokens.scores")
# Dtypes a saved encoder or decoder float state may have (the model's dtypes).
_STATE_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StreamStateError(ValueError):
    """Bytes given to `Engine.restore` are not a valid stream state for this model."""


@dataclass(eq=False)
class StreamState:
    """Everything one stream carries from chunk to chunk: what `serialize_stream` saves."""

    language: str | None  # as the caller named it
    prompt: int | None
    context: tuple[int, int]
    endpointing: EndpointConfig
    mel_state: MelState
    pending: Tensor  # (F, k) mel frames not yet encoded
    encoder_cache: EncoderCache  # batch of 1
    decoder_state: DecoderState  # batch of 1
    vad_state: VadState | None = None
    first_chunk: bool = True
    decoded_frames: int = 0
    token_ids: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    open_start: int = 0  # index of the open segment's first token
    final_spans: list[tuple[int, int]] = field(default_factory=list)  # token spans of finals
    final_languages: list[str | None] = field(default_factory=list)
    language_seen: str | None = None  # last tag of the final segments (auto mode)


def model_fingerprint(model: Model) -> str:
    """Identifies the architecture and vocabulary a saved state belongs to."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update("\n".join(model.tokenizer.pieces).encode())
    return digest.hexdigest()[:32]


def serialize_stream(state: StreamState, fingerprint: str) -> bytes:
    """A stream's state as bytes (safetensors with a JSON header); `state` is not changed.

    Args:
        state: the stream's state.
        fingerprint: `model_fingerprint` of the stream's model.
    """
    mel = state.mel_state
    tensors = {
        "mel.pending": mel.pending,
        "mel.last_sample": mel.last_sample,
        "pending": state.pending,
        **_cache_tensors(state.encoder_cache, state.decoder_state),
        "tokens.ids": torch.tensor(state.token_ids, dtype=torch.long),
        "tokens.frames": torch.tensor(state.frames, dtype=torch.long),
        "tokens.scores": torch.tensor(state.scores, dtype=torch.float64),
    }
    vad = state.vad_state
    if vad is not None:
        tensors |= {f"vad.{name}": getattr(vad, name) for name in _VAD_TENSORS}
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model": fingerprint,
        "language": state.language,
        "prompt": state.prompt,
        "context": list(state.context),
        "endpointing": state.endpointing.to_dict(),
        "first_chunk": state.first_chunk,
        "decoded_frames": state.decoded_frames,
        "mel_frames_emitted": mel.frames_emitted,
        "mel_samples_seen": mel.samples_seen,
        "open_start": state.open_start,
        "final_spans": [list(span) for span in state.final_spans],
        "final_languages": state.final_languages,
        "language_seen": state.language_seen,
        "vad": None if vad is None else {"samples": vad.samples, "speech_end": vad.speech_end},
    }
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(cpu, metadata={"caster": json.dumps(header)})


def deserialize_stream(data: bytes, model: Model, fingerprint: str) -> StreamState:
    """Parse saved bytes and check them against `model`.

    The encoder and decoder states come back on the model's device, in its
    dtype; the mel state and pending frames on the host, where the engine
    computes mel frames.

    Args:
        data: bytes from `serialize_stream` (untrusted).
        model: the model to continue the stream with.
        fingerprint: `model_fingerprint(model)`.
    Raises:
        StreamStateError: the bytes are not a stream state, or one for another model.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StreamStateError(f"a stream state is bytes, not {type(data).__name__}")
    data = bytes(data)
    header = _read_header(data)
    if header.get("model") != fingerprint:
        raise StreamStateError("this stream state was saved with a different model")
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise StreamStateError(f"stream state tensors are unreadable: {e}") from e

    language = header.get("language")
    if language is not None and not isinstance(language, str):
        raise StreamStateError(f"stream state language is malformed: {language!r}")
    try:
        prompt = model.prompt_index(language)
        endpointing = EndpointConfig.from_dict(header.get("endpointing"))
    except (LanguageError, EndpointError, TypeError) as e:
        raise StreamStateError(f"stream state settings are invalid: {e}") from e
    if header.get("prompt") != prompt:
        raise StreamStateError("stream state prompt does not match its language")
    context = _decode_context(header, model)

    # The fixed-shape tensors must look like a new stream's (float ones in any model dtype).
    initial = model.net.encoder.initial_cache(1, context, "cpu")
    with torch.inference_mode():
        expected = _cache_tensors(initial, initial_decoder_state(model.net, 1))
    names = set(expected) | set(_VARIABLE_TENSORS) | set(_TOKEN_TENSORS)
    if endpointing.vad:
        names |= {f"vad.{name}" for name in _VAD_TENSORS}
    if set(tensors) != names:
        raise StreamStateError(
            f"stream state tensors {sorted(tensors)} are not the expected {sorted(names)}"
        )
    for name, like in expected.items():
        saved = tensors[name].dtype
        floats = like.is_floating_point() and saved in _STATE_FLOAT_DTYPES
        _check_tensor(tensors, name, tuple(like.shape), saved if floats else like.dtype)
    mel_cfg = model.config.mel
    _check_tensor(
        tensors, "mel.pending", None, torch.float32, max_len=mel_cfg.n_fft + mel_cfg.hop_length
    )
    _check_tensor(tensors, "mel.last_sample", None, torch.float32, max_len=1)
    pending = tensors["pending"]
    if pending.dim() != 2 or pending.shape[0] != mel_cfg.n_mels or pending.dtype != torch.float32:
        raise StreamStateError(f"stream state pending frames have shape {tuple(pending.shape)}")
    _check_finite(tensors, "pending")

    decoded = _count(header, "decoded_frames")
    token_ids, frames, scores = _decode_tokens(tensors, decoded, model.config.decoder.vocab_size)
    if int(tensors["decoder.frames"][0]) != decoded:
        raise StreamStateError("stream state decoder frame count is inconsistent")
    cache_lens = (int(tensors["encoder.mel_len"][0]), int(tensors["encoder.attention_len"][0]))
    if not (0 <= cache_lens[0] <= initial.mel.shape[2] and 0 <= cache_lens[1] <= context[0]):
        raise StreamStateError(f"stream state cache lengths {cache_lens} are out of range")

    open_start, spans, languages = _decode_segments(header, len(token_ids))
    language_seen = header.get("language_seen")
    if language_seen is not None and not isinstance(language_seen, str):
        raise StreamStateError(f"stream state language is malformed: {language_seen!r}")

    samples_seen = _count(header, "mel_samples_seen")
    frames_emitted = _count(header, "mel_frames_emitted")
    if frames_emitted > samples_seen // mel_cfg.hop_length:
        raise StreamStateError("stream state mel counters are inconsistent")
    first_chunk = _get(header, "first_chunk", bool)
    if first_chunk and (decoded or token_ids):
        raise StreamStateError("stream state says no chunk was encoded, yet holds results")

    vad_state = None
    if endpointing.vad:
        vad_state = _decode_vad(tensors, header.get("vad"))

    def to_device(name: str) -> Tensor:
        return tensors[name].to(model.device, expected[name].dtype)

    encoder_cache = EncoderCache(**{f.name: to_device(f"encoder.{f.name}") for f in CACHE_FIELDS})
    decoder_state = DecoderState(
        PredictorState(to_device("decoder.h"), to_device("decoder.c"), to_device("decoder.output")),
        to_device("decoder.frames"),
    )
    return StreamState(
        language=language,
        prompt=prompt,
        context=context,
        endpointing=endpointing,
        mel_state=MelState(
            tensors["mel.pending"], tensors["mel.last_sample"], frames_emitted, samples_seen
        ),
        pending=tensors["pending"],
        encoder_cache=encoder_cache,
        decoder_state=decoder_state,
        vad_state=vad_state,
        first_chunk=first_chunk,
        decoded_frames=decoded,
        token_ids=token_ids,
        frames=frames,
        scores=scores,
        open_start=open_start,
        final_spans=spans,
        final_languages=languages,
        language_seen=language_seen,
    )


def _cache_tensors(encoder_cache: EncoderCache, decoder_state: DecoderState) -> dict[str, Tensor]:
    """The encoder and decoder state tensors (model-fixed shapes) by their saved names."""
    predictor = decoder_state.predictor
    return {
        **{f"encoder.{f.name}": getattr(encoder_cache, f.name) for f in CACHE_FIELDS},
        "decoder.h": predictor.h,
        "decoder.c": predictor.c,
        "decoder.output": predictor.output,
        "decoder.frames": decoder_state.frames,
    }


def _read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a state, from the safetensors preamble, before any tensor is read."""
    if len(data) < 8:
        raise StreamStateError(f"stream state too short ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise StreamStateError("not a stream state: the header length exceeds the data")
    try:
        outer = json.loads(data[8 : 8 + size])
        header = json.loads(outer["__metadata__"]["caster"])
    except (ValueError, KeyError, TypeError) as e:
        raise StreamStateError("not a caster stream state (no caster header)") from e
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise StreamStateError("not a caster stream state (wrong format tag)")
    if header.get("version") != STATE_VERSION:
        raise StreamStateError(
            f"stream state version {header.get('version')!r} is not supported "
            f"(this caster reads version {STATE_VERSION})"
        )
    return header


def _get(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise StreamStateError(f"stream state field {key!r} is malformed: {value!r}")
    return value


def _count(header: dict[str, Any], key: str) -> int:
    value = _get(header, key, int)
    if value < 0:
        raise StreamStateError(f"stream state field {key!r} is negative: {value}")
    return value


def _decode_context(header: dict[str, Any], model: Model) -> tuple[int, int]:
    raw = _get(header, "context", list)
    contexts = {model.config.context_for_chunk_ms(ms) for ms in model.config.supported_chunk_ms()}
    contexts.add(model.config.default_context)
    context = tuple(raw)
    if not all(isinstance(x, int) for x in context) or context not in contexts:
        raise StreamStateError(f"stream state context {raw!r} is not one of this model's")
    return context


def _decode_tokens(
    tensors: dict[str, Tensor], decoded: int, vocab_size: int
) -> tuple[list[int], list[int], list[float]]:
    token_ids = _check_tensor(tensors, "tokens.ids", None, torch.long).tolist()
    frames = _check_tensor(tensors, "tokens.frames", None, torch.long).tolist()
    scores = _check_tensor(tensors, "tokens.scores", None, torch.float64).tolist()
    if not len(token_ids) == len(frames) == len(scores):
        raise StreamStateError("stream state token lists differ in length")
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise StreamStateError("stream state holds token ids outside the vocabulary")
    ordered = all(a <= b for a, b in itertools.pairwise(frames))
    if not ordered or any(not 0 <= f < decoded for f in frames):
        raise StreamStateError("stream state token frames are unordered or past the decoded ones")
    return token_ids, frames, scores


def _decode_segments(
    header: dict[str, Any], n_tokens: int
) -> tuple[int, list[tuple[int, int]], list[str | None]]:
    """The open segment's start, and the token spans and languages of the final ones."""
    open_start = _count(header, "open_start")
    spans = _get(header, "final_spans", list)
    languages = _get(header, "final_languages", list)
    bounds = [0]
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and span[0] == bounds[-1]):
            raise StreamStateError(f"stream state segment {span!r} is malformed")
        if not (isinstance(span[1], int) and span[0] < span[1]):
            raise StreamStateError(f"stream state segment {span!r} is malformed")
        bounds.append(span[1])
    if bounds[-1] != open_start or open_start > n_tokens or len(languages) != len(spans):
        raise StreamStateError("stream state segments do not match its tokens")
    if any(lang is not None and not isinstance(lang, str) for lang in languages):
        raise StreamStateError("stream state segment languages are malformed")
    return open_start, [(a, b) for a, b in spans], languages


def _check_tensor(
    tensors: dict[str, Tensor],
    name: str,
    shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    max_len: int | None = None,
) -> Tensor:
    """The tensor `name`, checked: its dtype, its shape (or 1-D of at most `max_len`), finite."""
    t = tensors[name]
    if t.dtype != dtype:
        raise StreamStateError(f"stream state tensor {name} is {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise StreamStateError(
            f"stream state tensor {name} has shape {tuple(t.shape)}, expected {shape}"
        )
    if shape is None and (t.dim() != 1 or (max_len is not None and t.shape[0] > max_len)):
        raise StreamStateError(f"stream state tensor {name} has shape {tuple(t.shape)}")
    _check_finite(tensors, name)
    return t


def _check_finite(tensors: dict[str, Tensor], name: str) -> None:
    t = tensors[name]
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise StreamStateError(f"stream state tensor {name} holds NaN or infinity")


def _decode_vad(tensors: dict[str, Tensor], header: Any) -> VadState:
    if not isinstance(header, dict):
        raise StreamStateError(f"stream state VAD settings are malformed: {header!r}")
    samples, speech_end = _count(header, "samples"), header.get("speech_end")
    if speech_end is not None and not (isinstance(speech_end, int) and 0 < speech_end <= samples):
        raise StreamStateError(f"stream state VAD speech end is malformed: {speech_end!r}")
    context = _check_tensor(tensors, "vad.context", (VAD_CONTEXT,), torch.float32)
    leftover = _check_tensor(tensors, "vad.leftover", None, torch.float32, max_len=VAD_WINDOW - 1)
    h = _check_tensor(tensors, "vad.h", (SileroVad.HIDDEN,), torch.float32)
    c = _check_tensor(tensors, "vad.c", (SileroVad.HIDDEN,), torch.float32)
    return VadState(context, leftover, h, c, samples, speech_end)
