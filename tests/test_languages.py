"""Language resolution against prompt dictionaries: the real 3.5 one and the fixture's."""

from __future__ import annotations

import pytest
import yaml
from conftest import NEMO_FIXTURES, PROMPT_MODEL, require_fixture

from caster.config import ModelConfig, PromptConfig
from caster.languages import (
    NEMOTRON_3_5_LOCALES,
    NEMOTRON_3_5_PROMPT,
    NEMOTRON_3_5_PROMPT_DICTIONARY,
    LanguageError,
    UnknownLanguageError,
    canonical_locale,
    resolve_language,
    supported_languages,
)

REAL = NEMOTRON_3_5_PROMPT


def _fixture_nemo_config() -> dict:
    path = require_fixture(NEMO_FIXTURES / f"{PROMPT_MODEL}.model_config.yaml")
    return yaml.safe_load(path.read_text())


def test_real_dictionary_shape():
    assert REAL.num_prompts == 128
    assert len(NEMOTRON_3_5_PROMPT_DICTIONARY) == 121
    used = set(NEMOTRON_3_5_PROMPT_DICTIONARY.values())
    assert max(used) == 104 and min(used) == 0
    assert not used & set(range(105, 128))
    assert NEMOTRON_3_5_PROMPT_DICTIONARY["auto"] == 101


def test_model_card_locales_resolve_to_themselves():
    assert len(NEMOTRON_3_5_LOCALES) == len(set(NEMOTRON_3_5_LOCALES)) == 40
    for locale in NEMOTRON_3_5_LOCALES:
        index = resolve_language(locale, REAL)
        assert canonical_locale(index, REAL) == locale
    assert set(NEMOTRON_3_5_LOCALES) <= set(supported_languages(REAL))


@pytest.mark.parametrize(
    ("language", "index"),
    [
        ("en-US", 0),
        ("en", 0),
        ("es", 3),
        ("es-ES", 2),
        ("enGB", 1),
        ("auto", 101),
        ("AUTO", 101),
        ("en_us", 0),
        ("EN-us", 0),
        (" de-DE ", 9),
        ("zh_cn", 4),
        ("nah-MX", 83),
        ("haw_us", 97),
        (None, 101),
    ],
)
def test_resolve_real_dictionary(language, index):
    assert resolve_language(language, REAL) == index


@pytest.mark.parametrize(
    ("language", "index", "locale"),
    [
        ("no", 27, "no-NO"),
        ("NO", 27, "no-NO"),
        ("no-NO", 27, "no-NO"),
        ("no_no", 27, "no-NO"),
        ("nb", 103, "nb-NO"),
        ("nb-NO", 103, "nb-NO"),
        ("nb_no", 103, "nb-NO"),
        ("nn", 104, "nn-NO"),
        ("nn-NO", 104, "nn-NO"),
    ],
)
def test_norwegian(language, index, locale):
    assert resolve_language(language, REAL) == index
    assert canonical_locale(index, REAL) == locale


def test_yaml_no_trap_is_repaired_by_from_nemo():
    # Written unquoted, the Norwegian key `no` is YAML 1.1's boolean False.
    unquoted = "\n".join(f"{k}: {v}" for k, v in NEMOTRON_3_5_PROMPT_DICTIONARY.items())
    parsed = yaml.safe_load(unquoted)
    assert parsed[False] == 27 and "no" not in parsed
    cfg = _fixture_nemo_config()
    cfg["model_defaults"]["prompt_dictionary"] = parsed
    prompt = ModelConfig.from_nemo(cfg).prompt
    assert list(prompt.dictionary.items()) == list(NEMOTRON_3_5_PROMPT_DICTIONARY.items())
    assert resolve_language("no", prompt) == 27


def test_unknown_language_lists_supported_locales():
    with pytest.raises(UnknownLanguageError) as err:
        resolve_language("xx-YY", REAL)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "'xx-YY'" in message
    for locale in ("en-US", "de-DE", "nb-NO", "nn-NO", "no-NO", "auto"):
        assert locale in message
    # Aliases resolve but are not advertised.
    for alias in ("zh-ZH", "ja-JA", "enGB"):
        assert alias not in message
    with pytest.raises(UnknownLanguageError):
        resolve_language("", REAL)
    with pytest.raises(UnknownLanguageError):
        resolve_language("english", REAL)


def test_language_must_be_a_string():
    with pytest.raises(LanguageError, match="string"):
        resolve_language(0, REAL)


def test_model_without_prompt():
    assert resolve_language(None, None) is None
    assert resolve_language("auto", None) is None
    assert resolve_language("Auto", None) is None
    with pytest.raises(LanguageError, match="no language prompt") as err:
        resolve_language("en-US", None)
    assert not isinstance(err.value, UnknownLanguageError)


def test_default_without_auto_is_en_us():
    prompt = PromptConfig(dictionary={"en-US": 0, "en": 0, "de-DE": 9})
    assert resolve_language(None, prompt) == 0
    with pytest.raises(UnknownLanguageError, match="en-US, de-DE"):
        resolve_language("auto", prompt)
    with pytest.raises(LanguageError, match="name a language: de-DE"):
        resolve_language(None, PromptConfig(dictionary={"de-DE": 9, "de": 9}))


def test_ambiguous_case_insensitive_match_raises():
    prompt = PromptConfig(dictionary={"xx-AA": 1, "xx-aa": 2})
    assert resolve_language("xx-aa", prompt) == 2
    with pytest.raises(LanguageError, match="ambiguous"):
        resolve_language("XX-AA", prompt)


def test_canonical_locale():
    assert canonical_locale(0, REAL) == "en-US"
    assert canonical_locale(1, REAL) == "en-GB"
    assert canonical_locale(4, REAL) == "zh-CN"
    assert canonical_locale(6, REAL) == "hi-IN"
    assert canonical_locale(14, REAL) == "ko-KR"
    assert canonical_locale(101, REAL) is None
    assert canonical_locale(3, PromptConfig(dictionary={"es": 3})) == "es"
    with pytest.raises(LanguageError, match="105"):
        canonical_locale(105, REAL)


def test_supported_languages_real():
    langs = supported_languages(REAL)
    assert len(langs) == len(set(NEMOTRON_3_5_PROMPT_DICTIONARY.values())) == 84
    assert langs[:4] == ["en-US", "en-GB", "es-ES", "es-US"]
    assert langs[-1] == "auto"
    assert "zh-ZH" not in langs and "en" not in langs


def test_fixture_prompt_model():
    prompt = ModelConfig.from_nemo(_fixture_nemo_config()).prompt
    assert supported_languages(prompt) == ["en-US", "fr-FR", "de-DE", "auto"]
    assert resolve_language("de-DE", prompt) == 9
    assert resolve_language("fr", prompt) == 8
    assert resolve_language(None, prompt) == 101
    with pytest.raises(UnknownLanguageError, match="en-US, fr-FR, de-DE, auto"):
        resolve_language("es", prompt)
