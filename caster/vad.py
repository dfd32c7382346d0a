"""Silero VAD in plain PyTorch: a voice-activity detector with explicit per-stream state.

The model ships inside the `silero-vad` pip package (`pip install silero-vad`).
It is run here from the packaged weights rather than through the package, so
that its state is a plain value (`VadState`) that a stream saves and restores
with the rest of its state. Endpointing (`caster.endpoint`) uses it to decide
silence instead of the decoder's blank frames.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caster.endpoint import EndpointError

VAD_SAMPLE_RATE = 16000
VAD_WINDOW = 512  # samples per speech probability (32 ms)
VAD_CONTEXT = 64  # samples of the previous window each window also sees
VAD_FILE = "silero_vad.jit"
# This module's parameter names -> the packaged 16 kHz model's.
_VAD_KEYS = {
    "stft_conv.weight": "_model.stft.forward_basis_buffer",
    **{
        f"conv{i + 1}.{w}": f"_model.encoder.{i}.reparam_conv.{w}"
        for i in range(4)
        for w in ("weight", "bias")
    },
    **{
        f"lstm_cell.{w}": f"_model.decoder.rnn.{w}"
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    },
    "final_conv.weight": "_model.decoder.decoder.2.weight",
    "final_conv.bias": "_model.decoder.decoder.2.bias",
}


@dataclass(frozen=True)
class VadState:
    """Per-stream state of the voice-activity detector.

    context:    (64,) the last samples of the previous window
    leftover:   (<512,) samples not yet making a whole window
    h, c:       (128,) LSTM state
    samples:    samples turned into windows so far
    speech_end: sample index where the last speech window ended (None before any)
    """

    context: Tensor
    leftover: Tensor
    h: Tensor
    c: Tensor
    samples: int
    speech_end: int | None

    @classmethod
    def initial(cls) -> VadState:
        zeros = torch.zeros(SileroVad.HIDDEN)
        return cls(torch.zeros(VAD_CONTEXT), torch.zeros(0), zeros, zeros.clone(), 0, None)

    @property
    def silence_ms(self) -> float | None:
        """Non-speech heard since the last speech window ended (None before any speech)."""
        if self.speech_end is None:
            return None
        return 1000 * (self.samples - self.speech_end) / VAD_SAMPLE_RATE

    def speech_ended_by(self, ms: int) -> bool:
        """Whether the last speech window ended at most `ms` milliseconds into the stream."""
        return self.speech_end is not None and ms * VAD_SAMPLE_RATE // 1000 >= self.speech_end


class SileroVad(nn.Module):
    """The packaged Silero VAD model (16 kHz) in plain PyTorch, with explicit state.

    Each 512-sample window (with 64 samples of context) gives one speech
    probability: a 256-point STFT as a convolution, four 1-D convolutions, an
    LSTM cell and a sigmoid. Module names match the package's safetensors keys.
    """

    HIDDEN = 128
    N_FFT = 256

    def __init__(self) -> None:
        super().__init__()
        bins = self.N_FFT // 2 + 1
        self.stft_conv = nn.Conv1d(1, 2 * bins, self.N_FFT, stride=self.N_FFT // 2, bias=False)
        self.conv1 = nn.Conv1d(bins, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, self.HIDDEN)
        self.final_conv = nn.Conv1d(self.HIDDEN, 1, 1)

    @classmethod
    def from_package(cls) -> SileroVad:
        """Load the 16 kHz weights of the model that the installed `silero-vad` package uses.

        The package is located, not imported: importing it sets torch's global
        thread count to 1. Its TorchScript file is only read for its weights.

        Raises:
            EndpointError: the package is not installed, or holds an unexpected model.
        """
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise EndpointError(
                "VAD endpointing needs the silero-vad package: pip install silero-vad"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / VAD_FILE
        if not path.is_file():
            raise EndpointError(f"the installed silero-vad package has no data/{VAD_FILE}")
        # torch 2.13 deprecates TorchScript loading; this file is only read for its weights.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            packaged = torch.jit.load(str(path), map_location="cpu").state_dict()
        vad = cls()
        try:
            vad.load_state_dict(
                {name: packaged[key] for name, key in _VAD_KEYS.items()}, strict=True
            )
        except (KeyError, RuntimeError) as e:
            raise EndpointError(f"unexpected silero-vad model in {path}: {e}") from e
        return vad.eval()

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Speech probability of a batch of windows.

        Args:
            x: (B, 64 + 512) context followed by the window.
            h, c: (B, 128) LSTM state.
        Returns:
            (B,) probabilities and the new (h, c).
        """
        x = F.pad(x[:, None], (0, VAD_CONTEXT), mode="reflect")  # (B, 1, 640)
        spec = self.stft_conv(x)  # (B, 2 * bins, 4): real parts, then imaginary parts
        bins = spec.shape[1] // 2
        x = torch.sqrt(spec[:, :bins] ** 2 + spec[:, bins:] ** 2)  # (B, bins, 4)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        h, c = self.lstm_cell(x.squeeze(-1), (h, c))  # (B, 128) from (B, 128, 1)
        prob = torch.sigmoid(self.final_conv(F.relu(h)[..., None]))  # (B, 1, 1)
        return prob[:, 0, 0], h, c


@torch.inference_mode()
def vad_step(vad: SileroVad, samples: Tensor, state: VadState, threshold: float) -> VadState:
    """Run the VAD over a stream's new samples (16 kHz, (N,)); returns the new state."""
    audio = torch.cat([state.leftover, samples.float().cpu()])
    whole = audio.shape[0] // VAD_WINDOW * VAD_WINDOW
    context, h, c = state.context, state.h[None], state.c[None]
    speech_end, position = state.speech_end, state.samples
    for start in range(0, whole, VAD_WINDOW):
        window = audio[start : start + VAD_WINDOW]
        prob, h, c = vad(torch.cat([context, window])[None], h, c)
        context = window[-VAD_CONTEXT:]
        position += VAD_WINDOW
        if float(prob[0]) >= threshold:
            speech_end = position
    return VadState(context.clone(), audio[whole:].clone(), h[0], c[0], position, speech_end)
