"""Audio input: decode files or arrays into mono float32 samples at the model's rate.

Everything here treats its input as untrusted. Files are decoded block by block, so a header
that lies about its length can never make us allocate memory up front; decoded audio is capped
at ``max_duration_s``. Every failure is an :class:`AudioError` naming the source.

Decoding tries libsndfile (``soundfile``: exact for PCM, fast) and falls back to FFmpeg (PyAV)
for what libsndfile cannot open (m4a/aac, webm, video containers, ...). Two formats that
libsndfile 1.2.2 opens still go to PyAV, for what it gets wrong (measured):
- MP3: without a Xing/Info header it takes the length from the bitrate and silently stops
  there (1.7 s kept of a 6 s VBR file).
- Ogg Opus: it ignores the pre-skip of FFmpeg-written files (audio late by 312 samples).
"""

from __future__ import annotations

import io
import operator
import os
import re
from collections.abc import Sequence
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf
import soxr
import torch

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
MAX_DURATION_S = 24 * 3600.0
_BLOCK_FRAMES = 1 << 16
# libsndfile clamps a data chunk's length to the bytes present and only logs the header's claim,
# e.g. "data : 64000 (should be 31978)" (WAV), "SSND : ..." (AIFF), "Data Size : ..." (AU).
# Streaming writers put 0xFFFFFFFF (ffmpeg) or 0x7FFFF000 (sox) there when the length is unknown,
# so claims from 0x7FFF0000 up mean "unknown", not "cut short".
_DATA_SIZE_LOG = re.compile(r"^\s*(?:data|SSND|Data Size)\s*: (\d+) \(should be (\d+)\)", re.M)
_UNKNOWN_SIZE = 0x7FFF0000


class AudioError(ValueError):
    """The audio (file, bytes or array) is missing, unreadable or unusable."""


def load_audio(
    source: str | os.PathLike | bytes | BinaryIO,
    sample_rate: int = 16000,
    *,
    max_duration_s: float = MAX_DURATION_S,
) -> np.ndarray:
    """Decode an audio file to mono float32 at ``sample_rate``.

    Args:
        source: a path, the file's bytes, or a binary file object (a seekable one is read
            whole, from offset 0; a pipe or socket from where it stands).
        sample_rate: rate of the returned samples; resampled with soxr "VHQ" when it differs.
        max_duration_s: longest audio accepted, checked from the header before decoding when
            the header states a length, and while decoding in any case.

    Returns:
        (N,) float32: channels averaged, integer PCM scaled by 1/2**(bits-1).

    Raises:
        AudioError: missing, unreadable, corrupt, truncated, empty, non-finite or absurd audio.
    """
    sample_rate = _check_rate(sample_rate, "target sample rate")
    file, name = _open(source)
    try:
        if file.seek(0, io.SEEK_END) == 0:
            raise AudioError(f"{name}: file is empty (0 bytes)")
        file.seek(0)
        decoded = _decode_soundfile(file, name, max_duration_s)
        if decoded is None:
            file.seek(0)
            decoded = _decode_av(file, name, max_duration_s)
    finally:
        if file is not source:
            file.close()
    mono, rate = decoded
    return _finish(mono, rate, sample_rate, name)


