"""The loaded recognizer: weights, tokenizer and the public transcribe/stream API."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from caster.audio import as_audio, load_audio
from caster.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from caster.checkpoint.native import save_native
from caster.config import ModelConfig
from caster.decoding import greedy_decode, initial_decoder_state
from caster.languages import canonical_locale, resolve_language
from caster.mel import mel_filterbank, window
from caster.streaming import Stream
from caster.tokenizer import Tokenizer
from caster.transducer import Transducer

AudioInput = str | os.PathLike | bytes | BinaryIO | np.ndarray


@dataclass(frozen=True)
class Transcript:
    """A recognition result.

    text:       the text, language tags removed
    token_ids:  raw token ids, language tags included
    language:   the locale asked for, or in `auto` mode the last tag the model
                emitted (None when it emitted none, or the model has no prompt)
    token_frames: encoder frame at which each token was emitted
                (`config.encoder_frame_ms` apart: 80 ms for the released models)
    token_logprobs: log-probability of each token under the joint
    """

    text: str
    token_ids: list[int]
    language: str | None
    token_frames: list[int]
    token_logprobs: list[float]


def build_transducer(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> Transducer:
    """Instantiate the network and load the checkpoint's weights (strictly).

    The network is built without allocating weights (meta device) and the
    checkpoint's tensors are adopted as they are, so loading costs one copy of
    the weights at most. Front-end buffers a layout does not store (Hugging
    Face drops them) are computed from the mel config.
    """
    cfg = checkpoint.config
    state = dict(checkpoint.state_dict)
    # NeMo names the joint's output layer joint_net.1 when its dropout is 0.
    for suffix in ("weight", "bias"):
        if f"joint.joint_net.1.{suffix}" in state:
            state[f"joint.joint_net.2.{suffix}"] = state.pop(f"joint.joint_net.1.{suffix}")
    state.setdefault("preprocessor.featurizer.fb", mel_filterbank(cfg.mel)[None])
    state.setdefault("preprocessor.featurizer.window", window(cfg.mel))
    with torch.device("meta"):
        net = Transducer(cfg)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the configured model: {e}") from e
    net.decoder.prediction.dec_rnn.lstm.flatten_parameters()
    return net.to(device).eval()


class Model:
    """A loaded recognizer. Holds no stream state: one instance serves any number of streams.

    `dtype` (bf16 or fp16; None keeps the checkpoint's float32) runs the encoder and
    prediction network in half precision; the mel front end, the prompt projection and
    the joint stay float32 (`Transducer.set_dtype`).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = Tokenizer(checkpoint.tokenizer_model)
        if self.tokenizer.vocab_size != self.config.decoder.vocab_size:
            raise CheckpointError(
                f"tokenizer has {self.tokenizer.vocab_size} pieces, "
                f"decoder expects {self.config.decoder.vocab_size}"
            )
        self._tokenizer_model = checkpoint.tokenizer_model
        self.net = build_transducer(checkpoint, self.device)
        if dtype is not None:
            self.net.set_dtype(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder and prediction network compute in."""
        return self.net.encoder.dtype

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model in caster's own format (safetensors + caster.json + tokenizer)."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return save_native(path, Checkpoint(self.config, state, self._tokenizer_model))

    def prompt_index(self, language: str | None) -> int | None:
        """The prompt index for a user-given language (None for a model without a prompt)."""
        return resolve_language(language, self.config.prompt)

    def transcribe(
        self,
        audio: AudioInput | Sequence[AudioInput],
        language: str | None = None,
        chunk_ms: int | None = None,
    ) -> Transcript | list[Transcript]:
        """Recognize one recording, or a list of them (batched by length).

        Args:
            audio: a file path, the file's bytes or a binary file object, or float32
                mono samples at 16 kHz; or a list or tuple of these, which gives a list
                (see `caster.transcribe.transcribe_many` for files at scale).
            language: a locale from the model's prompt dictionary, "auto", or None
                (auto where the model has it). Must be None or "auto" for models
                without a language prompt.
            chunk_ms: None for the model's default attention context, else the
                latency (80, 160, 320, 560 or 1120 ms) whose context to use; the
                result equals a stream with that chunk size.
        """
        if isinstance(audio, list | tuple):
            from caster.transcribe import transcribe_many  # it imports this module

            results = transcribe_many(self, audio, language, chunk_ms, errors="raise")
            return [r.transcript for r in results]
        prompt = self.prompt_index(language)
        context = self.config.context_for_chunk_ms(chunk_ms)
        if isinstance(audio, str | os.PathLike | bytes | bytearray) or hasattr(audio, "read"):
            samples = load_audio(audio, self.config.mel.sample_rate)
        else:
            samples = as_audio(audio)
        return self._transcribe_samples(torch.from_numpy(samples), prompt, context)

    @torch.inference_mode()
    def _transcribe_samples(
        self, samples: torch.Tensor, prompt: int | None, context: tuple[int, int]
    ) -> Transcript:
        net = self.net
        audio = samples.to(self.device)[None]  # (1, N)
        mel, mel_len = net.preprocessor(audio, torch.tensor([audio.shape[1]], device=self.device))
        if int(mel_len[0]) == 0:  # shorter than one hop: nothing to encode
            return self.make_transcript([], [], [], prompt)
        encoded, encoded_len = net.encoder(mel, mel_len, context)
        prompts = None if prompt is None else torch.tensor([prompt], device=self.device)
        encoded = net.apply_prompt(encoded, prompts)
        hyps, _ = greedy_decode(net, encoded, encoded_len, initial_decoder_state(net, 1))
        return self.make_transcript(hyps[0].token_ids, hyps[0].frames, hyps[0].scores, prompt)

    def stream(self, language: str | None = None, chunk_ms: int | None = 320) -> Stream:
        """Start a live stream at the latency `chunk_ms` (None: the model's default)."""
        return Stream(self, self.prompt_index(language), self.config.context_for_chunk_ms(chunk_ms))

    def make_transcript(
        self,
        token_ids: list[int],
        frames: list[int],
        logprobs: list[float],
        prompt: int | None,
    ) -> Transcript:
        text, tags = self.tokenizer.split_language_tags(self.tokenizer.decode(token_ids))
        language = self.language_of(prompt, tags)
        return Transcript(text, list(token_ids), language, list(frames), list(logprobs))

    def language_of(self, prompt: int | None, tags: list[str]) -> str | None:
        """The locale asked for, or in `auto` mode the last language tag the model emitted."""
        if prompt is None:
            return None
        language = canonical_locale(prompt, self.config.prompt)
        return tags[-1] if language is None and tags else language


PRESET_PREFIX = "preset:"
# caster's own small model, shipped in the package (its MODEL_CARD.md says what it is): what
# `load()`, `caster transcribe` and `caster serve` use when no model is named.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "caster-demo-40"


def load(
    path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    int8: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Model:
    """Load a `.nemo` file, a Hugging Face directory or a caster directory.

    With no path, caster's built-in demonstration model (`DEFAULT_MODEL`): 40 locales and
    `auto`, every chunk size, trained by caster on synthetic and a little real speech; a
    test and demo model, not a replacement for NVIDIA's checkpoints.

    `preset:<name>` builds a released model's architecture with random weights
    (see `caster.presets`), for tests and benchmarks without a download.
    `int8=True` gives the CPU fast path: int8 weights for the large linear layers
    and the LSTM (`caster.quantize`; its accuracy cost is in bench/results).
    `dtype=torch.bfloat16` (or "bf16", float16/"fp16") runs the network in half
    precision, the GPU fast path (see `Model`); float32 when None.
    """
    if path is None:
        path = DEFAULT_MODEL
    if isinstance(path, str) and path.startswith(PRESET_PREFIX):
        from caster.presets import random_checkpoint

        model = Model(random_checkpoint(path[len(PRESET_PREFIX) :]), device, dtype)
    else:
        model = Model(load_checkpoint(path), device, dtype)
    if int8:
        from caster.quantize import quantize_model  # it imports this module

        model = quantize_model(model)
    return model
