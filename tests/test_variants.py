"""caster against NeMo on architecture variants of the cache-aware FastConformer-RNNT family.

The tiny models and NeMo's outputs in tests/data/nemo_variants (made by its
make_variants.py, see its README.md) cover what the two main fixtures do not:
conv-module `batch_norm` with trained running statistics, 80 mel bins, other
`att_context_size` lists (the first entry not the largest lookahead; left
contexts that differ), vocabularies of 200, 256 and 500 pieces, conv kernels
5 and 7, and subsampling x4 (40 ms encoder frames).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import DATA

import caster
from caster.decoding import greedy_decode, initial_decoder_state
from caster.encoder import EncoderCache
from caster.engine import Engine
from caster.results import Lexicon
from caster.streaming import Stream
from caster.transcribe import transcribe_many

VARIANTS = DATA / "nemo_variants"
NAMES = ["variant_bn80", "variant_prompt_k5", "variant_sub4"]
WAVES = ["wave_a", "wave_b"]
PROMPT_LANGUAGES = ["en-US", "de-DE", "fr-FR", "auto"]
TOL = 1e-4


@functools.cache
def _oracle() -> tuple[dict[str, np.ndarray], dict]:
    z = np.load(VARIANTS / "oracle.npz")
    return {k: z[k] for k in z.files}, json.loads((VARIANTS / "oracle.json").read_text())


@pytest.fixture(scope="module")
def oracle() -> dict[str, np.ndarray]:
    return _oracle()[0]


@pytest.fixture(scope="module", params=NAMES)
def model(request) -> caster.Model:
    m = caster.load(VARIANTS / f"{request.param}.nemo")
    m.name = request.param
    return m


def languages(model: caster.Model) -> list[str | None]:
    return PROMPT_LANGUAGES if model.config.prompt else [None]


def tag(context: tuple[int, int]) -> str:
    return f"ctx{context[0]}_{context[1]}"


def nemo_features(oracle, model, wave: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's features (1, F, n//160 + 1) and valid length (1,); shared by equal front ends."""
    key = f"features/mel{model.config.mel.n_mels}/{wave}"
    return torch.from_numpy(oracle[key])[None], torch.from_numpy(oracle[f"{key}_len"])


