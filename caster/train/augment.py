"""Training augmentations: SpecAugment on log-mel, speed perturbation and noise on audio.

Every function draws its randomness from a generator it is given, so a seed reproduces it.
`spec_augment` follows NeMo's `SpecAugment` (vectorised version, the default): time masks then
frequency masks, each of width floor(rand * max_width) starting at
floor(rand * (length - width)), filled with 0.0 (NeMo's `mask_value`; with the models'
unnormalised log-mel that is log 1, not silence, and it is what the released models saw).
"""

from __future__ import annotations

import numpy as np
import soxr
import torch
from torch import Tensor


class AugmentError(ValueError):
    """An augmentation was asked for with unusable parameters or input."""


def spec_augment(
    mel: Tensor,
    lengths: Tensor,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width: int | float,
    generator: torch.Generator,
) -> Tensor:
    """Mask random frequency bands and time spans of a batch of spectrograms.

    Args:
        mel: (B, F, T) features.
        lengths: (B,) valid frames; time masks start inside them.
        freq_masks: frequency masks per utterance.
        freq_width: widest frequency mask in bins; each width is drawn in [0, freq_width).
        time_masks: time masks per utterance.
        time_width: widest time mask, in frames (int) or as a fraction of the utterance's
            length (float in [0, 1], NeMo's adaptive width; the released configs use 0.05).
        generator: a CPU torch.Generator; the same seed gives the same masks on any device.

    Returns:
        (B, F, T) masked copy of `mel`.

    Raises:
        AugmentError: negative counts or widths, a fractional width outside [0, 1], or a
            freq_width larger than F.
    """
    if mel.dim() != 3 or lengths.shape != (mel.shape[0],):
        raise AugmentError(
            f"mel must be (B, F, T) with (B,) lengths, got {tuple(mel.shape)} and "
            f"{tuple(lengths.shape)}"
        )
    batch, bins, frames = mel.shape
    if min(freq_masks, time_masks, freq_width) < 0 or freq_width > bins:
        raise AugmentError(
            f"need freq_masks, time_masks >= 0 and 0 <= freq_width <= {bins}, got "
            f"{freq_masks}, {time_masks}, {freq_width}"
        )
    lengths_cpu = lengths.detach().to("cpu", torch.float32)
    if isinstance(time_width, float):
        if not 0.0 <= time_width <= 1.0:
            raise AugmentError(f"a fractional time_width must lie in [0, 1], got {time_width}")
        time_max = torch.clamp(time_width * lengths_cpu, max=frames)[:, None]  # (B, 1)
    elif time_width < 0:
        raise AugmentError(f"time_width must be >= 0, got {time_width}")
    else:
        time_max = torch.full((batch, 1), float(time_width))
    time_mask = _span_mask(batch, time_masks, time_max, lengths_cpu[:, None], frames, generator)
    freq_mask = _span_mask(
        batch, freq_masks, torch.full((batch, 1), float(freq_width)), float(bins), bins, generator
    )
    mask = time_mask[:, None, :].to(mel.device) | freq_mask[:, :, None].to(mel.device)
    return mel.masked_fill(mask, 0.0)


def _span_mask(
    batch: int,
    count: int,
    max_width: Tensor,
    extent: Tensor | float,
    size: int,
    generator: torch.Generator,
) -> Tensor:
    """(B, size) bool: the union of `count` random spans per row, as NeMo draws them."""
    width = (torch.rand((batch, count), generator=generator) * max_width).long()  # (B, count)
    start = (torch.rand((batch, count), generator=generator) * (extent - width)).long()
    start = start.clamp(min=0)  # a span wider than a short utterance starts at 0
    positions = torch.arange(size)[None, None, :]  # (1, 1, size)
    inside = (positions >= start[..., None]) & (positions < (start + width)[..., None])
    return inside.any(dim=1)


def speed_perturb(audio: np.ndarray, rate: int, factor: float) -> np.ndarray:
    """Play audio `factor` times faster: shorter by 1/factor, pitch up by `factor`.

    The usual (Kaldi/NeMo `SpeedPerturbation`) resampling trick: the samples are read as if
    recorded at rate * factor and resampled to `rate` with soxr.

    Args:
        audio: (N,) float32 mono samples at `rate`.
        rate: sample rate in Hz.
        factor: speed factor, e.g. 0.9 or 1.1; 1.0 returns a copy.

    Returns:
        (round(N / factor),) float32 samples at `rate` (soxr's length, +-1 sample).

    Raises:
        AugmentError: a factor outside (0.1, 10], a non-positive rate or non-mono audio.
    """
    if not 0.1 < factor <= 10.0 or rate <= 0:
        raise AugmentError(f"speed factor must lie in (0.1, 10] and rate > 0, got {factor}, {rate}")
    audio = _mono(audio)
    if factor == 1.0:
        return audio.copy()
    return soxr.resample(audio, rate * factor, rate, quality="HQ").astype(np.float32, copy=False)


def mix_noise(
    audio: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """Add noise at a signal-to-noise ratio.

    A random stretch of `noise` as long as `audio` is taken (the noise is repeated when it is
    shorter) and scaled so that mean(audio**2) / mean(noise**2) = 10**(snr_db / 10).

    Args:
        audio: (N,) float32 speech.
        noise: (M,) float32 noise at the same sample rate.
        snr_db: target SNR in dB.
        rng: numpy Generator choosing the noise offset.

    Returns:
        (N,) float32 noisy audio; `audio` unchanged (a copy) when it or the noise is silent.

    Raises:
        AugmentError: empty or non-mono noise, or a non-finite SNR.
    """
    audio = _mono(audio)
    noise = _mono(noise)
    if noise.size == 0 or not np.isfinite(snr_db):
        raise AugmentError(f"need non-empty noise and a finite SNR, got {noise.size}, {snr_db}")
    if audio.size == 0:
        return audio.copy()
    start = int(rng.integers(0, noise.size))
    piece = noise[(start + np.arange(audio.size)) % noise.size].astype(np.float64)
    speech_power = float(np.mean(audio.astype(np.float64) ** 2))
    noise_power = float(np.mean(piece**2))
    if speech_power == 0.0 or noise_power == 0.0:
        return audio.copy()
    gain = np.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (audio + gain * piece).astype(np.float32)


def _mono(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AugmentError(f"expected (N,) mono samples, got shape {audio.shape}")
    return audio
