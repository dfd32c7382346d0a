"""caster.audio: decoding, mono mixing, resampling and every refusal, on audio made here."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from caster import audio
from caster.audio import AudioError, as_audio, load_audio, resample

RATE = 16000


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def _require_encoder(codec: str) -> None:
    try:
        av.codec.Codec(codec, "w")
    except (ValueError, av.FFmpegError):
        pytest.skip(f"PyAV's FFmpeg has no {codec} encoder")


def _write_av(
    path: Path,
    x: np.ndarray,
    rate: int,
    container: str,
    codec: str,
    video: bool = False,
) -> Path:
    """Encode (C, N) float samples with PyAV, skipping the test if an encoder is missing."""
    _require_encoder(codec)
    if video:
        _require_encoder("mpeg4")
    x = np.atleast_2d(x).astype(np.float32)
    layout = {1: "mono", 2: "stereo"}[len(x)]
    with av.open(str(path), "w", format=container) as out:
        # Every stream must exist before the first packet is muxed.
        sound = out.add_stream(codec, rate=rate, layout=layout) if x.size else None
        if video:
            picture = out.add_stream("mpeg4", rate=25)
            picture.width, picture.height, picture.pix_fmt = 32, 32, "yuv420p"
            for i in range(5):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                frame.pts = i
                out.mux(picture.encode(frame))
            out.mux(picture.encode(None))
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(x, format="fltp", layout=layout)
            frame.sample_rate = rate
            out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return path


# --- round trips -------------------------------------------------------------------------------


def test_wav_int16_round_trip_is_exact(tmp_path):
    pcm = (np.random.default_rng(0).uniform(-1, 1, RATE) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", pcm, RATE, subtype="PCM_16")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (RATE,)
    np.testing.assert_array_equal(y, pcm.astype(np.float32) / 32768)


def test_wav_float32_and_flac_round_trips(tmp_path):
    x = _sine(440, RATE, 1.0)
    sf.write(tmp_path / "a.wav", x, RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(tmp_path / "a.wav")), x)
    sf.write(tmp_path / "a.flac", x, RATE, subtype="PCM_16")
    quantised = np.round(x * 32767).astype(np.int16).astype(np.float32) / 32768
    np.testing.assert_allclose(load_audio(tmp_path / "a.flac"), quantised, atol=1 / 32768)


@pytest.mark.parametrize(
    ("name", "fmt", "subtype", "rate"),
    [("a.ogg", "OGG", "VORBIS", RATE), ("a.opus", "OGG", "OPUS", 48000)],
)
def test_lossy_ogg_round_trip(tmp_path, name, fmt, subtype, rate):
    sf.write(tmp_path / name, _sine(1000, rate, 2.0), rate, format=fmt, subtype=subtype)
    y = load_audio(tmp_path / name)
    assert len(y) == 2 * RATE
    assert abs(_peak_hz(y, RATE) - 1000) <= 1
    assert 0.3 < np.abs(y).max() < 0.7


@pytest.mark.parametrize(
    ("name", "container", "codec", "rate"),
    [
        ("a.mp3", "mp3", "libmp3lame", RATE),
        ("a.m4a", "ipod", "aac", RATE),
        ("a.webm", "webm", "libopus", 48000),
    ],
)
def test_pyav_formats_round_trip(tmp_path, name, container, codec, rate):
    path = _write_av(tmp_path / name, _sine(1000, rate, 2.0), rate, container, codec)
    y = load_audio(path)
    # Lossy codecs may keep the encoder's priming and padding (AAC here: 1024 + 768 samples).
    assert abs(len(y) - 2 * RATE) <= 2048
    assert abs(_peak_hz(y, RATE) - 1000) <= 2


def test_mp3_without_xing_header_is_read_whole(tmp_path):
    # libsndfile stops at a bitrate estimate for VBR MP3 without a Xing header (1.7 s of 6 s);
    # the loader must give FFmpeg these files. Loud noise first makes the estimate too short.
    noise = np.random.default_rng(0).standard_normal(RATE).astype(np.float32) * 0.5
    x = np.concatenate([noise, np.zeros(5 * RATE, np.float32)])
    path = tmp_path / "vbr.mp3"
    _require_encoder("libmp3lame")
    with av.open(str(path), "w", format="mp3", options={"write_xing": "0"}) as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono", options={"abr": "1"})
        stream.bit_rate = 64000
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    y = load_audio(path)
    assert 6 * RATE <= len(y) <= 6 * RATE + 2 * 1152  # no Xing: encoder delay is not trimmed


def test_ogg_opus_pre_skip_is_honoured(tmp_path):
    # libsndfile ignores the 312-sample pre-skip of FFmpeg-written Ogg Opus; FFmpeg honours it.
    noise = np.random.default_rng(3).standard_normal(48000)
    x = (0.2 * np.convolve(noise, np.ones(8) / 8, mode="same")).astype(np.float32)  # < 6 kHz
    y = load_audio(_write_av(tmp_path / "a.opus", x, 48000, "ogg", "libopus"), sample_rate=48000)
    lags = np.correlate(y[:24000], x[:24000], mode="full")
    assert int(np.argmax(lags)) - (24000 - 1) == 0


def test_audio_track_of_a_video_container(tmp_path):
    x = _sine(1000, RATE, 2.0)
    y = load_audio(_write_av(tmp_path / "v.mkv", x, RATE, "matroska", "aac", video=True))
    assert abs(len(y) - 2 * RATE) <= 2048
    assert abs(_peak_hz(y, RATE) - 1000) <= 2


# --- channels and rates ------------------------------------------------------------------------


def test_stereo_is_averaged(tmp_path):
    left, right = _sine(440, RATE, 1.0), _sine(1000, RATE, 1.0, amp=0.25)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-7)


def test_both_decoders_agree_on_interleaved_int16(tmp_path):
    # PyAV hands packed s16 as (1, n * C); the loader must de-interleave and scale like libsndfile.
    pcm = (np.random.default_rng(1).uniform(-1, 1, (5000, 3)) * 32767).astype(np.int16)
    sf.write(tmp_path / "s.wav", pcm, RATE, subtype="PCM_16")
    with open(tmp_path / "s.wav", "rb") as f:
        by_sf, rate_sf = audio._decode_soundfile(f, "s.wav", 60.0)
        f.seek(0)
        by_av, rate_av = audio._decode_av(f, "s.wav", 60.0)
    assert rate_sf == rate_av == RATE
    np.testing.assert_array_equal(by_sf, by_av)
    np.testing.assert_allclose(by_sf, pcm.mean(axis=1) / 32768, atol=1e-7)


def test_surround_aac_is_averaged(tmp_path):
    # 7.1 planar audio crashes PyAV's own AudioFrame.to_ndarray (segfault): the loader must not.
    x = np.zeros((8, RATE), np.float32)
    x[:2] = _sine(1000, RATE, 1.0)  # front left and right; the LFE channel would be low-passed
    path = tmp_path / "surround.m4a"
    _require_encoder("aac")
    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=RATE, layout="7.1")
        # Packed input: PyAV's from_ndarray has the same 8-plane bug as to_ndarray.
        frame = av.AudioFrame.from_ndarray(x.T.reshape(1, -1).copy(), format="flt", layout="7.1")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    y = load_audio(path)
    assert abs(len(y) - RATE) <= 2048
    assert abs(_peak_hz(y, RATE) - 1000) <= 2
    assert 0.1 < np.abs(y).max() < 0.15  # 2 of 8 channels carry the 0.5 sine


@pytest.mark.parametrize("rate", [44100, 8000])
def test_resampling_keeps_frequency_and_length(tmp_path, rate):
    sf.write(tmp_path / "r.wav", _sine(1000, rate, 2.0), rate, subtype="FLOAT")
    y = load_audio(tmp_path / "r.wav")
    assert len(y) == 2 * RATE
    assert abs(_peak_hz(y, RATE) - 1000) <= 1
    assert 0.45 < np.abs(y[1000:-1000]).max() < 0.55


def test_resample_function():
    x = _sine(300, 22050, 1.0)
    y = resample(x, 22050, RATE)
    assert y.dtype == np.float32 and len(y) == RATE
    assert abs(_peak_hz(y, RATE) - 300) <= 1
    assert resample(x, 22050, 22050) is x
    with pytest.raises(AudioError, match="mono"):
        resample(np.zeros((2, 100), np.float32), 22050, RATE)
    with pytest.raises(AudioError, match="outside"):
        resample(x, 0, RATE)


# --- sources -----------------------------------------------------------------------------------


def _wav_bytes(x: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


class _Pipe(io.RawIOBase):
    """A readable, non-seekable stream, like stdin or a socket."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._data.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_bytes_and_file_objects(tmp_path):
    x = _sine(440, RATE, 0.5)
    data = _wav_bytes(x, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(data), x)
    np.testing.assert_array_equal(load_audio(bytearray(data)), x)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), x)
    np.testing.assert_array_equal(load_audio(_Pipe(data)), x)
    (tmp_path / "a.wav").write_bytes(data)
    with open(tmp_path / "a.wav", "rb") as f:
        f.seek(100)  # a seekable file is read whole, wherever it stands
        np.testing.assert_array_equal(load_audio(f), x)
        assert not f.closed  # the caller's file stays open
    mp3 = _write_av(tmp_path / "a.mp3", _sine(1000, RATE, 1.0), RATE, "mp3", "libmp3lame")
    assert abs(len(load_audio(mp3.read_bytes())) - RATE) <= 1152


