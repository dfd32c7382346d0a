"""NeMo-parity log-mel features, offline and streaming.

Offline, `FilterbankFeatures.forward` reproduces NeMo's `FilterbankFeatures` in eval
mode (no dither, no normalisation). Streaming, `mel_step` turns audio pieces of any
size into the very same frames, and `mel_flush` ends the stream. Both paths run the
pre-emphasis through `FilterbankFeatures.emphasize` and the STFT, power, filter bank
and log through `FilterbankFeatures.log_mel_frames`, so the arithmetic is shared.

Frame geometry (center=True in NeMo, P = n_fft // 2): the signal is padded with P zeros
on each side, and frame k covers padded samples [hop*k, hop*k + n_fft), i.e. raw samples
[hop*k - P, hop*k + P). N samples give N // hop + 1 frames, of which N // hop are valid;
the last one is always set to pad_value.

Parity limit: torch's float32 FFT rounds differently on different CPUs (MKL picks
kernels by instruction set) and GPUs. That noise is ~1e-6 of a frame's strongest mel
band, and log() magnifies it in bands 50+ dB quieter (up to ~1e-3 there). Across
machines, compare features with a tolerance that allows for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caster.config import ConfigError, MelConfig


class MelInputError(ValueError):
    """Audio or lengths given to the mel front end are malformed."""


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above.
_HZ_PER_MEL = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    mels = hz / _HZ_PER_MEL
    log_part = hz >= _MIN_LOG_HZ
    mels[log_part] = _MIN_LOG_MEL + np.log(hz[log_part] / _MIN_LOG_HZ) / _LOG_STEP
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = _HZ_PER_MEL * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * np.exp(_LOG_STEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz


def mel_filterbank(cfg: MelConfig) -> Tensor:
    """The mel filter bank NeMo stores as `preprocessor.featurizer.fb` (without its batch dim).

    Computes what `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, norm=cfg.mel_norm,
    htk=False)` returns, in float64 with librosa's float32 roundings (the triangles are
    stored as float32 before the Slaney normalisation multiplies them), so the result
    equals the checkpoint's buffer.

    Args:
        cfg: the mel configuration; `highfreq=None` means sample_rate / 2.

    Returns:
        (n_mels, n_fft // 2 + 1) float32 weights.
    """
    fmin = float(cfg.lowfreq)
    fmax = float(cfg.highfreq) if cfg.highfreq is not None else cfg.sample_rate / 2
    if not 0.0 <= fmin < fmax:
        raise ConfigError(f"mel band [{fmin}, {fmax}] Hz is empty or negative")
    if cfg.mel_norm not in ("slaney", None):
        raise ConfigError(f"mel_norm {cfg.mel_norm!r} is not supported (slaney or None)")
    fft_hz = np.fft.rfftfreq(n=cfg.n_fft, d=1.0 / cfg.sample_rate)  # (F,)
    mel_edges = np.linspace(
        _hz_to_mel(np.array([fmin]))[0], _hz_to_mel(np.array([fmax]))[0], cfg.n_mels + 2
    )
    hz_edges = _mel_to_hz(mel_edges)  # (n_mels + 2,)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_hz[None, :]  # (n_mels + 2, F)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    if cfg.mel_norm == "slaney":
        # Equal area per filter; librosa multiplies float32 weights by float64 factors.
        enorm = 2.0 / (hz_edges[2:] - hz_edges[:-2])
        weights = (weights * enorm[:, None]).astype(np.float32)
    return torch.from_numpy(weights)


def window(cfg: MelConfig) -> Tensor:
    """NeMo's analysis window: a symmetric Hann window (periodic=False), (win_length,)."""
    return torch.hann_window(cfg.win_length, periodic=False, dtype=torch.float32)


def _check_config(cfg: MelConfig) -> None:
    if cfg.n_fft <= 0 or cfg.n_fft % 2:
        # Even n_fft makes NeMo's valid count (n + 2*(n_fft//2) - n_fft) // hop == n // hop.
        raise ConfigError(f"n_fft must be even and positive, got {cfg.n_fft}")
    if not 0 < cfg.win_length <= cfg.n_fft:
        raise ConfigError(f"win_length {cfg.win_length} must be in [1, n_fft={cfg.n_fft}]")
    if cfg.hop_length <= 0:
        raise ConfigError(f"hop_length must be positive, got {cfg.hop_length}")


class FilterbankFeatures(nn.Module):
    """NeMo's `FilterbankFeatures` at inference: log-mel with masked padding frames.

    The buffers `window` (win_length,) and `fb` (1, n_mels, n_fft//2 + 1) carry NeMo's
    state_dict names, so a checkpoint's `preprocessor.featurizer.*` tensors load over the
    computed ones.
    """

    def __init__(self, cfg: MelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.register_buffer("window", window(cfg))
        self.register_buffer("fb", mel_filterbank(cfg).unsqueeze(0))

    def emphasize(self, x: Tensor, prev: Tensor) -> Tensor:
        """Pre-emphasis y[t] = x[t] - preemph * x[t-1].

        Args:
            x: (B, N) float32 samples.
            prev: (B, 1) the raw sample just before x, or (B, 0) at the start of the
                audio, where NeMo keeps y[0] = x[0].

        Returns:
            (B, N) float32.
        """
        if self.cfg.preemph is None:
            return x
        if prev.size(1) == 0:
            return torch.cat((x[:, :1], x[:, 1:] - self.cfg.preemph * x[:, :-1]), dim=1)
        return x - self.cfg.preemph * torch.cat((prev, x[:, :-1]), dim=1)

    def log_mel_frames(self, padded: Tensor) -> Tensor:
        """Log-mel of every whole n_fft frame of an already padded, pre-emphasised signal.

        This is the one STFT/filter-bank path of both offline and streaming features.

        Args:
            padded: (B, L) float32, L >= n_fft; frame k starts at sample hop * k.

        Returns:
            (B, n_mels, (L - n_fft) // hop + 1) float32.
        """
        cfg = self.cfg
        # NeMo disables autocast here: fp16 power spectra overflow and give NaN logs.
        with torch.autocast(padded.device.type, enabled=False):
            spec = torch.stft(
                padded,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                win_length=cfg.win_length,
                window=self.window.to(padded.dtype),
                center=False,  # the caller has padded, as center=True would
                return_complex=True,
            )  # (B, F, T)
            # sqrt then pow, not |X|^2 directly: NeMo's order, for bit-equal rounding.
            magnitude = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
            power = magnitude.pow(cfg.mag_power)
            # NeMo multiplies in float32, but a float32 GEMM's summation order depends on
            # the column count (MKL switches kernels below 16 frames) and on TF32 settings
            # on GPUs, so streaming pieces would differ from offline in the last bits.
            # Accumulating in float64 and rounding once makes every frame independent of
            # how many frames share the call; it stays within one float32 rounding of
            # NeMo, far below the STFT's own rounding noise.
            mel = torch.matmul(self.fb.double(), power.double()).float()  # (B, n_mels, T)
        return torch.log(mel + cfg.log_zero_guard_value)

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Offline log-mel features of a padded batch.

        Args:
            audio: (B, N) floating samples; samples past each length are ignored.
            lengths: (B,) integer count of valid samples per item, 0 <= length <= N.

        Returns:
            mel: (B, n_mels, N // hop + 1) float32; frames >= mel_lengths hold pad_value.
            mel_lengths: (B,) int64 valid frames, lengths // hop.
        """
        _check_batch(audio, lengths)
        x = audio.to(torch.float32)
        lengths = lengths.to(device=x.device, dtype=torch.int64)
        mel_lengths = lengths // self.cfg.hop_length
        y = self.emphasize(x, x[:, :0])
        # Zero the batch padding, as NeMo does after pre-emphasis. Done even without
        # pre-emphasis so that an item's frames never depend on its padding.
        time = torch.arange(x.size(1), device=x.device)
        y = y.masked_fill(time[None, :] >= lengths[:, None], 0.0)
        half = self.cfg.n_fft // 2
        mel = self.log_mel_frames(F.pad(y, (half, half)))  # torch.stft(center=True) padding
        # The last frame always reaches past the audio: NeMo fills it with pad_value (0.0),
        # not with log(guard).
        frame = torch.arange(mel.size(-1), device=x.device)
        invalid = frame[None, :] >= mel_lengths[:, None]  # (B, T)
        return mel.masked_fill(invalid[:, None, :], self.cfg.pad_value), mel_lengths


def _check_batch(audio: Tensor, lengths: Tensor) -> None:
    if audio.dim() != 2 or not audio.is_floating_point():
        raise MelInputError(
            f"audio must be a (batch, samples) floating tensor, got {audio.dtype} "
            f"of shape {tuple(audio.shape)}"
        )
    if lengths.shape != audio.shape[:1] or lengths.is_floating_point() or lengths.is_complex():
        raise MelInputError(
            f"lengths must be a ({audio.size(0)},) integer tensor, got {lengths.dtype} "
            f"of shape {tuple(lengths.shape)}"
        )
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > audio.size(1)):
        raise MelInputError(f"lengths must lie in [0, {audio.size(1)}], got {lengths.tolist()}")


class Preprocessor(nn.Module):
    """NeMo's `AudioToMelSpectrogramPreprocessor`: state_dict keys `featurizer.window/fb`."""

    def __init__(self, cfg: MelConfig) -> None:
        super().__init__()
        self.featurizer = FilterbankFeatures(cfg)

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """See `FilterbankFeatures.forward`: (B, N), (B,) -> (B, n_mels, T), (B,)."""
        return self.featurizer(audio, lengths)


@dataclass(frozen=True)
class MelState:
    """Streaming mel state of ONE stream.

    Not batched: streams receive audio in pieces of different sizes and so have
    different numbers of frames ready; the engine batches at the encoder, whose chunks
    have a fixed frame count, not here.

    Its size is bounded (pending < n_fft + hop samples) however long the stream runs.
    """

    # (L,) pre-emphasised samples from padded index hop * frames_emitted on (raw index
    # hop * frames_emitted - n_fft // 2); the left center=True zero padding included.
    pending: Tensor
    # (1,) the last raw sample, for pre-emphasis across pieces; (0,) before any audio.
    last_sample: Tensor
    frames_emitted: int
    samples_seen: int

    @classmethod
    def initial(cls, cfg: MelConfig, device: torch.device | str = "cpu") -> MelState:
        """The state of a stream that has seen no audio, on the features' device."""
        return cls(
            pending=torch.zeros(cfg.n_fft // 2, device=device),
            last_sample=torch.zeros(0, device=device),
            frames_emitted=0,
            samples_seen=0,
        )


def mel_step(
    features: FilterbankFeatures, samples: Tensor, state: MelState
) -> tuple[Tensor, MelState]:
    """Feed one piece of a stream; return every frame that has become computable.

    Frame k is returned once samples up to hop*k + n_fft//2 - 1 have arrived and the
    stream is known to reach hop*(k+1) samples (so that it is a valid offline frame).
    The frames equal the offline valid frames however the audio is split.

    Args:
        features: the shared front end (read only).
        samples: (N,) floating samples, N >= 0, moved to the state's device.
        state: the stream's state before this piece (not modified).

    Returns:
        frames: (n_mels, k) float32, k >= 0.
        state: the state after this piece.
    """
    if samples.dim() != 1 or not samples.is_floating_point():
        raise MelInputError(
            f"samples must be a 1-D floating tensor, got {samples.dtype} "
            f"of shape {tuple(samples.shape)}"
        )
    if samples.numel() == 0:
        return _frames(features, state.pending, 0), state
    x = samples.to(device=state.pending.device, dtype=torch.float32)
    y = features.emphasize(x[None], state.last_sample[None])[0]
    buffer = torch.cat((state.pending, y))
    seen = state.samples_seen + x.numel()
    hop, n_fft = features.cfg.hop_length, features.cfg.n_fft
    computable = max(0, (buffer.numel() - n_fft) // hop + 1)
    ready = min(computable, seen // hop - state.frames_emitted)
    frames = _frames(features, buffer, ready)
    new_state = MelState(
        # clone: a view would keep this call's whole buffer alive in the state
        pending=buffer[hop * ready :].clone(),
        last_sample=x[-1:].clone(),
        frames_emitted=state.frames_emitted + ready,
        samples_seen=seen,
    )
    return frames, new_state


def mel_flush(features: FilterbankFeatures, state: MelState) -> Tensor:
    """End a stream: the frames still owed, computed with center=True's zero padding.

    After it, the stream has produced samples_seen // hop frames in all, the offline
    valid count.

    Args:
        features: the shared front end (read only).
        state: the stream's final state (not modified).

    Returns:
        (n_mels, k) float32, k >= 0.
    """
    remaining = state.samples_seen // features.cfg.hop_length - state.frames_emitted
    needed = features.cfg.hop_length * (remaining - 1) + features.cfg.n_fft
    # Zeros past the end: NeMo's length mask plus the right center=True padding.
    padded = F.pad(state.pending, (0, max(0, needed - state.pending.numel())))
    return _frames(features, padded, remaining)


def _frames(features: FilterbankFeatures, buffer: Tensor, count: int) -> Tensor:
    """The first `count` frames of a padded-coordinate buffer (L,), as (n_mels, count)."""
    if count == 0:
        return buffer.new_zeros(features.cfg.n_mels, 0)
    span = features.cfg.hop_length * (count - 1) + features.cfg.n_fft
    return features.log_mel_frames(buffer[None, :span])[0]