def as_audio(
    samples: np.ndarray | Sequence[float] | torch.Tensor,
    sample_rate: int | None = None,
    target_rate: int = 16000,
) -> np.ndarray:
    """Validate in-memory samples and convert them to mono float32 at ``target_rate``.

    Shape rule: (N,) is mono. In a 2-D array exactly one axis may have at most
    ``MAX_CHANNELS`` (64) entries, and that axis holds the channels, so both soundfile's (N, C)
    and torchaudio's (C, N) work; a shape like (3, 10) or (2, 2) is refused as ambiguous
    rather than guessed (stream chunks this short should be 1-D). Floats are taken as they
    are; int16, int32 and uint8 are PCM and scaled to [-1, 1]; other dtypes (int64 from a list
    of ints, bool, complex) are rejected. The result may share memory with ``samples`` when
    nothing changes.

    Args:
        samples: (N,), (N, C) or (C, N) samples.
        sample_rate: their rate; None means they are already at ``target_rate``.
        target_rate: rate of the returned samples.

    Returns:
        (N',) float32.
    """
    target_rate = _check_rate(target_rate, "target sample rate")
    rate = target_rate if sample_rate is None else _check_rate(sample_rate, "sample rate")
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    try:
        array = np.asarray(samples)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise AudioError(f"samples: not an array of numbers ({e})") from e
    array = _pcm_to_float(array, "samples")
    if array.size == 0:
        raise AudioError("samples: audio is empty (0 samples)")
    if array.ndim == 2:
        channel_axes = [axis for axis, size in enumerate(array.shape) if size <= MAX_CHANNELS]
        if len(channel_axes) != 1:
            raise AudioError(
                f"samples: shape {array.shape} is ambiguous, expected (N, C) or (C, N) with "
                f"1 <= C <= {MAX_CHANNELS} < N"
            )
        array = _to_mono(array, channel_axes[0])
    elif array.ndim != 1:
        raise AudioError(f"samples: expected shape (N,), (N, C) or (C, N), got {array.shape}")
    return _finish(array, rate, target_rate, "samples")


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono audio with soxr's "VHQ" filter.

    Args:
        audio: (N,) float samples.
        from_rate: their rate.
        to_rate: the wanted rate.

    Returns:
        (round(N * to_rate / from_rate),) float32; ``audio`` itself when the rates match.
    """
    from_rate = _check_rate(from_rate, "sample rate")
    to_rate = _check_rate(to_rate, "target sample rate")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"resample expects mono (N,) audio, got shape {audio.shape}")
    if from_rate == to_rate:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality="VHQ")


def _open(source: str | os.PathLike | bytes | BinaryIO) -> tuple[BinaryIO, str]:
    """A seekable binary file for ``source`` and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise AudioError(f"{name}: audio file not found")
        if not os.path.isfile(name):
            raise AudioError(f"{name}: not a regular file")
        try:
            return open(name, "rb"), name
        except OSError as e:
            raise AudioError(f"{name}: cannot open ({e.strerror})") from e
    if not hasattr(source, "read"):
        raise AudioError(f"cannot read audio from a {type(source).__name__}")
    name = str(getattr(source, "name", "<file object>"))
    if isinstance(source, io.TextIOBase):
        raise AudioError(f"{name}: file object is in text mode, open it with 'rb'")
    if not (hasattr(source, "seekable") and source.seekable()):
        return io.BytesIO(source.read()), name  # both decoders need to seek
    return source, name


def _decode_soundfile(
    file: BinaryIO, name: str, max_duration_s: float
) -> tuple[np.ndarray, int] | None:
    """(N,) mono samples and their rate via libsndfile; None when PyAV should try instead."""
    try:
        sound = sf.SoundFile(file)
    except (sf.SoundFileError, RuntimeError, ValueError):
        return None
    with sound:
        # Zero frames: also a streamed WAV whose header says 0 bytes, which FFmpeg reads fully.
        if sound.format == "MP3" or sound.subtype == "OPUS" or sound.frames == 0:
            return None
        rate = _check_rate(sound.samplerate, f"{name}: sample rate")
        _check_channels(sound.channels, name)
        _check_duration(sound.frames / rate, max_duration_s, name)
        claim = _DATA_SIZE_LOG.search(sound.extra_info)
        if claim and int(claim[2]) < int(claim[1]) < _UNKNOWN_SIZE:
            raise AudioError(
                f"{name}: truncated file, header declares {claim[1]} data bytes, "
                f"only {claim[2]} present"
            )
        blocks = []
        try:
            # Fixed-size reads until one comes back empty: libsndfile cannot seek in some codecs
            # (GSM 6.10), where soundfile refuses a read of "all frames".
            while len(block := sound.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)):
                blocks.append(_to_mono(block, channel_axis=1))  # (n, C) -> (n,)
        except (sf.SoundFileError, RuntimeError, ValueError) as e:
            raise AudioError(f"{name}: corrupt or truncated audio ({_reason(e)})") from e
        mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        return mono, rate


