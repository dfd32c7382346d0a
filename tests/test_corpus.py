"""`caster data build`: text normalisation, split rules, synthesis checks, and a small build.

The build tests need the tools of scripts/install_corpus_tools.sh (espeak-ng, flite, the Asterisk
prompts, the Python text packages); without them they skip, saying what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import unavailable

from caster.audio import load_audio
from caster.corpus import asterisk
from caster.corpus.build import (
    SPLITS,
    BuildConfig,
    CorpusError,
    build,
    plan,
    sentence_split,
)
from caster.corpus.cli import add_arguments, run
from caster.corpus.synth import (
    HELD_OUT_PITCHES,
    HELD_OUT_SPEEDS,
    HELD_OUT_VARIANTS,
    SynthesisError,
    Voice,
    synthesize,
)
from caster.corpus.text import normalize_text
from caster.languages import NEMOTRON_3_5_LOCALES
from caster.tokenizer import Tokenizer
from caster.train.tokenizer import train_tokenizer


def _require(*, binaries: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        unavailable(f"corpus tools missing: {missing} (run scripts/install_corpus_tools.sh)")


def _require_build_tools() -> None:
    _require(
        binaries=("espeak-ng", "flite"),
        modules=("num2words", "gflanguages", "chatterbot_corpus", "G722", "pykakasi", "yaml"),
    )
    if not (asterisk.SOUNDS / "en_US_f_Allison").is_dir():
        unavailable("asterisk-core-sounds-en-g722 missing (run scripts/install_corpus_tools.sh)")


# --- text --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "locale", "expected"),
    [
        ("Press 1 to continue.", "en-US", "Press one to continue."),
        ("Ich bin 42 Jahre alt.", "de-DE", "Ich bin zweiundvierzig Jahre alt."),
        ("Il a 21 ans.", "fr-FR", "Il a vingt et un ans."),
        ("私は25歳です。", "ja-JP", "私は二十五歳です。"),
        # Quotes go, a dash after a sentence end goes, no space before punctuation (French).
        ("« Êtes-vous sûr ? » — dit-il.", "fr-FR", "Êtes-vous sûr? dit-il."),
        ("Hallo,wie geht’s dir?", "de-DE", "Hallo, wie geht's dir?"),
        ("Who found a 'Genie in a Bottle' in 1999?", "en-US",
         "Who found a Genie in a Bottle in one thousand, nine hundred and ninety-nine?"),
        ("¿Qué? - ¡Nada!", "es-ES", "Qué? Nada!"),
        # NFKC: full-width comma to ASCII, half-width katakana to full width; "。" ends zh/ja.
        ("很抱歉，我没有.", "zh-CN", "很抱歉,我没有。"),
        ("ｶﾀｶﾅです.", "ja-JP", "カタカナです。"),
    ],
)  # fmt: skip
def test_normalize_text_output_form(raw: str, locale: str, expected: str) -> None:
    _require(modules=("num2words",))
    assert normalize_text(raw, locale) == expected


def test_recorded_prompt_text_need_not_be_a_sentence() -> None:
    # A prompt cut at the front loses its dots, keeps its lower-case start.
    raw = "... участников в конференции"
    assert normalize_text(raw, "ru-RU") is None
    assert normalize_text(raw, "ru-RU", require_sentence=False) == "участников в конференции"


@pytest.mark.parametrize(
    ("raw", "locale"),
    [
        ("Enter a valid %s.", "en-US"),  # placeholder
        ("Click <b>here</b>.", "en-US"),  # markup
        ("Copy the mp3 files.", "en-US"),  # digits inside a word
        ("It costs 3.5 euros.", "en-US"),  # no single reading
        ("Это 5 рублей.", "bg-BG"),  # Cyrillic is fine, but num2words has no Bulgarian
        ("Hello мир!", "en-US"),  # a second script
        ("press * to toggle.", "en-US"),  # a symbol
        ("username", "en-US"),  # a label, not a sentence
        ("Visit www.example.com today.", "en-US"),  # an address
        ("Das gilt z.B. hier.", "de-DE"),  # an abbreviation
    ],
)
def test_normalize_text_drops_what_cannot_be_said(raw: str, locale: str) -> None:
    _require(modules=("num2words",))
    assert normalize_text(raw, locale) is None


def test_every_card_locale_has_text_and_voice_settings() -> None:
    from caster.corpus.synth import ESPEAK_VOICES
    from caster.corpus.text import LOCALE_TEXT

    assert set(LOCALE_TEXT) == set(NEMOTRON_3_5_LOCALES) == set(ESPEAK_VOICES)


# --- splits ------------------------------------------------------------------------------


def test_prompt_split_rule_is_first_sha1_hex_digit() -> None:
    # sha1: digits/1 -> 0232, beep -> 38d8, goodbye -> 3c8e, vm-intro -> 1f55, added -> 1724
    assert asterisk.prompt_split("digits/1") == "test"
    assert asterisk.prompt_split("vm-intro") == "test"
    assert asterisk.prompt_split("beep") == "dev"
    assert asterisk.prompt_split("goodbye") == "dev"
    assert asterisk.prompt_split("hello-world") == "train"  # fbb9


def test_sentence_split_ignores_case_and_locale() -> None:
    assert sentence_split("Thank you.") == sentence_split("THANK YOU.")
    counts = {split: 0 for split in SPLITS}
    for i in range(1600):
        counts[sentence_split(f"sentence {i}")] += 1
    # 1/16 test, 1/16 dev: 100 each expected.
    assert 60 < counts["test"] < 140 and 60 < counts["dev"] < 140


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown locales"):
        plan(BuildConfig(out=tmp_path, locales=("xx-XX",)))
    with pytest.raises(CorpusError, match="unknown engines"):
        plan(BuildConfig(out=tmp_path, locales=("de-DE",), engines=("piper",)))
    with pytest.raises(CorpusError, match="max_per_split"):
        plan(BuildConfig(out=tmp_path, locales=("de-DE",), max_per_split=0))


# --- synthesis ---------------------------------------------------------------------------


def test_synthesis_refuses_a_language_switch() -> None:
    _require(binaries=("espeak-ng",))
    voice = Voice("espeak", "de", "m1", 50, 150)
    audio = synthesize("Das ist ein schöner Tag.", "de-DE", voice)
    assert audio.dtype == np.float32 and 0.5 < len(audio) / 16000 < 5
    # espeak-ng reads "Windows" as English: the audio would not be German speech.
    with pytest.raises(SynthesisError, match="switches to"):
        synthesize("Das ist ein Rechner mit Windows.", "de-DE", voice)


def test_japanese_and_chinese_are_read_not_spelled() -> None:
    # Fed directly, the ja voice says "Chinese letter" for kanji and cmn reads pinyin digits as
    # English words; through their readings neither switches language.
    _require(binaries=("espeak-ng",), modules=("pykakasi", "pypinyin"))
    with pytest.raises(SynthesisError, match="switches to"):
        synthesize("日本語", "de-DE", Voice("espeak", "ja", "m1", 50, 150))
    synthesize("日本語を話します。", "ja-JP", Voice("espeak", "ja", "m1", 50, 150))
    synthesize("我们今天去学校。", "zh-CN", Voice("espeak", "cmn-latn-pinyin", "m1", 50, 150))
    # NFKC (the transcript's form) splits Thai SARA AM; the voice is given it joined.
    synthesize(normalize_text("วันที่สำคัญ", "th-TH"), "th-TH", Voice("espeak", "th", "m1", 50, 150))


def test_asterisk_prompts_drop_non_speech_and_spell_digits() -> None:
    _require(modules=("num2words", "G722"))
    if not (asterisk.DOCS / "asterisk-core-sounds-en").is_dir():
        unavailable("asterisk-core-sounds-en missing (run scripts/install_corpus_tools.sh)")
    prompts = {p.name: p for p in asterisk.prompts("en-US")}
    assert "beep" not in prompts  # "[this is a simple beep tone]"
    assert "digits/1" in prompts and prompts["digits/1"].text.lower().startswith("one")
    assert not any(ch.isdigit() for p in prompts.values() for ch in p.text)
    audio = asterisk.decode_g722(prompts["digits/1"].path)
    assert 0.2 < len(audio) / 16000 < 3 and np.abs(audio).max() > 0.05


# --- a small build -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildConfig, object]:
    _require_build_tools()
    config = BuildConfig(
        out=tmp_path_factory.mktemp("corpus"),
        locales=("en-US", "de-DE", "ja-JP"),
        text_sources=("chatterbot", "numbers", "udhr"),
        max_per_split=2,
        workers=2,
        seed=7,
        progress=False,
    )
    return config, build(config)


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_valid_manifests_whose_audio_decodes(small_build) -> None:
    config, report = small_build
    texts = []
    for split in SPLITS:
        for locale in config.locales:
            lines = _manifest(config.out / split / f"{locale}.jsonl")
            assert lines, f"{split}/{locale} is empty"
            assert len(lines) == report.lines[(split, locale)]
            for line in lines:
                assert line["lang"] == locale and line["text"]
                path = (config.out / split / line["audio_filepath"]).resolve()
                assert path.is_relative_to(config.out.resolve())
                audio = load_audio(path)
                assert abs(len(audio) / 16000 - line["duration"]) < 1e-3
                texts.append(line["text"])
    # en-US: espeak, flite and the Asterisk recordings.
    sources = {line["voice"].split(":")[0] for line in _manifest(config.out / "train/en-US.jsonl")}
    assert sources == {"espeak", "flite", "asterisk"}
    # Every character is covered: a tokenizer trained on the texts gives them back exactly.
    tokenizer = Tokenizer(train_tokenizer(texts, 120, list(config.locales), character_coverage=1.0))
    for text in texts:
        ids = tokenizer.encode(text)
        assert 0 not in ids, f"<unk> in {text!r}"
        assert tokenizer.decode(ids) == text


def test_build_holds_out_sentences_and_voices(small_build) -> None:
    config, _ = small_build
    train_texts, train_voices = set(), set()
    for locale in config.locales:
        for line in _manifest(config.out / "train" / f"{locale}.jsonl"):
            train_texts.add(line["text"].casefold())
            train_voices.add(line["voice"])
    for split in ("dev", "test"):
        for locale in config.locales:
            for line in _manifest(config.out / split / f"{locale}.jsonl"):
                assert line["text"].casefold() not in train_texts
                if line["voice"].startswith("espeak:"):
                    _, name, pitch, speed = line["voice"].split(":")
                    assert name.split("+")[1] in HELD_OUT_VARIANTS
                    assert int(pitch[1:]) in HELD_OUT_PITCHES
                    assert int(speed[1:]) in HELD_OUT_SPEEDS
                    assert line["voice"] not in train_voices


def test_build_resumes_and_is_deterministic(small_build, tmp_path: Path) -> None:
    config, first = small_build
    manifests = {p: p.read_bytes() for p in sorted(config.out.glob("*/*.jsonl"))}
    victim = sorted((config.out / "audio").rglob("*.flac"))[0]
    victim.write_bytes(b"not audio")
    again = build(config)
    assert again.rendered == 1 and again.reused == first.rendered - 1
    assert {p: p.read_bytes() for p in sorted(config.out.glob("*/*.jsonl"))} == manifests
    load_audio(victim)
    # In one process instead of two workers, into a fresh folder: the same audio, sample for
    # sample, for one locale.
    alone = dataclasses.replace(config, out=tmp_path, workers=0, locales=("de-DE",))
    build(alone)
    for split in SPLITS:
        name = f"{split}/de-DE.jsonl"
        assert (tmp_path / name).read_bytes() == (config.out / name).read_bytes()
        for line in _manifest(tmp_path / name):
            a = load_audio(tmp_path / split / line["audio_filepath"])
            b = load_audio(config.out / split / line["audio_filepath"])
            np.testing.assert_array_equal(a, b)


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _require_build_tools()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--locales", "it-IT", "--engines", "asterisk",
         "--max-per-split", "1", "--workers", "0", "--no-progress"]
    )  # fmt: skip
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "it-IT" in out and "rendered 3" in out
    assert run(parser.parse_args(["--out", str(tmp_path), "--locales", "xx-XX"])) == 2
