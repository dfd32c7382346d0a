"""User-given languages resolved against a checkpoint's prompt dictionary.

A prompt model (Nemotron 3.5) conditions its joint on a one-hot prompt index
chosen per stream (architecture.md §4.2). The checkpoint's
`model_defaults.prompt_dictionary` maps locales and short forms to indices,
several keys per index ("en-US" and "en" are both 0), and "auto" to the
language-agnostic prompt, with which the model emits "<xx-XX>" tags itself.
An unknown language is always an error, never a silent fallback to English.
"""

from __future__ import annotations

import re

from caster.config import PromptConfig

AUTO = "auto"
# The language the model is asked for when the caller names none and the
# dictionary has no "auto" (NeMo's streaming pipeline default).
DEFAULT_LOCALE = "en-US"
LOCALE_FORM = re.compile(r"[a-z]{2,3}-[A-Za-z]{2}")

# The 40 locales of the nemotron-3.5-asr-streaming-0.6b model card, in its three tiers.
NEMOTRON_3_5_TRANSCRIPTION_READY = (
    "en-US", "en-GB", "es-US", "es-ES", "fr-FR", "fr-CA", "it-IT", "pt-BR", "pt-PT", "nl-NL",
    "de-DE", "tr-TR", "ru-RU", "ar-AR", "hi-IN", "ja-JP", "ko-KR", "vi-VN", "uk-UA",
)  # fmt: skip
NEMOTRON_3_5_BROAD_COVERAGE = (
    "pl-PL", "sv-SE", "cs-CZ", "nb-NO", "da-DK", "bg-BG", "fi-FI", "hr-HR", "sk-SK", "zh-CN",
    "hu-HU", "ro-RO", "et-EE",
)  # fmt: skip
# Present in the tokenizer only; the card says these need fine-tuning.
NEMOTRON_3_5_ADAPTATION_READY = (
    "el-GR", "lt-LT", "lv-LV", "mt-MT", "sl-SI", "he-IL", "th-TH", "nn-NO",
)  # fmt: skip
NEMOTRON_3_5_LOCALES = (
    NEMOTRON_3_5_TRANSCRIPTION_READY + NEMOTRON_3_5_BROAD_COVERAGE + NEMOTRON_3_5_ADAPTATION_READY
)

# `model_defaults.prompt_dictionary` of the 3.5 checkpoint, verbatim and in file
# order (architecture.md §4.3). Indices 105-127 are unused; most entries past
# the 40 card locales are untrained placeholders. The file quotes 'no': an
# unquoted `no` is the boolean False in YAML 1.1 (ModelConfig.from_nemo repairs it).
NEMOTRON_3_5_PROMPT_DICTIONARY: dict[str, int] = {
    "en-US": 0, "en": 0, "en-GB": 1, "enGB": 1, "es-ES": 2, "esES": 2, "es-US": 3, "es": 3,
    "zh-CN": 4, "zh-ZH": 4, "zh-TW": 5, "hi-IN": 6, "hi": 6, "hi-HI": 6, "ar-AR": 7, "ar": 7,
    "fr-FR": 8, "fr": 8, "de-DE": 9, "de": 9, "ja-JP": 10, "ja-JA": 10, "ru-RU": 11, "ru": 11,
    "pt-BR": 12, "pt-PT": 13, "pt": 13, "ko-KR": 14, "ko": 14, "ko-KO": 14, "it-IT": 15,
    "it": 15, "nl-NL": 16, "nl": 16, "pl-PL": 17, "pl": 17, "tr-TR": 18, "tr": 18, "uk-UA": 19,
    "uk": 19, "ro-RO": 20, "ro": 20, "el-GR": 21, "el": 21, "cs-CZ": 22, "cs": 22, "hu-HU": 23,
    "hu": 23, "sv-SE": 24, "sv": 24, "da-DK": 25, "da": 25, "fi-FI": 26, "fi": 26, "no-NO": 27,
    "no": 27, "nb-NO": 103, "nb": 103, "nn-NO": 104, "nn": 104, "sk-SK": 28, "sk": 28,
    "hr-HR": 29, "hr": 29, "bg-BG": 30, "bg": 30, "lt-LT": 31, "lt": 31, "et-EE": 60, "et": 60,
    "lv-LV": 61, "lv": 61, "sl-SI": 62, "sl": 62, "th-TH": 32, "vi-VN": 33, "id-ID": 34,
    "ms-MY": 35, "bn-IN": 36, "ur-PK": 37, "fa-IR": 38, "ta-IN": 39, "te-IN": 40, "mr-IN": 41,
    "gu-IN": 42, "kn-IN": 43, "ml-IN": 44, "si-LK": 45, "ne-NP": 46, "km-KH": 47, "sw-KE": 48,
    "am-ET": 49, "ha-NG": 50, "zu-ZA": 51, "yo-NG": 52, "ig-NG": 53, "af-ZA": 54, "rw-RW": 55,
    "so-SO": 56, "ny-MW": 57, "ln-CD": 58, "or-KE": 59, "he-IL": 64, "ku-TR": 65, "az-AZ": 66,
    "ka-GE": 67, "hy-AM": 68, "uz-UZ": 69, "tg-TJ": 70, "ky-KG": 71, "qu-PE": 80, "ay-BO": 81,
    "gn-PY": 82, "nah-MX": 83, "mi-NZ": 96, "haw-US": 97, "sm-WS": 98, "to-TO": 99,
    "fr-CA": 100, "auto": 101, "mt-MT": 102,
}  # fmt: skip
NEMOTRON_3_5_PROMPT = PromptConfig(num_prompts=128, dictionary=NEMOTRON_3_5_PROMPT_DICTIONARY)


