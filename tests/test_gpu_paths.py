"""The GPU fast paths, checked on the CPU: half precision, fixed-shape steps, bench_gpu.py.

Nothing here needs a GPU. What only CUDA runs (graph warm-up, capture and replay in
`caster.graphs`, pinned uploads in the engine) is not covered; the padding and
bucketing it relies on are, by running the same padded steps eagerly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import LANGUAGES, PROMPT_MODEL, ROOT, nemo_path

import caster
from caster.engine import Engine
from caster.graphs import EncoderGraphs, bucket_size
from caster.quantize import QuantizationError
from caster.state import select_state


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_gives_the_float32_tokens(model, oracle, dtype):
    """Every wave, language and chunk size of the NeMo-built fixture models: the float32
    tokens. (With the joint in bf16 too, 10 of the prompt model's 40 changed.)"""
    half = caster.load(nemo_path(model.name), dtype=dtype)
    for wave in ("wave_a", "wave_b"):
        audio = oracle[f"inputs/{wave}"]
        for language in LANGUAGES[model.name]:
            for chunk_ms in model.config.supported_chunk_ms():
                want = model.transcribe(audio, language=language, chunk_ms=chunk_ms).token_ids
                got = half.transcribe(audio, language=language, chunk_ms=chunk_ms).token_ids
                assert got == want, (wave, language, chunk_ms)
            stream = half.stream(language=language, chunk_ms=chunk_ms)
            stream.feed(audio)
            assert stream.finish().token_ids == want


def test_half_precision_keeps_front_end_prompt_and_joint_float32():
    path = nemo_path(PROMPT_MODEL)
    m = caster.load(path, dtype=torch.bfloat16)
    net = m.net
    assert m.dtype == torch.bfloat16
    assert net.encoder.layers[0].self_attn.linear_q.weight.dtype == torch.bfloat16
    assert net.decoder.prediction.dec_rnn.lstm.weight_hh_l0.dtype == torch.bfloat16
    assert net.preprocessor.featurizer.fb.dtype == torch.float32
    assert net.prompt_kernel[0].weight.dtype == torch.float32
    assert {p.dtype for p in net.joint.parameters()} == {torch.float32}
    cache = net.encoder.initial_cache(1, m.config.default_context)
    assert cache.attention.dtype == torch.bfloat16
    assert caster.load(path, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        caster.load(path, dtype="int4")
    with pytest.raises(QuantizationError, match="float32"):
        caster.load(path, int8=True, dtype="bf16")


def test_engine_streams_and_saved_states_in_half_precision(oracle):
    """A bf16 engine's batched streams get the float32 tokens; a saved state keeps its
    dtype and moves between precisions (bf16 into float32 and back)."""
    path = nemo_path(PROMPT_MODEL)
    full, half = caster.load(path), caster.load(path, dtype="bf16")
    audio = np.concatenate([oracle["inputs/wave_b"], oracle["inputs/wave_a"]])
    want = full.transcribe(audio, language="auto", chunk_ms=160).token_ids
    cut = 20_000
    saved = {}
    for name, m in (("full", full), ("half", half)):
        engine = Engine(m, max_batch=4)
        handles = [engine.open(language="auto", chunk_ms=160) for _ in range(3)]
        for pos in range(0, cut, 1600):
            for handle in handles:
                handle.feed(audio[pos : min(pos + 1600, cut)])
            engine.step()
        saved[name] = handles[0].save()
        for handle in handles:
            handle.feed(audio[cut:])
        assert [h.finish().transcript.token_ids for h in handles] == [want] * 3
    assert safetensors.torch.load(saved["half"])["encoder.attention"].dtype == torch.bfloat16
    assert safetensors.torch.load(saved["half"])["decoder.output"].dtype == torch.float32
    for state, m in ((saved["half"], full), (saved["full"], half)):
        handle = Engine(m).restore(state)
        handle.feed(audio[cut:])
        assert handle.finish().transcript.token_ids == want


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 1000)] == [1, 2, 4, 4, 8, 8, 16, 1024]
    with pytest.raises(ValueError):
        bucket_size(0)


@torch.inference_mode()
def test_padded_bucket_step_equals_the_plain_step(model):
    """Three steady streams, one with a ragged last chunk, in a bucket of four rows and
    whole-chunk frames: the real rows' frames and caches are the unpadded step's."""
    encoder = model.net.encoder
    context = model.config.context_for_chunk_ms(160)
    first, later = encoder.chunk_frames(context, True), encoder.chunk_frames(context, False)
    generator = torch.Generator().manual_seed(0)
    n_mels = model.config.mel.n_mels
    cache = encoder.initial_cache(3, context)
    for frames in (first, later):
        mel = torch.randn(3, n_mels, frames, generator=generator)
        _, _, cache = encoder.step(mel, torch.full((3,), frames), cache, context)
    assert bool((cache.mel_len == encoder.mel_cache_frames).all())  # steady from here
    chunk = torch.randn(3, n_mels, later, generator=generator)
    lengths = torch.tensor([later, later, later // 2 + 1])
    graphs = EncoderGraphs(encoder, capture=False)
    for rows in (3, 1):  # the second call reuses the bucket's buffers with fewer rows
        index = list(range(rows))
        want = encoder.step(chunk[:rows], lengths[:rows], select_state(cache, index), context)
        got = graphs.step(chunk[:rows], lengths[:rows], select_state(cache, index), context)
        assert torch.equal(got[1], want[1])
        for b in range(rows):
            valid = int(want[1][b])
            assert torch.allclose(got[0][b, :valid], want[0][b, :valid], atol=1e-5)
        for name, value in vars(want[2]).items():
            assert torch.allclose(getattr(got[2], name), value, atol=1e-5), name
    assert sorted(graphs.buckets) == [(context, 1), (context, 4)]


def test_gpu_benchmark_smoke_mode(tmp_path):
    """bench_gpu.py --device cpu --smoke runs the whole script on a tiny model; without a
    GPU, its default (CUDA) run says so and exits cleanly (`caster bench` runs it)."""
    script = str(ROOT / "bench" / "bench_gpu.py")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu"
    args = [sys.executable, script, "--device", "cpu", "--smoke", "--out", str(out)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["chunk_ms"] for s in report["streams_held"]] == [80, 1120]
    # Whether the tiny model holds real time depends on the machine's load: only the
    # search's shape is checked (both paths measured, a count of streams held).
    for searched in report["streams_held"]:
        assert searched["fast"]["runs"] and searched["baseline"]["runs"]
        assert searched["fast"]["held"] >= 0 and searched["baseline"]["held"] >= 0
    assert len(report["accuracy"]["preset"]) == 2
    assert "| 80 ms |" in out.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        run = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=300, env=env
        )
        assert run.returncode == 0 and "no CUDA device" in run.stdout
