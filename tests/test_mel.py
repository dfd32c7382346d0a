"""Log-mel front end: NeMo parity, filter bank, streaming == offline, batching."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
import yaml
from conftest import EN_MODEL, PROMPT_MODEL, nemo_path

from caster.config import ConfigError, MelConfig, ModelConfig
from caster.mel import (
    FilterbankFeatures,
    MelInputError,
    MelState,
    Preprocessor,
    mel_filterbank,
    mel_flush,
    mel_step,
    window,
)

MODELS = [EN_MODEL, PROMPT_MODEL]
WAVES = ["wave_a", "wave_b"]
# A front end unlike NeMo's: other hop/window/FFT sizes, a band limit, no pre-emphasis.
ODD_CFG = MelConfig(
    sample_rate=8000,
    win_length=200,
    hop_length=80,
    n_fft=256,
    n_mels=40,
    preemph=None,
    lowfreq=50.0,
    highfreq=3800.0,
)
# hop > n_fft // 2: a frame's samples arrive before the stream is known to make it valid.
WIDE_HOP_CFG = MelConfig(win_length=256, hop_length=200, n_fft=256, n_mels=32)


def _nemo_member(model: str, name: str) -> bytes:
    with tarfile.open(nemo_path(model)) as tar:
        member = tar.extractfile(name)
        assert member is not None, f"{name} missing from {model}.nemo"
        return member.read()


def _nemo_mel_config(model: str) -> MelConfig:
    return ModelConfig.from_nemo(yaml.safe_load(_nemo_member(model, "./model_config.yaml"))).mel


def _nemo_preprocessor_buffers(model: str) -> dict[str, torch.Tensor]:
    blob = _nemo_member(model, "./model_weights.ckpt")
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    prefix = "preprocessor."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _offline(features: FilterbankFeatures, audio: torch.Tensor) -> torch.Tensor:
    """The valid offline frames of one signal, (n_mels, N // hop)."""
    mel, mel_len = features(audio[None], torch.tensor([audio.numel()]))
    return mel[0, :, : int(mel_len[0])]


def _stream(
    features: FilterbankFeatures, audio: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, int]:
    """All frames of `audio` fed in pieces of `sizes`; also the largest pending buffer."""
    assert sum(sizes) == audio.numel()
    state = MelState.initial(features.cfg)
    pieces, start, most_pending = [], 0, 0
    for size in sizes:
        frames, state = mel_step(features, audio[start : start + size], state)
        pieces.append(frames)
        start += size
        most_pending = max(most_pending, state.pending.numel())
    pieces.append(mel_flush(features, state))
    return torch.cat(pieces, dim=1), most_pending


def _random_sizes(n: int, seed: int, largest: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    while n > 0:
        size = min(int(rng.integers(0, largest + 1)), n)  # empty pieces included
        sizes.append(size)
        n -= size
    return sizes


def _signal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, generator=g)


# --- filter bank and window ---------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_filterbank_and_window_equal_checkpoint_buffers(model: str) -> None:
    cfg = _nemo_mel_config(model)
    buffers = _nemo_preprocessor_buffers(model)
    assert set(buffers) == {"featurizer.window", "featurizer.fb"}
    assert torch.equal(mel_filterbank(cfg), buffers["featurizer.fb"][0])
    assert torch.equal(window(cfg), buffers["featurizer.window"])
    # The module's buffers carry NeMo's names, so the checkpoint loads strictly.
    pre = Preprocessor(cfg)
    pre.load_state_dict(buffers, strict=True)
    assert pre.featurizer.fb.shape == (1, cfg.n_mels, cfg.n_fft // 2 + 1)


def test_filterbank_matches_librosa_for_other_settings() -> None:
    # Reference values: librosa 0.11.0 `filters.mel(..., htk=False)`, printed with repr().
    fb = mel_filterbank(MelConfig(n_fft=400, n_mels=80, lowfreq=20.0, highfreq=7600.0))
    assert fb.shape == (80, 201)
    assert fb.double().sum().item() == pytest.approx(2.000132974862254, rel=1e-12)
    assert torch.equal(fb[0, 1:3], torch.tensor([0.01511284988373518, 0.009639355354011059]))
    assert torch.count_nonzero(fb[0]) == 2
    last = torch.tensor([0.0003967641678173095, 0.0036383329425007105, 0.0005203684559091926])
    assert torch.equal(fb[79, [177, 183, 189]], last)
    assert torch.count_nonzero(fb[79]) == 13

    plain = mel_filterbank(MelConfig(sample_rate=8000, n_fft=256, n_mels=40, mel_norm=None))
    assert plain.double().sum().item() == pytest.approx(123.36681811138988, rel=1e-12)
    expected = torch.tensor([0.546549916267395, 0.90690016746521, 0.36035028100013733])
    assert torch.equal(plain[0, 1:4], expected)


def test_window_is_symmetric_hann() -> None:
    w = window(MelConfig())
    assert w.shape == (400,)
    # periodic=True would end on a non-zero sample and peak between samples 199 and 200.
    assert w[0] == 0 and w[-1] == 0
    torch.testing.assert_close(w, torch.from_numpy(np.hanning(400)).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        MelConfig(n_fft=511),
        MelConfig(win_length=600),
        MelConfig(hop_length=0),
        MelConfig(lowfreq=9000.0),
        MelConfig(mel_norm="l2"),
    ],
)
def test_unsupported_config_is_rejected(cfg: MelConfig) -> None:
    with pytest.raises(ConfigError):
        FilterbankFeatures(cfg)


# --- offline parity with NeMo ---------------------------------------------------------


@pytest.mark.parametrize("wave", WAVES)
@pytest.mark.parametrize("model", MODELS)
def test_features_match_nemo(model: str, wave: str, oracle: dict[str, np.ndarray]) -> None:
    pre = Preprocessor(_nemo_mel_config(model)).eval()
    pre.load_state_dict(_nemo_preprocessor_buffers(model))
    audio = torch.from_numpy(oracle[f"inputs/{wave}"])[None]
    ref = torch.from_numpy(oracle[f"{model}/{wave}/features"])
    ref_len = int(oracle[f"{model}/{wave}/features_len"][0])

    mel, mel_len = pre(audio, torch.tensor([audio.size(1)]))

    assert mel.shape == (1, *ref.shape)
    assert mel_len.tolist() == [ref_len]
    # The masked tail (the extra center=True frame) is exactly pad_value, as in NeMo.
    assert torch.equal(mel[0, :, ref_len:], ref[:, ref_len:])
    assert torch.all(ref[:, ref_len:] == 0.0)
    # Valid frames: NeMo's float32 FFT ran on another CPU, whose MKL kernels round
    # differently. That noise is about 1e-6 of each frame's strongest mel band (seen:
    # 9.5e-7) and log() magnifies it in bands 50+ dB quieter, so allow 1e-4 plus that
    # noise (with 10x margin) divided by the band's own energy.
    ours, theirs = mel[0, :, :ref_len].double(), ref[:, :ref_len].double()
    energy = theirs.exp()  # (n_mels, T)
    peak = energy.amax(dim=0, keepdim=True)  # (1, T)
    allowed = 1e-4 + 1e-5 * peak / energy
    excess = (ours - theirs).abs() - allowed
    assert excess.max() <= 0, f"worst excess over tolerance {excess.max().item():.3g}"
    # The noise term matters only in quiet bands: elsewhere the match is 1e-4 in the log.
    loud = energy > 1e-4 * peak
    assert (ours - theirs)[loud].abs().max() <= 1e-4


def test_preprocessor_state_dict_keys_mirror_nemo() -> None:
    assert set(Preprocessor(MelConfig()).state_dict()) == {"featurizer.window", "featurizer.fb"}


# --- batching -------------------------------------------------------------------------


def test_batch_items_equal_each_alone() -> None:
    features = FilterbankFeatures(MelConfig())
    lengths = [16000, 0, 159, 12345, 160, 513]
    signals = [_signal(n, seed=i) for i, n in enumerate(lengths)]
    batch = torch.randn(len(lengths), max(lengths))  # padding is noise: must be ignored
    for i, s in enumerate(signals):
        batch[i, : s.numel()] = s
    mel, mel_len = features(batch, torch.tensor(lengths))

    assert mel.shape == (len(lengths), 128, max(lengths) // 160 + 1)
    assert mel_len.tolist() == [n // 160 for n in lengths]
    for i, s in enumerate(signals):
        valid = int(mel_len[i])
        torch.testing.assert_close(mel[i, :, :valid], _offline(features, s), atol=1e-5, rtol=0)
        assert torch.all(mel[i, :, valid:] == 0.0)


def test_bad_offline_inputs_are_rejected() -> None:
    features = FilterbankFeatures(MelConfig())
    audio = torch.zeros(2, 1000)
    with pytest.raises(MelInputError):
        features(audio.to(torch.int16), torch.tensor([1000, 1000]))
    with pytest.raises(MelInputError):
        features(audio[0], torch.tensor([1000]))
    with pytest.raises(MelInputError):
        features(audio, torch.tensor([1000.0, 1000.0]))
    with pytest.raises(MelInputError):
        features(audio, torch.tensor([1000]))
    with pytest.raises(MelInputError):
        features(audio, torch.tensor([1001, 10]))
    with pytest.raises(MelInputError):
        features(audio, torch.tensor([-1, 10]))


# --- streaming == offline ---------------------------------------------------------------


@pytest.mark.parametrize(
    "n",
    [0, 1, 100, 159, 160, 161, 255, 256, 257, 300, 319, 320, 321, 511, 512, 513, 1000, 1600, 7777],
)
def test_streaming_equals_offline_for_any_split(n: int) -> None:
    features = FilterbankFeatures(MelConfig())
    audio = _signal(n, seed=n)
    ref = _offline(features, audio)
    assert ref.shape == (128, n // 160)
    patterns = [[n], _random_sizes(n, seed=1, largest=50), _random_sizes(n, seed=2, largest=700)]
    if n <= 1000:
        patterns.append([1] * n)
    for sizes in patterns:
        out, most_pending = _stream(features, audio, sizes)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert most_pending < 512 + 160


@pytest.mark.parametrize("wave", WAVES)
def test_streaming_real_audio_equals_offline(wave: str, oracle: dict[str, np.ndarray]) -> None:
    features = FilterbankFeatures(MelConfig())
    audio = torch.from_numpy(oracle[f"inputs/{wave}"])
    ref = _offline(features, audio)
    n = audio.numel()
    for sizes in ([160] * (n // 160) + [n % 160], [1280] * (n // 1280) + [n % 1280]):
        out, _ = _stream(features, audio, sizes)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_long_stream_keeps_bounded_state() -> None:
    features = FilterbankFeatures(MelConfig())
    audio = _signal(30 * 16000 + 77, seed=30)
    ref = _offline(features, audio)
    out, most_pending = _stream(features, audio, _random_sizes(audio.numel(), 3, largest=4000))
    assert out.shape == (128, 3000)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert most_pending < 512 + 160


@pytest.mark.parametrize("cfg", [ODD_CFG, WIDE_HOP_CFG], ids=["odd_sizes", "wide_hop"])
def test_streaming_equals_offline_for_other_configs(cfg: MelConfig) -> None:
    features = FilterbankFeatures(cfg)
    for n in [0, cfg.hop_length - 1, cfg.n_fft // 2, cfg.n_fft + 3, 5003]:
        audio = _signal(n, seed=n)
        ref = _offline(features, audio)
        for sizes in ([n], _random_sizes(n, seed=n, largest=3 * cfg.hop_length)):
            out, most_pending = _stream(features, audio, sizes)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            assert most_pending < cfg.n_fft + cfg.hop_length


@pytest.mark.parametrize("cfg", [MelConfig(), WIDE_HOP_CFG], ids=["nemo", "wide_hop"])
def test_frames_are_emitted_as_soon_as_computable(cfg: MelConfig) -> None:
    # Frame k needs samples up to hop*k + n_fft/2 - 1 (center=True) and a stream of at
    # least hop*(k+1) samples (to be valid offline); it must come out on that sample.
    features = FilterbankFeatures(cfg)
    audio = _signal(3000)
    state, k = MelState.initial(cfg), 0
    for seen in range(1, audio.numel() + 1):
        frames, state = mel_step(features, audio[seen - 1 : seen], state)
        if frames.size(1):
            assert frames.size(1) == 1
            assert seen == max(cfg.hop_length * k + cfg.n_fft // 2, cfg.hop_length * (k + 1))
            k += 1
    assert k + mel_flush(features, state).size(1) == 3000 // cfg.hop_length


def test_streaming_short_inputs() -> None:
    features = FilterbankFeatures(MelConfig())
    state = MelState.initial(features.cfg)
    assert mel_flush(features, state).shape == (128, 0)  # no audio at all
    frames, state = mel_step(features, torch.zeros(0), state)
    assert frames.shape == (128, 0) and state.samples_seen == 0
    frames, state = mel_step(features, _signal(255), state)  # < n_fft / 2: nothing yet
    assert frames.shape == (128, 0)
    assert mel_flush(features, state).shape == (128, 1)  # 255 // 160 valid frames


def test_step_does_not_modify_its_inputs() -> None:
    features = FilterbankFeatures(MelConfig())
    audio = _signal(1000)
    _, state = mel_step(features, audio[:700], MelState.initial(features.cfg))
    pending, last = state.pending.clone(), state.last_sample.clone()
    buffers = {k: v.clone() for k, v in features.state_dict().items()}
    first, _ = mel_step(features, audio[700:], state)
    again, _ = mel_step(features, audio[700:], state)  # the same state can be replayed
    assert torch.equal(first, again)
    assert torch.equal(state.pending, pending) and torch.equal(state.last_sample, last)
    assert all(torch.equal(v, buffers[k]) for k, v in features.state_dict().items())


def test_bad_stream_input_is_rejected() -> None:
    features = FilterbankFeatures(MelConfig())
    state = MelState.initial(features.cfg)
    with pytest.raises(MelInputError):
        mel_step(features, torch.zeros(1, 160), state)
    with pytest.raises(MelInputError):
        mel_step(features, torch.zeros(160, dtype=torch.int16), state)
