"""The multi-stream engine: every stream gets exactly the tokens it gets alone.

The fixture models decode mostly like language models (see the fixtures'
README), so each stream is compared with the same audio run alone through
`Model.stream`, not with expected strings.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import EN_MODEL, LANGUAGES, PROMPT_MODEL, ROOT, nemo_path

import caster
from caster.endpoint import EndpointConfig, EndpointError, segment_cuts, trailing_silence_ends
from caster.engine import Engine, EngineError, StreamStateError, UnknownStreamError
from caster.results import Lexicon, Segment
from caster.sentencepiece_proto import NORMAL, UNIGRAM, UNKNOWN, USER_DEFINED, model_proto
from caster.tokenizer import Tokenizer
from caster.vad import SileroVad, VadState, vad_step

SPLIT = EndpointConfig(silence_ms=160, max_segment_ms=800)


@pytest.fixture(scope="module")
def clips(oracle) -> list[np.ndarray]:
    a, b = oracle["inputs/wave_a"], oracle["inputs/wave_b"]
    silence = np.zeros(16000, dtype=np.float32)
    return [a, b, np.concatenate([b, silence, a]), b[:15000], a[:800], np.concatenate([a, b])]


_solo_cache: dict = {}


def solo(model, audio: np.ndarray, language, chunk_ms) -> caster.Transcript:
    """The stream run alone, fed at once."""
    key = (model.name, audio.tobytes(), language, chunk_ms)
    if key not in _solo_cache:
        stream = model.stream(language=language, chunk_ms=chunk_ms)
        stream.feed(audio)
        _solo_cache[key] = stream.finish()
    return _solo_cache[key]


def assert_matches_solo(model, result, audio, language, chunk_ms) -> None:
    alone = solo(model, audio, language, chunk_ms)
    assert result.transcript.token_ids == alone.token_ids, (language, chunk_ms)
    assert result.transcript.token_frames == alone.token_frames
    assert result.transcript.text == alone.text
    assert [t for s in result.segments for t in s.token_ids] == alone.token_ids
    assert all(s.is_final for s in result.segments)


def specs(model, clips, n: int) -> list[tuple[np.ndarray, str | None, int]]:
    languages, chunks = LANGUAGES[model.name], model.config.supported_chunk_ms()
    return [
        (clips[i % len(clips)], languages[i % len(languages)], chunks[i % len(chunks)])
        for i in range(n)
    ]


def test_streams_join_and_leave_and_match_solo(model, clips):
    """Mixed lengths, languages and chunk sizes; streams join late, end early or are dropped."""
    engine = Engine(model, max_batch=2)  # several batches per context in one step
    rng = np.random.default_rng(0)
    todo = specs(model, clips, 7)
    joins = [0, 0, 3, 5, 9, 14, 2]
    dropped = 6  # closed mid-way without finishing
    live: dict[int, tuple] = {}
    done = 0
    for tick in range(10_000):
        for i, join in enumerate(joins):
            if join == tick:
                audio, language, chunk_ms = todo[i]
                handle = engine.open(language=language, chunk_ms=chunk_ms, endpointing=SPLIT)
                live[i] = (handle, 0)
        for i, (handle, pos) in list(live.items()):
            audio, language, chunk_ms = todo[i]
            if i == dropped and tick == 12:
                handle.close()
                del live[i]
                with pytest.raises(UnknownStreamError):
                    handle.feed(audio[:100])
                continue
            if pos >= len(audio):
                assert_matches_solo(model, handle.finish(), audio, language, chunk_ms)
                del live[i]
                done += 1
                continue
            n = int(rng.integers(1, 2500))
            handle.feed(audio[pos : pos + n])
            live[i] = (handle, pos + n)
        engine.step()
        if not live and tick > max(joins):
            break
    assert done == len(todo) - 1
    assert engine.streams == []


def test_fixed_shape_steps_match_solo(model, clips):
    """`graphs=True` on the CPU: steady steps padded to power-of-two batches and whole
    chunks, run eagerly (CUDA captures these as graphs). Streams joining late, ending at
    different steps (ragged last chunks) and batches of one to five rows: each stream's
    tokens are exactly its own."""
    engine = Engine(model, max_batch=8, graphs=True)
    languages = LANGUAGES[model.name]
    todo = [
        (clips[c], languages[i % len(languages)], chunk_ms)
        for i, (c, chunk_ms) in enumerate([(0, 80), (1, 80), (2, 80), (5, 80), (3, 80), (4, 560)])
    ]
    joins = [0, 0, 0, 2, 4, 1]
    handles, pos = {}, [0] * len(todo)
    for tick in range(max(len(audio) for audio, _, _ in todo) // 1280 + max(joins) + 1):
        for i, (audio, language, chunk_ms) in enumerate(todo):
            if joins[i] == tick:
                handles[i] = engine.open(language=language, chunk_ms=chunk_ms)
            if i in handles:
                handles[i].feed(audio[pos[i] : pos[i] + 1280])  # 80 ms a tick
                pos[i] += 1280
        engine.step()
    for i, (audio, language, chunk_ms) in enumerate(todo):
        assert_matches_solo(model, handles[i].finish(), audio, language, chunk_ms)
    context = model.config.context_for_chunk_ms(80)
    assert (context, 8) in engine._graphs.buckets  # five streams padded to eight rows


def test_errors(model, clips):
    engine = Engine(model)
    handle = engine.open()
    handle.feed(clips[0][:4000])
    handle.end()
    with pytest.raises(EngineError, match="ended"):
        handle.feed(clips[0][:100])
    with pytest.raises(EngineError, match="ended"):
        handle.save()
    assert (
        handle.finish().transcript.token_ids == solo(model, clips[0][:4000], None, None).token_ids
    )
    with pytest.raises(UnknownStreamError):
        engine.events(handle.id)
    with pytest.raises(ValueError, match="chunk_ms"):
        engine.open(chunk_ms=123)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(EndpointError):
        EndpointConfig(silence_ms=-1)
    with pytest.raises(EngineError, match="worker"):
        list(engine.open())  # iterating needs the background worker
    assert engine.open().finish().segments == ()  # a stream without audio


def test_a_failed_step_fails_only_its_streams(model, clips, monkeypatch):
    import caster.engine

    real_step, chunks = caster.engine.step_streams, model.config.supported_chunk_ms()
    broken_context = model.config.context_for_chunk_ms(chunks[0])

    def step_streams(net, mel, lengths, prompts, encoder, decoder, context, graph):
        if context == broken_context:
            raise RuntimeError("out of memory")
        return real_step(net, mel, lengths, prompts, encoder, decoder, context, graph)

    monkeypatch.setattr(caster.engine, "step_streams", step_streams)
    for threaded in (False, True):
        engine = Engine(model)
        if threaded:
            engine.start()
        broken, healthy = engine.open(chunk_ms=chunks[0]), engine.open(chunk_ms=chunks[-1])
        broken.feed(clips[0])
        healthy.feed(clips[0])
        with pytest.raises(EngineError, match="failed") as info:
            broken.finish(timeout=30)
        assert "out of memory" in str(info.value.__cause__)
        with pytest.raises(EngineError, match="failed"):
            broken.feed(clips[0][:100])
        broken.close()
        # The other stream, and streams opened later, are not affected.
        assert_matches_solo(model, healthy.finish(timeout=30), clips[0], None, chunks[-1])
        later = engine.open(chunk_ms=chunks[-1])
        later.feed(clips[1])
        assert_matches_solo(model, later.finish(timeout=30), clips[1], None, chunks[-1])
        engine.stop()


def run_until(engine, handle, audio, rng, stop: int) -> None:
    pos = 0
    while pos < stop:
        n = int(rng.integers(1, 3000))
        handle.feed(audio[pos : min(pos + n, stop)])
        pos = min(pos + n, stop)
        engine.step()


RESTORE_SCRIPT = """
import json, sys
import numpy as np
import caster
from caster.engine import Engine