def test_bad_sources(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path)
    (tmp_path / "a.wav").write_bytes(_wav_bytes(_sine(440, RATE, 0.1)))
    with open(tmp_path / "a.wav") as f, pytest.raises(AudioError, match="text mode"):
        load_audio(f)
    with pytest.raises(AudioError, match="cannot read audio from a int"):
        load_audio(3)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"this is a text file, not audio\n" * 20,
        np.random.default_rng(2).bytes(20000),
        b"RIFF\x24\x00\x00\x00WAVEfmt ",  # a WAV cut inside its header
    ],
    ids=["empty-file", "text", "random-bytes", "header-only"],
)
def test_non_audio_files(tmp_path, content):
    path = tmp_path / "fake.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=r"fake\.wav"):
        load_audio(path)
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(content)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_16"), ("AIFF", "PCM_16"), ("AU", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")],
)
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_files(fmt, subtype, keep):
    x = _sine(440, RATE, 2.0)
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format=fmt, subtype=subtype)
    data = buf.getvalue()
    assert len(load_audio(data)) == len(x)
    with pytest.raises(AudioError, match="truncated"):
        load_audio(data[: int(len(data) * keep)])


def test_streamed_wav_sizes_are_not_truncation():
    # Writers that cannot seek back leave 0xFFFFFFFF, 0x7FFFF000 or 0 as the data size.
    x = _sine(440, RATE, 1.0)
    wav = bytearray(_wav_bytes(x, subtype="FLOAT"))
    at = wav.find(b"data") + 4
    for size in (0xFFFFFFFF, 0x7FFFF000, 0):
        wav[at : at + 4] = struct.pack("<I", size)
        np.testing.assert_array_equal(load_audio(bytes(wav)), x)


