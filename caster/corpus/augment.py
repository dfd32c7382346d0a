"""Room reverberation and background noise for corpus audio, drawn per item from its seed.

The settings are drawn when the build is planned (`draw_augmentation`) and written to the
manifest, so a resumed build, which skips items whose audio exists, writes the same manifest as
a fresh one. `apply_augmentation` makes the same samples from the same settings and seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Augmentation:
    """What is done to one item's audio.

    rt60_s:    reverberation time of a synthetic room; None for no reverberation
    snr_db:    signal-to-noise ratio of added coloured noise; None for no noise
    slope_db:  noise colour, dB per octave relative to 1 kHz (0 = white, -6 = brown-ish)
    peak_db:   peak level of the result, dBFS
    """

    rt60_s: float | None
    snr_db: float | None
    slope_db: float
    peak_db: float

    def to_dict(self) -> dict[str, float]:
        """The applied settings, for the manifest (absent keys were not applied)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def draw_augmentation(rng: np.random.Generator) -> Augmentation:
    """Reverberation with probability 0.6 (RT60 0.15-0.8 s), noise with probability 0.7
    (5-35 dB SNR, slope -6..+3 dB/octave), peak -12..-1 dBFS."""
    rt60 = round(float(rng.uniform(0.15, 0.8)), 3) if rng.random() < 0.6 else None
    snr = round(float(rng.uniform(5, 35)), 2) if rng.random() < 0.7 else None
    slope = round(float(rng.uniform(-6, 3)), 2)
    peak = round(float(rng.uniform(-12, -1)), 2)
    return Augmentation(rt60, snr, slope, peak)


def apply_augmentation(audio: np.ndarray, augmentation: Augmentation, seed: int) -> np.ndarray:
    """Reverberate, add noise and set the peak level.

    Args:
        audio: mono float32 at 16 kHz, (N,).
        augmentation: from `draw_augmentation`.
        seed: the item's seed; the room response and the noise are drawn from it.

    Returns:
        float32 (N,).
    """
    rng = np.random.default_rng(seed)
    out = audio.astype(np.float64)
    if augmentation.rt60_s is not None:
        rt60 = augmentation.rt60_s
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        # Direct path, then a diffuse tail that has fallen by 60 dB at rt60: 10^(-3 t / rt60).
        rir = rng.standard_normal(t.size) * 10 ** (-3 * t / rt60) * 0.3
        rir[0] = 1.0
        # FFT convolution: a direct one with a 0.8 s response takes seconds per utterance.
        size = out.size + rir.size - 1
        out = np.fft.irfft(np.fft.rfft(out, size) * np.fft.rfft(rir, size), size)[: audio.size]
    if augmentation.snr_db is not None:
        noise = _coloured_noise(out.size, augmentation.slope_db, rng)
        signal_power = max(float(np.mean(out**2)), 1e-12)
        noise_power = max(float(np.mean(noise**2)), 1e-12)
        out = out + noise * math.sqrt(
            signal_power / (10 ** (augmentation.snr_db / 10) * noise_power)
        )
    out *= 10 ** (augmentation.peak_db / 20) / max(float(np.max(np.abs(out))), 1e-9)
    return out.astype(np.float32)


def _coloured_noise(n: int, slope_db_per_octave: float, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    gain = 10 ** (slope_db_per_octave * np.log2(np.maximum(freqs, 20.0) / 1000.0) / 20)
    return np.fft.irfft(spectrum * gain, n)