model = caster.load(sys.argv[1])
engine = Engine(model)
handle = engine.restore(open(sys.argv[2], "rb").read())
handle.feed(np.load(sys.argv[3]))
result = handle.finish()
print(json.dumps({
    "tokens": result.transcript.token_ids,
    "frames": result.transcript.token_frames,
    "segments": [[list(s.token_ids), s.start, s.end, s.language] for s in result.segments],
}))
"""


def test_save_restore_mid_stream(model, clips, tmp_path):
    audio = clips[2]
    language, chunk_ms = LANGUAGES[model.name][-1], model.config.supported_chunk_ms()[1]
    engine = Engine(model)
    handle = engine.open(language=language, chunk_ms=chunk_ms, endpointing=SPLIT)
    cut = 29_000
    run_until(engine, handle, audio, np.random.default_rng(1), cut)
    state = handle.save()
    assert engine.save(handle.id) == state  # saving changes nothing
    handle.feed(audio[cut:])
    original = handle.finish()
    assert_matches_solo(model, original, audio, language, chunk_ms)
    assert len(original.segments) >= 2

    restored = Engine(model, max_batch=3).restore(state)
    restored.feed(audio[cut:])
    again = restored.finish()
    assert_matches_solo(model, again, audio, language, chunk_ms)
    assert again.segments == original.segments  # segments from before the save included

    # In another process: only the bytes travel (one model suffices: it costs a start-up).
    if model.name != PROMPT_MODEL:
        return
    (tmp_path / "state.bin").write_bytes(state)
    np.save(tmp_path / "rest.npy", audio[cut:])
    (tmp_path / "restore.py").write_text(RESTORE_SCRIPT)
    args = [str(p) for p in (nemo_path(model.name), tmp_path / "state.bin", tmp_path / "rest.npy")]
    out = subprocess.run(
        [sys.executable, str(tmp_path / "restore.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        check=True,
    )
    remote = json.loads(out.stdout)
    assert remote["tokens"] == original.transcript.token_ids
    assert remote["frames"] == original.transcript.token_frames
    assert remote["segments"] == [
        [list(s.token_ids), s.start, s.end, s.language] for s in original.segments
    ]


def resave(state: bytes, edit=None, **tensors) -> bytes:
    """The state with its JSON header changed by `edit` and some tensors replaced."""
    size = int.from_bytes(state[:8], "little")
    header = json.loads(json.loads(state[8 : 8 + size])["__metadata__"]["caster"])
    if edit is not None:
        edit(header)
    old = safetensors.torch.load(state)
    new = old | {name.replace("_", "."): t for name, t in tensors.items()}
    return safetensors.torch.save(new, metadata={"caster": json.dumps(header)})


def test_restore_rejects_bad_states(model, clips):
    engine = Engine(model)
    handle = engine.open(language=LANGUAGES[model.name][0], endpointing=SPLIT)
    run_until(engine, handle, clips[0], np.random.default_rng(2), 40_000)
    state = handle.save()
    engine.restore(resave(state)).close()  # the round trip itself is fine
    n = len(safetensors.torch.load(state)["tokens.ids"])
    attention = safetensors.torch.load(state)["encoder.attention"]
    assert n > 1

    other = EN_MODEL if model.name == PROMPT_MODEL else PROMPT_MODEL
    bad = {
        "empty": b"",
        "garbage": b"\x00" * 7 + b"not a state at all",
        "random": np.random.default_rng(0).bytes(5000),
        "truncated": state[: len(state) // 2],
        "huge header": (10**9).to_bytes(8, "little") + state[8:],
        "version": resave(state, lambda h: h.update(version=99)),
        "context": resave(state, lambda h: h.update(context=[3, 5])),
        "language": resave(state, lambda h: h.update(language="xx-XX")),
        "negative": resave(state, lambda h: h.update(decoded_frames=-4)),
        "segments": resave(state, lambda h: h.update(final_spans=[[0, 10**6]])),
        "endpointing": resave(state, lambda h: h["endpointing"].update(silence_ms="x")),
        "nested context": resave(state, lambda h: h.update(context=[[70], [13]])),
        "token ids": resave(state, tokens_ids=torch.full((n,), 10**6, dtype=torch.long)),
        "frames": resave(state, tokens_frames=torch.arange(n, 0, -1)),
        "nan cache": resave(state, encoder_attention=torch.full_like(attention, float("nan"))),
        "cache shape": resave(state, encoder_attention=attention[:, :, :3].contiguous()),
        "extra tensor": resave(state, extra=torch.zeros(1)),
    }
    for name, data in bad.items():
        with pytest.raises(StreamStateError):
            engine.restore(data)
            pytest.fail(name)
    with pytest.raises(StreamStateError, match="different model"):
        Engine(caster.load(nemo_path(other))).restore(state)
    with pytest.raises(StreamStateError):
        engine.restore("a string")


def test_segments_words_and_times(model, clips):
    audio = clips[2]  # wave_b, 1 s of silence, wave_a
    duration = len(audio) / 16000
    counts = []
    for language in LANGUAGES[model.name]:
        engine = Engine(model)
        handle = engine.open(language=language, chunk_ms=160, endpointing=SPLIT)
        events: list[Segment] = []
        for pos in range(0, len(audio), 1000):
            handle.feed(audio[pos : pos + 1000])
            engine.step()
            events += handle.events()
        engine.end(handle)
        while engine.step():
            pass
        events += handle.events()
        result = handle.finish()
        assert_matches_solo(model, result, audio, language, 160)
        assert [e for e in events if e.is_final] == list(result.segments)
        finals_so_far = 0
        for event in events:  # interim events describe the open segment
            if event.is_final:
                finals_so_far += 1
            else:
                assert event.index == finals_so_far
        segments = result.segments
        counts.append(len(segments))
        assert [s.index for s in segments] == list(range(len(segments)))
        words = [w for s in segments for w in s.words]
        assert words
        for earlier, later in itertools.pairwise(words):
            assert earlier.start <= later.start and earlier.end <= later.end
            assert earlier.end <= later.start + 1e-9
        for item in [*segments, *words]:
            assert 0 <= item.start <= item.end <= duration
            assert 0 < item.confidence <= 1
        for s in segments:
            if language not in (None, "auto"):
                assert s.language == language
        if language == "auto":
            tags = model.tokenizer.language_tag_ids
            for s in segments:
                own = [tags[t] for t in s.token_ids if t in tags]
                if own:
                    assert s.language == own[-1]
        if language is None:
            assert all(s.language is None for s in segments)
        # Cuts fall exactly where the rules say: before a word start after a blank run over
        # 160 ms (2 frames), or before a word starting 800 ms (10 frames) in; or, in a
        # stream, once a blank run over 160 ms follows the open segment's last token. That
        # trailing-silence rule cannot wait for the next token, so a stream fed in small
        # chunks can still cut before a word's continuation after a pause (this model
        # emits "▁s t re a" | "m" 20 frames apart); `segment_cuts` alone (files, or a
        # step spanning the pause) waits for the next word start.
        tokens, frames = result.transcript.token_ids, result.transcript.token_frames
        bounds = list(np.cumsum([len(s.token_ids) for s in segments])[:-1])
        starts_word = engine._lexicon.starts_word
        for start, cut in itertools.pairwise([0, *bounds, len(tokens)]):
            rule = segment_cuts(SPLIT, 80, tokens, frames, starts_word, start, start)
            if cut == len(tokens):
                assert rule == []
            elif not rule or rule[0] != cut:
                assert rule == [] or rule[0] > cut
                assert frames[cut] - frames[cut - 1] - 1 > 2
        offline = segment_cuts(SPLIT, 80, tokens, frames, starts_word, 0, 0)
        assert all(starts_word[tokens[cut]] for cut in offline)
    assert max(counts) >= 2


def test_segment_cuts_rules():
    starts_word = [True, False]  # token 0 starts a word, token 1 continues one
    cfg = EndpointConfig(silence_ms=240, max_segment_ms=400)  # > 3 blank frames; 5 frames
    tokens = [0, 1, 0, 0, 1, 1, 0]
    frames = [0, 1, 5, 9, 10, 14, 15]
    # gaps 0, 3, 3, 0, 3, 0: no silence cut; words start at frames 0, 5, 9 and 15
    assert segment_cuts(cfg, 80, tokens, frames, starts_word, 0, 0) == [2, 6]
    assert segment_cuts(cfg, 80, tokens, frames, starts_word, 2, 4) == [6]  # only new tokens
    quick = EndpointConfig(silence_ms=160, max_segment_ms=None)
    # The pause before token 5 (a word's continuation) used to cut there, splitting the
    # word; now it cuts before the next word start, token 6, also when token 5 came in an
    # earlier call.
    assert segment_cuts(quick, 80, tokens, frames, starts_word, 0, 0) == [2, 3, 6]
    assert segment_cuts(quick, 80, tokens, frames, starts_word, 3, 6) == [6]
    assert segment_cuts(quick, 80, tokens[:6], frames[:6], starts_word, 3, 4) == []
    # 40 ms frames (subsampling x4): 160 ms is 4 frames, no gap is longer; 400 ms is 10.
    assert segment_cuts(quick, 40, tokens, frames, starts_word, 0, 0) == []
    assert segment_cuts(cfg, 40, tokens, frames, starts_word, 0, 0) == [6]
    never = EndpointConfig(silence_ms=None, max_segment_ms=None)
    assert segment_cuts(never, 80, tokens, frames, starts_word, 0, 0) == []
    assert trailing_silence_ends(quick, 80, last_frame=15, decoded_frames=19, vad=None)
    assert not trailing_silence_ends(quick, 80, last_frame=15, decoded_frames=18, vad=None)
    assert not trailing_silence_ends(quick, 40, last_frame=15, decoded_frames=20, vad=None)
    assert trailing_silence_ends(quick, 40, last_frame=15, decoded_frames=21, vad=None)
    assert not trailing_silence_ends(never, 80, last_frame=0, decoded_frames=1000, vad=None)


def test_many_threads_feed_at_once(model, clips):
    todo = specs(model, clips, 8)
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    with Engine(model, max_batch=4) as engine:
        barrier = threading.Barrier(len(todo))

        def client(i: int) -> None:
            try:
                audio, language, chunk_ms = todo[i]
                handle = engine.open(language=language, chunk_ms=chunk_ms, endpointing=SPLIT)
                rng = np.random.default_rng(i)
                barrier.wait()
                pos = 0
                while pos < len(audio):
                    n = int(rng.integers(1, 2000))
                    handle.feed(audio[pos : pos + n])
                    pos += n
                results[i] = handle.finish(timeout=120)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(todo))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i, (audio, language, chunk_ms) in enumerate(todo):
        assert_matches_solo(model, results[i], audio, language, chunk_ms)


def test_asyncio(model, clips):
    todo = specs(model, clips, 3)

    async def one(engine: Engine, audio, language, chunk_ms):
        handle = engine.open(language=language, chunk_ms=chunk_ms, endpointing=SPLIT)

        async def produce():
            for pos in range(0, len(audio), 1500):
                handle.feed(audio[pos : pos + 1500])
                await asyncio.sleep(0)
            handle.end()

        producer = asyncio.create_task(produce())
        events = [event async for event in handle]
        await producer
        result = await asyncio.to_thread(handle.finish, 60)
        return events, result

    async def main():
        with Engine(model) as engine:
            return await asyncio.gather(*(one(engine, *spec) for spec in todo))

    for (events, result), (audio, language, chunk_ms) in zip(
        asyncio.run(main()), todo, strict=True
    ):
        assert_matches_solo(model, result, audio, language, chunk_ms)
        assert [e for e in events if e.is_final] == list(result.segments)


needs_silero = pytest.mark.skipif(
    importlib.util.find_spec("silero_vad") is None, reason="silero-vad is not installed"
)


@needs_silero
def test_silero_vad_matches_its_package(oracle):
    vad = SileroVad.from_package()
    spec = importlib.util.find_spec("silero_vad")
    path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.jit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript, deprecated in 2.13
        packaged = torch.jit.load(str(path))
    noise = 0.3 * np.random.default_rng(0).standard_normal(8000)
    audio = torch.from_numpy(np.concatenate([oracle["inputs/wave_a"], noise]).astype(np.float32))
    with torch.inference_mode():
        expected = [float(packaged(w, 16000)) for w in torch.split(audio, 512)[:-1]]
        h = c = torch.zeros(1, 128)
        context, got = torch.zeros(64), []
        for w in torch.split(audio, 512)[:-1]:
            prob, h, c = vad(torch.cat([context, w])[None], h, c)
            context = w[-64:]
            got.append(float(prob[0]))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # fed in pieces of any size, the state ends where a single call ends
    whole = vad_step(vad, audio, VadState.initial(), 0.5)
    state = VadState.initial()
    for piece in torch.split(audio, 777):
        state = vad_step(vad, piece, state, 0.5)
    assert (state.samples, state.speech_end) == (whole.samples, whole.speech_end)
    assert torch.allclose(state.h, whole.h, atol=1e-6)


def test_vad_endpoint_rule():
    cfg = EndpointConfig(silence_ms=500, vad=True)
    state = VadState.initial()
    spoke = VadState(state.context, state.leftover, state.h, state.c, 32_000, 16_000)
    # 1 s heard since speech ended at 1.0 s; the decoder must have reached 1.0 s (12.5 frames)
    assert trailing_silence_ends(cfg, 80, last_frame=10, decoded_frames=13, vad=spoke)
    assert not trailing_silence_ends(cfg, 80, last_frame=10, decoded_frames=12, vad=spoke)
    assert not trailing_silence_ends(cfg, 80, last_frame=10, decoded_frames=13, vad=state)
    short = VadState(state.context, state.leftover, state.h, state.c, 23_000, 16_000)
    assert not trailing_silence_ends(cfg, 80, last_frame=10, decoded_frames=13, vad=short)


@needs_silero
def test_vad_stream_keeps_tokens_and_restores(model, clips):
    audio = clips[2]
    cfg = EndpointConfig(silence_ms=300, vad=True)
    engine = Engine(model)
    handle = engine.open(endpointing=cfg, language=LANGUAGES[model.name][0])
    run_until(engine, handle, audio, np.random.default_rng(3), 20_000)
    state = handle.save()
    handle.close()
    restored = engine.restore(state)
    restored.feed(audio[20_000:])
    assert_matches_solo(model, restored.finish(), audio, LANGUAGES[model.name][0], None)


def test_words_from_pieces_in_spaced_and_unspaced_scripts():
    pieces = ["<unk>", "<ja-JP>", "<en-US>", "▁hello", "▁wor", "ld", ",", "▁東", "京", "です", "。"]
    pieces += ["▁", "▁,"]
    types = [UNKNOWN, USER_DEFINED, USER_DEFINED] + [NORMAL] * (len(pieces) - 3)
    scores = [0.0] * 3 + [-float(i) for i in range(1, len(pieces) - 2)]
    lexicon = Lexicon(Tokenizer(model_proto(pieces, scores, types, model_type=UNIGRAM)), 80)
    ids = [3, 4, 5, 6, 2, 7, 8, 9, 10, 1, 11, 3, 12]
    frames = [0, 2, 2, 3, 3, 10, 11, 11, 12, 12, 20, 21, 22]
    logprobs = [-0.1] * 12 + [-0.7]
    words = lexicon.words(ids, frames, logprobs, duration=1.79)
    # Tags are no words, punctuation joins the word before it, each CJK/kana piece is a
    # word, a bare "▁" is dropped; a word ends where the next starts, or at the audio's end.
    assert [(w.text, w.start, w.end) for w in words] == [
        ("hello", 0.0, 0.08),
        ("world,", 0.16, 0.32),
        ("東", 0.8, 0.88),
        ("京", 0.88, 0.88),
        ("です。", 0.88, 1.04),
        ("hello,", 1.68, 1.79),
    ]
    assert words[-1].confidence == pytest.approx(np.exp(-0.4))
    segment = lexicon.segment(0, ids, frames, logprobs, "ja-JP", True, duration=1.79)
    assert segment.text == "hello world, 東京です。 hello,"
    assert (segment.start, segment.end, segment.language) == (0.0, 1.79, "ja-JP")
    assert segment.confidence == pytest.approx(np.exp(-1.9 / 13))
    assert lexicon.last_language(ids) == "ja-JP"