class LanguageError(ValueError):
    """A language cannot be used with this model."""


class UnknownLanguageError(LanguageError):
    """A language that the model's prompt dictionary does not list."""


def _normalize(key: str) -> str:
    return key.strip().replace("_", "-").casefold()


def resolve_language(language: str | None, prompt: PromptConfig | None) -> int | None:
    """The prompt index for a user-given language.

    Keys match exactly, else case-insensitively with "_" read as "-"
    ("en_us" -> "en-US"). None asks for "auto" if the dictionary has it, else
    for "en-US".

    Args:
        language: a locale ("de-DE"), a short form ("de"), "auto", or None.
        prompt: the model's prompt config; None for a model without a prompt.

    Returns:
        The prompt index, or None for a model without a prompt.

    Raises:
        LanguageError: a language was named for a model without a prompt, or the
            dictionary has neither "auto" nor "en-US" to default to.
        UnknownLanguageError: the dictionary does not list the language.
    """
    if language is not None and not isinstance(language, str):
        raise LanguageError(f"a language must be a string such as 'en-US', not {language!r}")
    if prompt is None:
        if language is None or _normalize(language) == AUTO:
            return None
        raise LanguageError(
            f"language {language!r} was given, but this model has no language prompt: "
            "it transcribes without being told the language (use None or 'auto')"
        )
    dictionary = prompt.dictionary
    if language is None:
        language = AUTO if AUTO in dictionary else DEFAULT_LOCALE
        if language not in dictionary:
            raise LanguageError(
                f"this model's prompt dictionary has neither {AUTO!r} nor {DEFAULT_LOCALE!r}; "
                "name a language: " + ", ".join(supported_languages(prompt))
            )
    if language in dictionary:
        return dictionary[language]
    wanted = _normalize(language)
    indices = {index for key, index in dictionary.items() if _normalize(key) == wanted}
    if len(indices) == 1:
        return indices.pop()
    if indices:
        raise LanguageError(
            f"language {language!r} is ambiguous in this model's prompt dictionary: it matches "
            + ", ".join(sorted(k for k in dictionary if _normalize(k) == wanted))
        )
    raise UnknownLanguageError(
        f"unknown language {language!r}; this model supports: "
        + ", ".join(supported_languages(prompt))
    )


def canonical_locale(index: int, prompt: PromptConfig) -> str | None:
    """The locale that names a prompt index ("en-US" for 0, not "en").

    The first key of the index in dictionary order that has the `xx-XX` form,
    else its first key.

    Args:
        index: a prompt index, e.g. from `resolve_language`.
        prompt: the model's prompt config.

    Returns:
        The locale, or None for the "auto" prompt (the model then tags its
        output with the language it detects).

    Raises:
        LanguageError: no dictionary key has this index.
    """
    keys = [key for key, i in prompt.dictionary.items() if i == index]
    if not keys:
        raise LanguageError(f"prompt index {index} is not in this model's prompt dictionary")
    if AUTO in keys:
        return None
    return next((key for key in keys if LOCALE_FORM.fullmatch(key)), keys[0])


def supported_languages(prompt: PromptConfig) -> list[str]:
    """One locale per prompt index, in dictionary order, then "auto" if present.

    Aliases ("en", "zh-ZH") still resolve but are not listed.
    """
    locales = []
    seen: set[int] = set()
    for index in prompt.dictionary.values():
        if index not in seen:
            seen.add(index)
            locale = canonical_locale(index, prompt)
            if locale is not None:
                locales.append(locale)
    if AUTO in prompt.dictionary:
        locales.append(AUTO)
    return locales
