"""The training loop: overfitting in every chunk size, exact resume, DDP equivalence, setup.

The audio is a synthetic "language": each letter is a short two-tone burst of its own
frequencies and a space is silence, so a tiny model can learn the mapping in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from conftest import DATA, PROMPT_MODEL, ROOT, nemo_path

import caster
from caster.checkpoint import load_checkpoint
from caster.checkpoint.native import save_native
from caster.config import EncoderConfig, ModelConfig, PromptConfig
from caster.languages import NEMOTRON_3_5_PROMPT, LanguageError
from caster.scoring import ErrorCount
from caster.train.cli import add_eval_arguments, add_train_arguments, run_eval, run_train
from caster.train.config import (
    ModelSection,
    OptimSection,
    TrainConfig,
    TrainConfigError,
    apply_override,
    load_train_config,
    model_config,
)
from caster.train.evaluate import (
    choose_prompts,
    ctc_greedy,
    error_rates,
    language_id_rates,
    trained_chunk_ms,
)
from caster.train.loop import add_languages, frozen_modules, learning_rate, sample_context, train
from caster.train.metrics import read_metrics
from caster.transducer import Transducer

SAMPLE_RATE = 16000
ALPHABET = "abcdehikmo"
UTTERANCES = [
    ("bad kid", "en-US"),
    ("come home", "de-DE"),
    ("dim mode", "en-US"),
    ("oak bike", "de-DE"),
]
CHUNK_MS = (80, 160, 320)  # the contexts (16, 0), (16, 1), (16, 3)


def render(text: str) -> np.ndarray:
    """70 ms two-tone burst per letter, 70 ms silence per space, 50 ms silence around."""
    pieces = [np.zeros(800)]
    t = np.arange(1120) / SAMPLE_RATE
    for char in text:
        if char == " ":
            pieces.append(np.zeros(t.size))
            continue
        k = ALPHABET.index(char)
        low, high = 400 + 250 * k, 3000 + 180 * (3 * k % len(ALPHABET))
        tone = 0.3 * np.sin(2 * np.pi * low * t) + 0.2 * np.sin(2 * np.pi * high * t)
        pieces.append(np.hanning(t.size) * tone)
    pieces.append(np.zeros(800))
    return np.concatenate(pieces).astype(np.float32)


def write_manifest(directory: Path, utterances=UTTERANCES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "train.jsonl"
    with manifest.open("w") as f:
        for i, (text, language) in enumerate(utterances):
            audio = render(text)
            soundfile.write(directory / f"u{i}.wav", audio, SAMPLE_RATE)
            line = {"audio_filepath": f"u{i}.wav", "duration": audio.size / SAMPLE_RATE}
            f.write(json.dumps({**line, "text": text, "lang": language}) + "\n")
    return manifest


def tiny_raw(out: Path, manifest: Path, **sections) -> dict:
    """A tiny prompt model's training config (as the YAML mapping), sections overridden."""
    raw = {
        "output_dir": str(out),
        "seed": 0,
        "model": {
            "config": {
                "mel": {"n_mels": 64},
                "encoder": {
                    "feat_in": 64,
                    "n_layers": 2,
                    "d_model": 64,
                    "n_heads": 4,
                    "subsampling_conv_channels": 32,
                    "att_context_size": [[16, 1], [16, 0], [16, 3]],
                    "dropout": 0.0,
                    "dropout_pre_encoder": 0.0,
                    "dropout_att": 0.0,
                },
                "decoder": {
                    "vocab_size": 24,
                    "pred_hidden": 64,
                    "pred_rnn_layers": 1,
                    "joint_hidden": 64,
                    "dropout": 0.0,
                },
                "prompt": {"num_prompts": 8, "dictionary": {}},
            },
            "new_languages": ["en-US", "de-DE", "auto"],
        },
        "tokenizer": {"model_type": "bpe", "character_coverage": 1.0},
        "data": {"train": [str(manifest)], "max_batch_seconds": 10.0, "num_buckets": 1},
        "augment": {"dither": 0.0},
        "optim": {"lr": 3e-3, "warmup_steps": 10, "schedule": "constant", "min_lr": 0.0},
        "run": {"max_steps": 10, "log_every": 1, "val_every": 0, "save_every": 0},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["run"]["progress"] = False
    return raw


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_overfits_to_exact_text_in_every_chunk_size(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    raw = tiny_raw(
        tmp_path / "run",
        manifest,
        data={"validation": [str(manifest)]},
        run={"max_steps": 300, "log_every": 10, "val_every": 150, "prompt_mode": "mix"},
    )
    exported = train(TrainConfig.from_dict(raw))
    assert exported == tmp_path / "run" / "model"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 300
    final = records[-1]["val"]
    for ms in CHUNK_MS:  # validation scored every chunk size and prompt mode
        assert final[f"{ms}ms/all/wer"] == 0.0
        assert final[f"{ms}ms/auto/all/wer"] == 0.0
        # Targets end with the language tag, so `auto` names the language it heard.
        assert final[f"{ms}ms/auto/all/lid"] == 1.0
    assert losses(tmp_path / "run")[-1] < 0.05 * losses(tmp_path / "run")[0]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    # The exported models, loaded back, stream the exact text at every latency.
    for path in (exported, tmp_path / "run" / "model.nemo"):
        model = caster.load(path)
        for text, language in UTTERANCES:
            audio = render(text)
            for ms in CHUNK_MS:
                assert model.transcribe(audio, language=language, chunk_ms=ms).text == text
                detected = model.transcribe(audio, language="auto", chunk_ms=ms)
                assert (detected.text, detected.language) == (text, language)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    randomness = {
        "augment": {
            "dither": 1e-5,
            "speed_factors": [0.9, 1.0, 1.1],
            "spec_augment": {"freq_masks": 1, "freq_width": 8, "time_masks": 2, "time_width": 0.1},
        },
        "data": {"max_batch_seconds": 2.5, "validation": [str(manifest)]},
        # The pruned loss's heads and their optimizer state are part of the training state.
        "model": {"prune_range": 3},
        "optim": {"accumulate": 2, "schedule": "cosine", "warmup_steps": 2},
        "run": {
            "max_steps": 6,
            "ema_decay": 0.9,
            "prompt_mode": "mix",
            "save_every": 2,
            "val_every": 2,
            "val_chunk_ms": [80],
        },
    }
    configs = []
    for name in ("straight", "resumed"):
        raw = tiny_raw(tmp_path / name, manifest, **randomness)
        raw["model"]["config"]["encoder"]["dropout"] = 0.1
        configs.append(TrainConfig.from_dict(raw))
    straight, resumed = configs
    train(straight)
    assert train(resumed, stop_at=3) is None
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002.pt", "step-00000003.pt"]
    # A crash after step 3 but before its checkpoint: step 3 is logged, only step 2 saved.
    (checkpoints / "step-00000003.pt").unlink()
    train(resumed)

    def history(run: str) -> list[dict]:
        records = read_metrics(tmp_path / run / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    expected = history("straight")
    assert [r["step"] for r in expected] == [1, 2, 2, 3, 4, 4, 5, 6, 6]  # val at 2, 4, 6
    assert len({r["loss"] for r in expected if "loss" in r}) == 6
    assert history("resumed") == expected
    a = load_checkpoint(tmp_path / "straight" / "model").state_dict
    b = load_checkpoint(tmp_path / "resumed" / "model").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_processes_match_one_with_the_same_global_batch(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    # 2 batches of 2 utterances per epoch: one per process, or both accumulated in one.
    # Nothing random may depend on the process: no dropout, SpecAugment, dither or prompt mix.
    common = {
        "data": {"max_batch_seconds": 2.5},
        "run": {"max_steps": 4, "ema_decay": 0.9, "prompt_mode": "language"},
    }
    ddp = tiny_raw(tmp_path / "ddp", manifest, **common)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(ddp))
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from caster.train.config import load_train_config\n"
        "from caster.train.loop import train\n"
        "train(load_train_config(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = tiny_raw(tmp_path / "single", manifest, **common)
    single["optim"]["accumulate"] = 2
    train(TrainConfig.from_dict(single))
    expected = losses(tmp_path / "single")
    assert len(set(expected)) == 4  # the weights moved at every step
    assert losses(tmp_path / "ddp") == pytest.approx(expected, rel=1e-6)
    a = load_checkpoint(tmp_path / "ddp" / "model").state_dict
    b = load_checkpoint(tmp_path / "single" / "model").state_dict
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.parametrize("layout", ["nemo", "hf", "caster"])
def test_fine_tune_with_frozen_encoder_and_a_new_language(tmp_path, layout):
    source = {
        "nemo": nemo_path(PROMPT_MODEL),
        "hf": DATA / "hf" / PROMPT_MODEL,
        "caster": tmp_path / "caster",
    }[layout]
    if layout == "caster":
        save_native(source, load_checkpoint(nemo_path(PROMPT_MODEL)))
    manifest = write_manifest(tmp_path / "data", [(t, "it-IT") for t, _ in UTTERANCES])
    raw = tiny_raw(tmp_path / "run", manifest, run={"max_steps": 2, "prompt_mode": "language"})
    raw["model"] = {
        "init": str(source),
        "freeze": ["encoder"],
        "new_languages": ["it-IT"],
        "config": {"encoder": {"att_context_probs": [1.0, 0.0, 0.0, 0.0]}},
    }
    raw["tokenizer"] = {}
    train(TrainConfig.from_dict(raw))
    before = load_checkpoint(source)
    after = load_checkpoint(tmp_path / "run" / "model.nemo")
    # it-IT took the lowest free slot (en 0, fr 8, de 9, auto 101 are used).
    assert after.config.prompt.dictionary["it-IT"] == 1
    assert after.config.encoder.att_context_probs == (1.0, 0.0, 0.0, 0.0)
    assert after.tokenizer_model == before.tokenizer_model
    for key, value in before.state_dict.items():
        unchanged = torch.equal(value, after.state_dict[key])
        assert unchanged == key.startswith(("encoder.", "preprocessor.")), key
    assert caster.load(tmp_path / "run" / "model").prompt_index("it-IT") == 1


def test_unknown_languages_and_bad_settings_are_refused(tmp_path):
    manifest = write_manifest(tmp_path / "data", [(t, "it-IT") for t, _ in UTTERANCES])
    raw = tiny_raw(tmp_path / "run", manifest, run={"prompt_mode": "language"})
    with pytest.raises(TrainConfigError, match="new_languages"):
        train(TrainConfig.from_dict(raw))
    raw["model"]["new_languages"] = ["it-IT"]
    raw["run"]["prompt_mode"] = "mix"
    with pytest.raises(TrainConfigError, match="needs an 'auto' prompt"):
        train(TrainConfig.from_dict(raw))
    raw["model"]["new_languages"] = ["it-IT", "auto"]
    raw["run"]["val_chunk_ms"] = [560]  # left context 16 is not a multiple of 7 frames
    with pytest.raises(TrainConfigError, match="val_chunk_ms"):
        train(TrainConfig.from_dict(raw))
    raw["run"]["val_chunk_ms"] = []
    raw["model"]["freeze"] = ["encoder", "decoder", "joint", "prompt_kernel"]
    with pytest.raises(TrainConfigError, match="nothing to train"):
        train(TrainConfig.from_dict(raw))


def test_config_file_overrides_and_errors(tmp_path):
    example = load_train_config(ROOT / "examples" / "train_tiny.yaml")
    assert example.model.config["encoder"]["d_model"] == 128
    cfg = load_train_config(
        ROOT / "examples" / "train_tiny.yaml",
        ["--optim.lr=3e-4", "--run.val_chunk_ms=[80, 560]", "--augment.spec_augment=null"],
    )
    assert cfg.optim.lr == 3e-4 and cfg.run.val_chunk_ms == [80, 560]
    assert cfg.augment.spec_augment is None
    assert cfg.data == example.data
    with pytest.raises(TrainConfigError, match=r"known keys: .*max_steps"):
        load_train_config(None, ["--run.max_step=5"])
    with pytest.raises(TrainConfigError, match=r"optim\.lr must be float"):
        load_train_config(None, ["--optim.lr=fast"])
    with pytest.raises(TrainConfigError, match="--key=value"):
        load_train_config(None, ["--optim.lr"])
    with pytest.raises(TrainConfigError, match="schedule"):
        load_train_config(None, ["--optim.schedule=linear"])
    with pytest.raises(TrainConfigError, match="decay_steps"):
        load_train_config(None, ["--optim.decay_steps=-1"])
    with pytest.raises(TrainConfigError, match="spec_augment"):
        load_train_config(None, ["--augment.spec_augment={freq_mask: 2}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(TrainConfigError, match="not a mapping"):
        load_train_config(bad)
    raw: dict = {}
    apply_override(raw, "--model.config.encoder.n_layers=3")
    assert raw == {"model": {"config": {"encoder": {"n_layers": 3}}}}


def test_learning_rate_schedules():
    optim = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert learning_rate(0, optim, 110) == pytest.approx(0.1)
    assert learning_rate(9, optim, 110) == pytest.approx(1.0)
    assert learning_rate(60, optim, 110) == pytest.approx(0.55)
    assert learning_rate(110, optim, 110) == pytest.approx(0.1)
    noam = OptimSection(lr=1.0, min_lr=0.0, warmup_steps=100, schedule="noam")
    assert learning_rate(399, noam, 1000) == pytest.approx(0.5)
    constant = OptimSection(lr=1.0, warmup_steps=0, schedule="constant")
    assert learning_rate(500, constant, 10) == 1.0
    # Warmup-stable-decay: the peak rate until the last decay_steps, then linear to min_lr.
    wsd = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="constant", decay_steps=100)
    assert learning_rate(900, wsd, 1000) == 1.0
    assert learning_rate(901, wsd, 1000) == pytest.approx(0.1 + 0.9 * 0.99)
    assert learning_rate(950, wsd, 1000) == pytest.approx(0.55)
    assert learning_rate(1000, wsd, 1000) == pytest.approx(0.1)


def test_context_sampling_follows_the_probabilities():
    contexts = ((16, 1), (16, 0), (16, 3))
    uniform = EncoderConfig(att_context_size=contexts)
    drawn = [sample_context(uniform, seed=0, step=s) for s in range(300)]
    assert {c: drawn.count(c) for c in contexts} == pytest.approx(
        dict.fromkeys(contexts, 100), abs=30
    )
    assert drawn == [sample_context(uniform, seed=0, step=s) for s in range(300)]
    only_last = EncoderConfig(att_context_size=contexts, att_context_probs=(0.0, 0.0, 2.0))
    assert {sample_context(only_last, 1, s) for s in range(50)} == {(16, 3)}
    broken = EncoderConfig(att_context_size=contexts, att_context_probs=(1.0, 1.0))
    with pytest.raises(TrainConfigError, match="att_context_probs"):
        sample_context(broken, 0, 0)


def test_prompt_choice_modes():
    prompt = PromptConfig(num_prompts=8, dictionary={"en-US": 0, "en": 0, "de-DE": 3, "auto": 7})
    languages = ["en", "de-DE", None] * 200
    generator = torch.Generator().manual_seed(0)
    true = choose_prompts(languages, prompt, "language", 0.5, generator)
    assert true[:3].tolist() == [0, 3, 7]  # no language: auto
    assert set(choose_prompts(languages, prompt, "auto", 0.0, generator).tolist()) == {7}
    mixed = choose_prompts(languages, prompt, "mix", 0.5, generator)
    known = mixed.reshape(-1, 3)[:, :2]
    assert 0.4 < float((known == 7).float().mean()) < 0.6
    assert choose_prompts(languages, None, "mix", 0.5, generator) is None
    with pytest.raises(LanguageError):
        choose_prompts(["fr-FR"], prompt, "language", 0.0, generator)


def test_a_fresh_prompt_kernel_passes_frames_through_and_its_prompts_train():
    # A random ReLU prompt kernel between the encoder and the heads held training from
    # scratch on the blank plateau (transducer._start_as_identity); a fresh one is the
    # identity for every prompt, and the prompt columns still learn.
    config = ModelConfig(
        encoder=EncoderConfig(n_layers=1, d_model=16, n_heads=2, subsampling_conv_channels=8),
        prompt=PromptConfig(num_prompts=4, dictionary={"en-US": 0, "auto": 3}),
    )
    net = Transducer(config)
    frames = torch.randn(2, 5, 16)
    for prompt in ([0, 3], [1, 2]):
        assert torch.equal(net.apply_prompt(frames, torch.tensor(prompt)), frames)
    net.apply_prompt(frames, torch.tensor([0, 3])).pow(2).sum().backward()
    prompt_columns = net.prompt_kernel[0].weight.grad[:, 16:]  # (2D, P)
    assert prompt_columns[:, [0, 3]].abs().sum() > 0
    assert prompt_columns[:, [1, 2]].abs().sum() == 0  # prompts not in the batch


def test_new_languages_take_free_slots():
    grown = add_languages(NEMOTRON_3_5_PROMPT, ["is-IS", "en-US", "ga-IE"])
    assert grown.dictionary["is-IS"] == 63  # the 3.5 dictionary's first unused index
    assert grown.dictionary["ga-IE"] == 72
    assert grown.dictionary["en-US"] == 0
    full = PromptConfig(num_prompts=2, dictionary={"a": 0, "b": 1})
    with pytest.raises(TrainConfigError, match="no free prompt slot"):
        add_languages(full, ["c"])
    with pytest.raises(TrainConfigError, match="language prompt"):
        add_languages(None, ["c"])


def test_error_rates_keys_and_pooling():
    counts = {
        (80, "language", "en-US"): ErrorCount(1, 4, 1),
        (80, "language", "de-DE"): ErrorCount(0, 4, 1),
        (80, "language", "zh_CN"): ErrorCount(2, 10, 1),
        (80, "auto", "en-US"): ErrorCount(4, 4, 1),
    }
    rates = error_rates(counts)
    assert rates["80ms/en-US/wer"] == 0.25
    assert rates["80ms/all/wer"] == 1 / 8
    # zh_CN is zh however the locale is spelled: scored by characters.
    assert rates["80ms/zh_CN/cer"] == rates["80ms/all/cer"] == 0.2
    assert rates["80ms/auto/all/wer"] == 1.0
    assert not any(math.isnan(v) for v in rates.values())


def test_language_id_rates_per_locale_and_pooled():
    counts = {
        (560, "en-US"): ErrorCount(1, 4, 4),
        (560, "de-DE"): ErrorCount(0, 4, 4),
        (160, "de-DE"): ErrorCount(4, 4, 4),
    }
    rates = language_id_rates(counts)
    assert rates["560ms/auto/en-US/lid"] == 0.75
    assert rates["560ms/auto/all/lid"] == 7 / 8
    assert rates["160ms/auto/all/lid"] == 0.0


def test_trained_chunk_ms_uses_the_model_frame_length():
    config = caster.load(nemo_path(PROMPT_MODEL)).config
    assert trained_chunk_ms(config) == [80, 320, 560, 1120]  # contexts [56,0/3/6/13]
    # Subsampling x4: 40 ms frames, contexts [[40,4],[20,1],[40,0]] (80 ms frames gave 80/160/400).
    sub4 = caster.load(DATA / "nemo_variants" / "variant_sub4.nemo").config
    assert trained_chunk_ms(sub4) == [40, 80, 200]


def test_cli_train_then_eval(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path / "run", manifest)))
    parser = argparse.ArgumentParser(prog="caster")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(commands.add_parser("train"))
    add_eval_arguments(commands.add_parser("eval"))

    args = parser.parse_args(["train", str(config), "--run.max_steps=3", "--optim.lr=1e-3"])
    assert run_train(args) == 0
    assert "model written to" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    model = str(tmp_path / "run" / "model.nemo")
    args = parser.parse_args(["eval", str(manifest), "--model", model, "--chunk-ms", "80", "320"])
    assert run_eval(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["chunk", "prompt", "language", "metric", "rate", "errors/units"]
    rows = [line.split()[:5] for line in table[1:]]
    assert [row[:2] for row in rows] == [["80", "ms"]] * 3 + [["320", "ms"]] * 3
    assert [row[3:5] for row in rows[:3]] == [["de-DE", "WER"], ["en-US", "WER"], ["all", "WER"]]
    assert table[2].endswith("/4") and table[3].endswith("/8")

    args = parser.parse_args(["eval", str(manifest), "--model", model, "--language", "auto"])
    assert run_eval(args) == 0
    assert "auto" in capsys.readouterr().out
    args = parser.parse_args(["train", str(config), "--run.max_step=3"])
    assert run_train(args) == 2
    assert "unknown key" in capsys.readouterr().err
    args = parser.parse_args(["eval", str(manifest), "--model", model, "--chunk-ms", "560"])
    assert run_eval(args) == 2
    assert "560" in capsys.readouterr().err


def test_frozen_parts_by_name():
    config = TrainConfig.from_dict(tiny_raw(Path("unused"), Path("unused.jsonl"))).model.config
    net = Transducer(model_config(ModelSection(config={**config, "prompt": None})))
    assert frozen_modules(net, ["predictor", "joint"]) == [net.decoder, net.joint]
    with pytest.raises(TrainConfigError, match="prompt_kernel"):
        frozen_modules(net, ["prompt_kernel"])
    with pytest.raises(TrainConfigError, match=r"model\.freeze"):
        TrainConfig.from_dict({"model": {"freeze": ["lstm"]}})


def test_auxiliary_ctc_head_trains_resumes_and_is_not_exported(tmp_path):
    from caster.train.state import TrainStateError, latest_training_state, load_training_state

    manifest = write_manifest(tmp_path / "data")
    raw = tiny_raw(
        tmp_path / "run",
        manifest,
        model={"ctc_weight": 0.3},
        run={"max_steps": 3, "save_every": 1},
    )
    train(TrainConfig.from_dict(raw), stop_at=2)
    state = load_training_state(latest_training_state(tmp_path / "run"))
    head = state["ctc_head"]
    assert head["weight"].shape == (25, 64)  # vocabulary + blank, from d_model
    exported = train(TrainConfig.from_dict(raw))  # resumes at step 2, finishes
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run"))
    # Only the transducer is exported: it loads strictly, without the head's keys.
    weights = load_checkpoint(exported).state_dict
    assert not any("ctc" in key for key in weights)
    caster.load(exported)
    without = tiny_raw(tmp_path / "run", manifest, run={"max_steps": 4})
    with pytest.raises(TrainStateError, match="ctc_weight"):
        train(TrainConfig.from_dict(without))
    with pytest.raises(TrainConfigError, match="ctc_weight"):
        TrainConfig.from_dict({**raw, "model": {**raw["model"], "ctc_weight": -1.0}})


def test_pruned_loss_learns_exact_text_and_is_not_exported(tmp_path):
    from caster.train.state import TrainStateError, latest_training_state, load_training_state

    manifest = write_manifest(tmp_path / "data")
    raw = tiny_raw(
        tmp_path / "run",
        manifest,
        model={"prune_range": 3},
        data={"validation": [str(manifest)]},
        run={"max_steps": 300, "log_every": 10, "val_every": 0, "val_chunk_ms": [160]},
    )
    exported = train(TrainConfig.from_dict(raw))
    final = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["val"]
    assert final["160ms/all/wer"] == 0.0
    state = load_training_state(latest_training_state(tmp_path / "run"))
    assert state["simple_am"]["weight"].shape == (25, 64)  # vocabulary + blank, from d_model
    assert state["simple_lm"]["weight"].shape == (25, 64)  # from pred_hidden
    # Only the transducer is exported: it loads strictly, without the heads' keys.
    assert not any("simple" in key for key in load_checkpoint(exported).state_dict)
    without = tiny_raw(tmp_path / "run", manifest, run={"max_steps": 301})
    with pytest.raises(TrainStateError, match="prune_range"):
        train(TrainConfig.from_dict(without))
    with pytest.raises(TrainConfigError, match="prune_range"):
        TrainConfig.from_dict({**raw, "model": {**raw["model"], "prune_range": 1}})


def test_ctc_only_steps_train_the_encoder_alone_first(tmp_path):
    from caster.train.state import latest_training_state, load_training_state

    manifest = write_manifest(tmp_path / "data")
    raw = tiny_raw(
        tmp_path / "run",
        manifest,
        model={"ctc_weight": 0.3, "ctc_only_steps": 2},
        data={"validation": [str(manifest)]},
        run={"max_steps": 3, "save_every": 1, "log_every": 1, "val_every": 1},
    )
    states = []
    for stop in (1, 2, 3):
        train(TrainConfig.from_dict(raw), stop_at=stop)
        states.append(load_training_state(latest_training_state(tmp_path / "run"))["model"])

    def changed(a: dict, b: dict, prefix: str) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    # Step 2 is CTC only: the encoder moves, the prediction network and joint do not.
    assert changed(states[0], states[1], "encoder.")
    assert not changed(states[0], states[1], "decoder.")
    assert not changed(states[0], states[1], "joint.")
    # Step 3 trains the transducer.
    assert changed(states[1], states[2], "decoder.")
    assert changed(states[1], states[2], "joint.")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["ctc_only"] for r in records if "loss" in r] == [True, True, False]
    # Validation reads the CTC head up to the last CTC-only step, then the transducer.
    validations = [(r["step"], r["decoder"]) for r in records if "val" in r]
    assert validations == [(1, "ctc"), (2, "ctc"), (3, "transducer")]
    rates = [r["val"] for r in records if "val" in r]
    assert rates[0].keys() == rates[2].keys()  # the same table either way
    with pytest.raises(TrainConfigError, match="ctc_only_steps"):
        TrainConfig.from_dict({**raw, "model": {"ctc_only_steps": 5}})


def test_ctc_greedy_merges_repeats_drops_blanks_and_stops_at_the_length():
    blank = 0
    labels = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 0, 2], [4, 4, 0, 4, 1, 1, 1, 1, 1]])
    logits = torch.nn.functional.one_hot(labels, 6).float()  # (B, T, V+1)
    assert ctc_greedy(logits, torch.tensor([9, 4]), blank) == [[3, 3, 5, 2], [4, 4]]