def max_err(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float(np.abs(a.numpy() - b).max())


def test_config_reads_the_variant(model):
    nemo = _oracle()[1]["models"][model.name]
    enc, cfg = nemo["encoder"], model.config
    assert cfg.mel.n_mels == nemo["n_mels"] == cfg.encoder.feat_in
    assert cfg.decoder.vocab_size == nemo["vocab_size"] == model.tokenizer.vocab_size
    assert [list(c) for c in cfg.encoder.att_context_size] == enc["att_context_size"]
    for field in ("subsampling_factor", "conv_kernel_size", "conv_norm_type", "xscaling"):
        assert getattr(cfg.encoder, field) == enc[field], field
    assert cfg.encoder.use_bias == enc["use_bias"]
    assert cfg.encoder_frame_ms == 10 * enc["subsampling_factor"]
    norm = model.net.encoder.layers[0].conv.batch_norm
    if enc["conv_norm_type"] == "batch_norm":
        # Trained running statistics, far from the (0, 1) a model ignoring them would use.
        assert isinstance(norm, torch.nn.BatchNorm1d)
        assert float((norm.running_var - 1).abs().min()) > 0.05
        assert float(norm.running_mean.abs().max()) > 0.01
    else:
        assert isinstance(norm, torch.nn.LayerNorm)


@torch.inference_mode()
@pytest.mark.parametrize("wave", WAVES)
def test_features_match_nemo(model, oracle, wave):
    ref, ref_len = nemo_features(oracle, model, wave)
    audio = torch.from_numpy(oracle[f"inputs/{wave}"])[None]
    mel, mel_len = model.net.preprocessor(audio, torch.tensor([audio.shape[1]]))
    assert mel.shape == ref.shape
    assert mel_len.tolist() == ref_len.tolist()
    n = int(ref_len[0])
    assert torch.equal(mel[0, :, n:], ref[0, :, n:])  # the masked tail is pad_value
    # Tolerance as in tests/test_mel.py: float32 FFT rounding differs between CPUs
    # (~1e-6 of a frame's loudest band), which log() magnifies in very quiet bands.
    ours, theirs = mel[0, :, :n].double(), ref[0, :, :n].double()
    energy = theirs.exp()
    peak = energy.amax(dim=0, keepdim=True)
    assert ((ours - theirs).abs() - (1e-4 + 1e-5 * peak / energy)).max() <= 0
    assert (ours - theirs)[energy > 1e-4 * peak].abs().max() <= 1e-4


@torch.inference_mode()
def test_offline_encoder_matches_nemo(model, oracle):
    """Every context, from NeMo's features and from caster's own."""
    for wave in WAVES:
        nemo_mel, nemo_len = nemo_features(oracle, model, wave)
        audio = torch.from_numpy(oracle[f"inputs/{wave}"])[None]
        own_mel, own_len = model.net.preprocessor(audio, torch.tensor([audio.shape[1]]))
        for context in model.config.encoder.att_context_size:
            ref = oracle[f"{model.name}/{wave}/{tag(context)}/offline/encoded"]
            for mel, mel_len in ((nemo_mel, nemo_len), (own_mel, own_len)):
                out, out_len = model.net.encoder(mel, mel_len, context)
                n = int(out_len[0])
                assert n == ref.shape[0]
                assert max_err(out[0, :n], ref) <= TOL, (wave, context)


@torch.inference_mode()
def test_prompt_and_greedy_tokens_match_nemo(model, oracle):
    n_tokens = 0
    for wave in WAVES:
        mel, mel_len = nemo_features(oracle, model, wave)
        for context in model.config.encoder.att_context_size:
            encoded, encoded_len = model.net.encoder(mel, mel_len, context)
            encoded = encoded[:, : int(encoded_len[0])]  # NeMo's arrays hold valid frames only
            for language in languages(model):
                base = f"{model.name}/{wave}/{tag(context)}/offline"
                base += f"/{language}" if language else ""
                prompt = None if language is None else torch.tensor([model.prompt_index(language)])
                prompted = model.net.apply_prompt(encoded, prompt)
                if language:
                    nemo_enc = oracle[f"{base}/encoded_after_prompt"]
                    assert max_err(prompted[0], nemo_enc) <= TOL
                else:
                    nemo_enc = oracle[f"{base}/encoded"]
                tokens = oracle[f"{base}/tokens"].tolist()
                state = initial_decoder_state(model.net, 1)
                hyps, _ = greedy_decode(model.net, prompted, encoded_len, state)
                assert hyps[0].token_ids == tokens, (wave, context, language)
                assert hyps[0].frames == oracle[f"{base}/token_frames"].tolist()
                # The decoder alone, fed NeMo's own encoder output, agrees too.
                hyps, _ = greedy_decode(
                    model.net, torch.from_numpy(nemo_enc)[None], encoded_len, state
                )
                assert hyps[0].token_ids == tokens
                n_tokens += len(tokens)
    assert n_tokens > 0  # the fixture is not all blanks


@torch.inference_mode()
def test_teacher_forced_prediction_and_joint_match_nemo(model, oracle):
    base = f"{model.name}/teacher_forced"
    targets = torch.from_numpy(oracle[f"{base}/targets"])[None]
    blank = torch.tensor([[model.config.decoder.blank_id]])
    dec_out, _ = model.net.decoder(torch.cat([blank, targets], dim=1))  # SOS step first
    assert max_err(dec_out[0], oracle[f"{base}/decoder_out"]) <= TOL
    ref = oracle[f"{base}/joint_logprobs"]  # (T, U+1, V+1)
    mel, mel_len = nemo_features(oracle, model, "wave_a")
    encoded, _ = model.net.encoder(mel, mel_len)
    prompt = None if model.config.prompt is None else torch.tensor([model.prompt_index("en-US")])
    enc = model.net.joint.enc(model.net.apply_prompt(encoded, prompt)[:, : ref.shape[0]])
    logits = model.net.joint(enc, model.net.joint.pred(dec_out))
    assert logits.shape[-1] == model.config.decoder.vocab_size + 1
    assert max_err(torch.log_softmax(logits, -1)[0], ref) <= TOL  # NeMo: log-softmax on CPU


def replay_nemo_stream(model, oracle, wave: str, context: tuple[int, int], schedule: np.ndarray):
    """caster's encoder step on exactly the mel frames NeMo's streaming buffer fed each step.

    Returns the valid outputs per step and the cache after each step. NeMo's
    zero-filled pre-encode cache (its first chunk at lookahead 0 is one frame) is
    reproduced by handing the step that zero-prefixed history.
    """
    mel = nemo_features(oracle, model, wave)[0][0]
    encoder = model.net.encoder
    cache = encoder.initial_cache(1, context)
    outputs, caches = [], []
    for start, n_cache, n_zero, n_new, _ in schedule.tolist():
        if n_zero:
            history = torch.cat(
                [torch.zeros(mel.shape[0], n_zero), mel[:, start - n_cache : start]], 1
            )
            cache = EncoderCache(
                history[None],
                torch.tensor([n_zero + n_cache]),
                cache.attention,
                cache.attention_len,
                cache.conv,
            )
        chunk = mel[:, start : start + n_new][None]
        out, out_len, cache = encoder.step(chunk, torch.tensor([n_new]), cache, context)
        outputs.append(out[:, : int(out_len[0])])
        caches.append(cache)
    return outputs, caches


@torch.inference_mode()
def test_streaming_steps_match_nemo_chunk_by_chunk(model, oracle):
    net = model.net
    for wave in WAVES:
        for context in model.config.encoder.att_context_size:
            base = f"{model.name}/{wave}/{tag(context)}/stream"
            first = base + (f"/{languages(model)[0]}" if model.config.prompt else "")
            schedule = oracle[f"{first}/chunk_schedule"]
            outputs, caches = replay_nemo_stream(model, oracle, wave, context, schedule)
            encoded = torch.cat(outputs, dim=1)[0]
            assert max_err(encoded, oracle[f"{first}/encoded_concat"]) <= TOL, (wave, context)
            lengths = [o.shape[1] for o in outputs]
            assert lengths == oracle[f"{first}/encoded_len"].tolist()
            assert [int(c.attention_len[0]) for c in caches] == (
                oracle[f"{first}/cache_last_channel_len"].tolist()
            )
            if f"{first}/cache_steps_stored" in oracle:
                for step in oracle[f"{first}/cache_steps_stored"].tolist():
                    got = caches[step]
                    ref = oracle[f"{first}/cache_last_channel/step{step}"]
                    assert max_err(got.attention[0], ref) <= TOL
                    ref = oracle[f"{first}/cache_last_time/step{step}"]
                    assert max_err(got.conv[0], ref) <= TOL
            for language in languages(model):
                key = base + (f"/{language}" if language else "")
                # The prompt is the same for every step: the steps' schedule must be too.
                assert np.array_equal(oracle[f"{key}/chunk_schedule"], schedule)
                prompt = None if language is None else torch.tensor([model.prompt_index(language)])
                state, tokens = initial_decoder_state(net, 1), []
                for out in outputs:
                    hyps, state = greedy_decode(
                        net, net.apply_prompt(out, prompt), torch.tensor([out.shape[1]]), state
                    )
                    tokens += hyps[0].token_ids
                assert tokens == oracle[f"{key}/tokens"].tolist(), (wave, context, language)


def feed_in_pieces(stream: Stream, audio: np.ndarray, rng: np.random.Generator):
    i = 0
    while i < len(audio):
        n = int(rng.integers(1, 3000))
        stream.feed(audio[i : i + n])
        i += n
    return stream.finish()


@pytest.mark.parametrize("wave", WAVES)
def test_stream_and_transcribe_give_nemo_tokens(model, oracle, wave):
    """Every trained context, reached through its chunk_ms: caster's offline transcribe and
    its stream fed random pieces both give NeMo's offline tokens."""
    audio = oracle[f"inputs/{wave}"]
    rng = np.random.default_rng(11)
    cfg = model.config
    for context in cfg.encoder.att_context_size:
        chunk_ms = (context[1] + 1) * cfg.encoder_frame_ms
        assert cfg.context_for_chunk_ms(chunk_ms) == context
        for language in languages(model):
            base = f"{model.name}/{wave}/{tag(context)}/offline"
            ref = oracle[base + (f"/{language}" if language else "") + "/tokens"].tolist()
            offline = model.transcribe(audio, language=language, chunk_ms=chunk_ms)
            assert offline.token_ids == ref, (context, language)
            streamed = feed_in_pieces(model.stream(language, chunk_ms), audio, rng)
            assert streamed.token_ids == ref, (context, language)
            assert streamed.token_frames == offline.token_frames
            assert streamed.text == offline.text
    default = model.transcribe(audio, language=languages(model)[0])
    context = cfg.default_context
    base = f"{model.name}/{wave}/{tag(context)}/offline"
    suffix = f"/{languages(model)[0]}" if cfg.prompt else ""
    assert default.token_ids == oracle[f"{base}{suffix}/tokens"].tolist()


def test_untrained_chunk_sizes_stream_like_transcribe(model, oracle):
    """Chunk sizes outside the trained list (default left context): stream == transcribe."""
    cfg = model.config
    trained = {(r + 1) * cfg.encoder_frame_ms for _, r in cfg.encoder.att_context_size}
    extra = [ms for ms in cfg.supported_chunk_ms() if ms not in trained]
    assert extra, "every variant offers at least one standard chunk size it was not trained on"
    audio = oracle["inputs/wave_b"]
    rng = np.random.default_rng(5)
    language = languages(model)[-1]
    for chunk_ms in extra:
        assert cfg.context_for_chunk_ms(chunk_ms)[0] == cfg.default_context[0]
        offline = model.transcribe(audio, language=language, chunk_ms=chunk_ms)
        streamed = feed_in_pieces(model.stream(language, chunk_ms), audio, rng)
        assert streamed.token_ids == offline.token_ids, chunk_ms
        assert streamed.token_frames == offline.token_frames


def test_sub4_word_and_segment_times_use_40_ms_frames(oracle):
    """Subsampling x4: a token on encoder frame f starts at f x 40 ms, in files and streams."""
    model = caster.load(VARIANTS / "variant_sub4.nemo")
    assert model.config.encoder_frame_ms == 40
    audio = oracle["inputs/wave_a"]
    duration = len(audio) / 16000
    (result,) = transcribe_many(model, [audio])
    engine = Engine(model)
    handle = engine.open(chunk_ms=80)
    handle.feed(audio)
    engine.end(handle)
    streamed = handle.finish()
    starts_word = Lexicon(model.tokenizer, 40).starts_word
    for transcript, segments in [
        (result.transcript, result.segments),
        (streamed.transcript, streamed.segments),
    ]:
        ids, frames = transcript.token_ids, transcript.token_frames
        assert max(frames) > 0  # 40 and 80 ms frames give different times
        word_starts = [f * 0.04 for t, f in zip(ids, frames, strict=True) if starts_word[t]]
        words = [w for s in segments for w in s.words]
        assert [w.start for w in words] == pytest.approx(word_starts)
        assert segments[0].start == pytest.approx(frames[0] * 0.04)
        assert segments[-1].end == pytest.approx(min((frames[-1] + 1) * 0.04, duration))