def test_empty_and_non_finite_audio(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        load_audio(_wav_bytes(np.zeros(0, np.float32)))
    for bad in (np.nan, np.inf):
        x = _sine(440, RATE, 0.1)
        x[100] = bad
        with pytest.raises(AudioError, match="NaN or Inf"):
            load_audio(_wav_bytes(x, subtype="FLOAT"))


@pytest.mark.parametrize("rate", [500, 999, 400_000])
def test_absurd_file_sample_rates(rate):
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is outside"):
        load_audio(_wav_bytes(np.zeros(2000, np.float32), rate=rate))


def test_zero_sample_rate_in_header():
    wav = bytearray(_wav_bytes(np.zeros(2000, np.float32)))
    at = wav.find(b"fmt ") + 12
    wav[at : at + 4] = struct.pack("<I", 0)
    with pytest.raises(AudioError, match="<bytes>: unreadable"):  # both libraries refuse it
        load_audio(bytes(wav))


@pytest.mark.parametrize("rate", [0, -16000, 500, 1_000_000, 16000.5, "16k"])
def test_absurd_target_rates(rate):
    with pytest.raises(AudioError, match="target sample rate"):
        load_audio(_wav_bytes(np.zeros(2000, np.float32)), sample_rate=rate)


def test_flac_header_claiming_weeks_is_refused_before_decoding():
    flac = io.BytesIO()
    sf.write(flac, _sine(440, RATE, 0.5), RATE, format="FLAC")
    data = bytearray(flac.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO's 36-bit total-samples field: low nibble of byte 13, bytes 14-17 (after 8).
    data[21] |= 0x0F
    data[22:26] = b"\xff\xff\xff\xff"  # 2**36 - 1 samples: 49.7 days at 16 kHz
    with pytest.raises(AudioError, match="exceeds max_duration_s"):
        load_audio(bytes(data))


def test_duration_cap_is_configurable(tmp_path):
    x = _sine(440, RATE, 3.0)
    with pytest.raises(AudioError, match="exceeds max_duration_s=1"):
        load_audio(_wav_bytes(x), max_duration_s=1)
    assert len(load_audio(_wav_bytes(x), max_duration_s=3)) == len(x)
    mp3 = _write_av(tmp_path / "a.mp3", x, RATE, "mp3", "libmp3lame")
    with pytest.raises(AudioError, match="exceeds max_duration_s=1"):
        load_audio(mp3, max_duration_s=1)


def test_too_many_channels():
    with pytest.raises(AudioError, match="65 channels"):
        load_audio(_wav_bytes(np.zeros((100, 65), np.float32)))


def test_video_without_audio(tmp_path):
    path = _write_av(tmp_path / "v.mkv", np.zeros(0), RATE, "matroska", "aac", video=True)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(path)


# --- as_audio ----------------------------------------------------------------------------------


def test_as_audio_dtypes():
    x = np.array([0.0, 0.5, -0.25], np.float64)
    y = as_audio(x)
    assert y.dtype == np.float32 and y.shape == (3,)
    np.testing.assert_array_equal(y, x.astype(np.float32))
    np.testing.assert_array_equal(
        as_audio(np.array([-32768, 0, 16384, 32767], np.int16)),
        np.array([-1.0, 0.0, 0.5, 32767 / 32768], np.float32),
    )
    np.testing.assert_array_equal(
        as_audio(np.array([-(2**31), 2**30], np.int32)), np.array([-1.0, 0.5], np.float32)
    )
    np.testing.assert_array_equal(
        as_audio(np.array([0, 128, 192], np.uint8)), np.array([-1.0, 0.0, 0.5], np.float32)
    )
    np.testing.assert_array_equal(as_audio([0.0, 0.5, -0.25]), y)
    np.testing.assert_array_equal(as_audio(torch.tensor([0.0, 0.5, -0.25])), y)
    np.testing.assert_array_equal(as_audio(torch.tensor([0.0, 0.5, -0.25]).bfloat16()), y)
    np.testing.assert_array_equal(
        as_audio(torch.tensor([-32768, 16384], dtype=torch.int16)), np.array([-1.0, 0.5])
    )


def test_as_audio_channel_layouts():
    left, right = _sine(440, RATE, 0.1), _sine(880, RATE, 0.1)
    mono = (left + right) / 2
    np.testing.assert_allclose(as_audio(np.stack([left, right], axis=1)), mono, atol=1e-7)
    np.testing.assert_allclose(as_audio(np.stack([left, right])), mono, atol=1e-7)
    np.testing.assert_allclose(as_audio(torch.from_numpy(np.stack([left, right]))), mono, atol=1e-7)
    np.testing.assert_array_equal(as_audio(left[None]), left)


def test_as_audio_resamples():
    y = as_audio(_sine(1000, 44100, 1.0), sample_rate=44100)
    assert len(y) == RATE and abs(_peak_hz(y, RATE) - 1000) <= 1
    assert len(as_audio(_sine(1000, RATE, 1.0), sample_rate=RATE, target_rate=8000)) == 8000


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((0, 2), np.float32), "empty"),
        (np.ones(1), "too short"),
        (np.array([0.0, np.nan]), "NaN or Inf"),
        (np.array([0.0, -np.inf]), "NaN or Inf"),
        (np.zeros((2, 2, 100)), "expected shape"),
        (np.float32(0.5), "expected shape"),
        (np.zeros((4, 4)), "ambiguous"),
        (np.zeros((3, 10)), "ambiguous"),
        (np.zeros((65, 1000)), "ambiguous"),
        ([0, 1, 0], "int64"),
        (np.array([True, False]), "bool"),
        (np.zeros(4, np.complex64), "complex64"),
        (["a", "b"], "<U1"),
        ([[0.0, 1.0], [0.0]], "not an array of numbers"),
    ],
)
def test_as_audio_errors(samples, match):
    with pytest.raises(AudioError, match=match):
        as_audio(samples, sample_rate=48000)


@pytest.mark.parametrize("rate", [0, 999, 384_001, 16000.0, None])
def test_as_audio_bad_rates(rate):
    with pytest.raises(AudioError, match="sample rate"):
        if rate is None:
            as_audio(np.zeros(100), target_rate=500)
        else:
            as_audio(np.zeros(100), sample_rate=rate)