def _decode_av(file: BinaryIO, name: str, max_duration_s: float) -> tuple[np.ndarray, int]:
    """(N,) mono samples and their rate via FFmpeg; the first audio stream of the container.

    FFmpeg's header durations can be bitrate estimates (27 s claimed for a 6 s VBR MP3 without
    a Xing header), so the duration cap is enforced on the decoded samples, not the header.
    """
    try:
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise AudioError(f"{name}: no audio stream (format {container.format.name})")
            stream = container.streams.audio[0]
            if stream.codec_context is None:
                raise AudioError(f"{name}: FFmpeg has no decoder for its audio codec")
            rate = _check_rate(stream.codec_context.sample_rate, f"{name}: sample rate")
            # Frames go through FFmpeg's converter to packed float32 (s16 -> x / 2**15 etc., the
            # same scaling as libsndfile) before numpy sees them: PyAV 18.1 finds planar frames'
            # planes by looking for a NULL pointer one past the last channel, and with 8 channels
            # (7.1 AAC) that slot holds garbage, so to_ndarray() segfaults. Packed has one plane.
            to_packed_float = av.AudioResampler(format="flt")
            blocks, frames = [], 0
            for frame in container.decode(stream):
                if frame.sample_rate != rate:
                    raise AudioError(
                        f"{name}: sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)"
                    )
                _check_channels(frame.layout.nb_channels, name)
                for packed in to_packed_float.resample(frame):
                    channels = packed.layout.nb_channels
                    pcm = packed.to_ndarray().reshape(-1, channels)  # (1, n * C) -> (n, C)
                    blocks.append(_to_mono(pcm, channel_axis=1))  # (n,)
                    frames += packed.samples
                _check_duration(frames / rate, max_duration_s, name)
    except AudioError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise AudioError(f"{name}: unreadable, corrupt or truncated audio ({_reason(e)})") from e
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return mono, rate


def _pcm_to_float(array: np.ndarray, name: str) -> np.ndarray:
    """Float samples as float32; integer PCM scaled to [-1, 1] by 1/2**(bits-1)."""
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype in (np.int16, np.int32):
        return array.astype(np.float32) / np.float32(-np.iinfo(array.dtype).min)
    if array.dtype == np.uint8:  # 8-bit WAV convention: unsigned, silence at 128
        return (array.astype(np.float32) - np.float32(128)) / np.float32(128)
    raise AudioError(
        f"{name}: unsupported sample type {array.dtype} (use float, int16, int32 or uint8 PCM)"
    )


def _to_mono(pcm: np.ndarray, channel_axis: int) -> np.ndarray:
    """Average the channels (as NeMo does). NaN/Inf pass through quietly: _finish refuses them."""
    with np.errstate(invalid="ignore", over="ignore"):
        return pcm.mean(axis=channel_axis)


def _finish(mono: np.ndarray, rate: int, target_rate: int, name: str) -> np.ndarray:
    """Check decoded (N,) samples and bring them to ``target_rate``."""
    if len(mono) == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    if not np.isfinite(mono).all():
        raise AudioError(f"{name}: audio contains NaN or Inf samples")
    out = resample(mono, rate, target_rate)
    if len(out) == 0:
        raise AudioError(f"{name}: audio too short ({len(mono)} samples at {rate} Hz)")
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_rate(rate: object, what: str) -> int:
    try:
        value = operator.index(rate)
    except TypeError:
        raise AudioError(f"{what} must be an integer number of Hz, got {rate!r}") from None
    if not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
        raise AudioError(f"{what} {value} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
    return value


def _check_channels(channels: int, name: str) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{name}: {channels} channels (expected 1 to {MAX_CHANNELS})")


def _check_duration(seconds: float, max_duration_s: float, name: str) -> None:
    if seconds > max_duration_s:
        raise AudioError(
            f"{name}: {seconds:.1f} s of audio exceeds max_duration_s={max_duration_s:g} s"
        )


def _reason(error: Exception) -> str:
    """The library's own words, without '<_io.BytesIO object at 0x...>' or '[Errno -541478725]'."""
    return str(getattr(error, "error_string", None) or getattr(error, "strerror", None) or error)
