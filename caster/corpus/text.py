"""Sentences for the corpus: human-written text that registry packages ship, normalised per locale.

Sources, all installed by `scripts/install_corpus_tools.sh`, none fetched at run time:
- `django`: the translation catalogs (`django/**/locale/<ll>/LC_MESSAGES/django.po`, read with
  `polib`). English sentences are the catalogs' msgids, other locales their msgstrs.
- `udhr`: the Universal Declaration of Human Rights excerpts of `gflanguages`' sample texts.
- `chatterbot`: the dialog lines of `chatterbot-corpus`.
- `fortunes`: Debian's fortune cookies (`fortunes`, `fortunes-de`, ...).
- `numbers`: integers spelled out by `num2words`, as cardinals, ordinals and years.

Normalisation (`normalize_text`) gives the text the model should output: Unicode NFKC (the
composed form, NFC, with compatibility characters folded as the model's `nmt_nfkc` tokenizer
folds them, so a transcript is exactly what the model can emit), cased and punctuated as
written, typographic quotes removed and apostrophes made ASCII, no space before punctuation
(NeMo's decoding deletes it, so with none a transcript survives encoding and decoding), no
quotation marks or Spanish inverted marks, whitespace collapsed, "。" ending zh/ja sentences,
digits spelled out with `num2words` in the locale's language (a sentence with digits in a
locale num2words lacks is dropped). A sentence with letters outside the locale's scripts or
with symbols nobody speaks (`%`, `#`, `@`, `/`, markup) is dropped.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

FORTUNES = Path("/usr/share/games/fortunes")
# libyaml's loader when PyYAML has it: the pure-Python one is several times slower.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
TEXT_SOURCES = ("django", "udhr", "chatterbot", "fortunes", "numbers")

# Punctuation kept in transcripts; any other punctuation or symbol drops the sentence.
_COMMON_PUNCT = frozenset(".,?!'-:;")
_EXTRA_PUNCT = {
    "zh": "。、",
    "ja": "。、・",
    "ar": "،؟؛",
    "hi": "।",
    "he": "״׳",
}
# Removed before checking: quotes, and the Spanish inverted marks, which NeMo's decoding would
# glue to the word before them ("estás?¡Hola!"); typographic apostrophes become ASCII.
_DROPPED = str.maketrans({c: None for c in '"“”„‟«»‹›「」『』¿¡'} | {"‘": "'", "’": "'", "ʼ": "'"})
_DASHES = re.compile(r"\s+[-–—]+\s+")
_OPENING_QUOTE = re.compile(r"(^|\s)'(?=\w)")
_CLOSING_QUOTE = re.compile(r"(?<=\w)'(?=[\s,.?!:;]|$)")
_DIGITS = re.compile(r"\d+")
# "mp3", "1st", "3.5", "10:30": digits with no single reading in words.
_DIGIT_IN_WORD = re.compile(r"[^\W\d]\d|\d[^\W\d]|\d[.,:/]\d")
_DIGIT_IN_NUMBER = re.compile(r"\d[.,:/]\d")
_SPACES = re.compile(r"\s+")
_DOTTED_WORD = re.compile(r"[^\W\d_]\.[^\W\d_]")
# "Hallo,wie geht's?": a space belongs after a comma or sentence end followed by a letter.
_MISSING_SPACE = re.compile(r"([,.?!;:])(?=[^\W\d_])")
_SENTENCE_END = ".?!。？！।؟"
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th"})
# How a number said alone ends, by num2words language: Thai writes no full stop.
_NUMBER_END = {"ja": "。", "th": ""}
# Chinese and Japanese end sentences with "。" (NFKC keeps it; their other full-width marks,
# "，？！", become ASCII under NFKC, as the model's tokenizer writes them).
_FULL_STOP = {"zh": "。", "ja": "。"}
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([^\w\s])")


class TextSourceError(ValueError):
    """A text source is missing or unreadable."""


@dataclass(frozen=True)
class LocaleText:
    """Where a locale's text comes from and how it is checked.

    scripts:    Unicode script names (first word of a character name) its letters may use
    django:     Django catalog folder names, "" for English msgids
    udhr:       gflanguages key
    chatterbot: chatterbot-corpus data folder
    fortunes:   paths under /usr/share/games/fortunes (files or folders)
    num2words:  num2words language code, None where num2words has none
    """

    scripts: tuple[str, ...]
    django: tuple[str, ...] = ()
    udhr: str | None = None
    chatterbot: str | None = None
    fortunes: tuple[str, ...] = ()
    num2words: str | None = None


_LATIN = ("LATIN",)
_EN_FORTUNES = ("fortunes", "wisdom", "platitudes", "people", "literature", "science", "work",
                "love", "food", "education", "kids", "pets", "riddles", "humorists", "law",
                "medicine", "miscellaneous", "sports")  # fmt: skip

LOCALE_TEXT: dict[str, LocaleText] = {
    "en-US": LocaleText(_LATIN, ("",), "en_Latn", "english", _EN_FORTUNES, "en"),
    "en-GB": LocaleText(_LATIN, ("en_GB", ""), "en_Latn", "english", _EN_FORTUNES, "en"),
    "es-US": LocaleText(_LATIN, ("es_MX", "es_CO", "es_AR"), "es_Latn", "spanish", ("es",), "es"),
    "es-ES": LocaleText(_LATIN, ("es",), "es_Latn", "spanish", ("es",), "es"),
    "fr-FR": LocaleText(_LATIN, ("fr",), "fr_Latn", "french", (), "fr"),
    "fr-CA": LocaleText(_LATIN, ("fr_CA", "fr"), "fr_Latn", "french", (), "fr"),
    "it-IT": LocaleText(_LATIN, ("it",), "it_Latn", "italian", ("it",), "it"),
    "pt-BR": LocaleText(_LATIN, ("pt_BR",), "pt_Latn", "portuguese", ("brasil",), "pt_BR"),
    "pt-PT": LocaleText(_LATIN, ("pt",), "pt_Latn", None, (), "pt"),
    "nl-NL": LocaleText(_LATIN, ("nl",), "nl_Latn", "dutch", (), "nl"),
    "de-DE": LocaleText(_LATIN, ("de",), "de_Latn", "german", ("de",), "de"),
    "tr-TR": LocaleText(_LATIN, ("tr",), "tr_Latn", "turkish", (), "tr"),
    "ru-RU": LocaleText(("CYRILLIC",), ("ru",), "ru_Cyrl", "russian", ("ru",), "ru"),
    "ar-AR": LocaleText(("ARABIC",), ("ar",), "ar_Arab", None, (), "ar"),
    "hi-IN": LocaleText(("DEVANAGARI",), ("hi",), "hi_Deva", "hindi", (), None),
    "ja-JP": LocaleText(
        ("CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"),
        ("ja",),
        "ja_Jpan",
        "japanese",
        (),
        "ja",
    ),
    "ko-KR": LocaleText(("HANGUL",), ("ko",), "ko_Kore", "korean", (), "ko"),
    "vi-VN": LocaleText(_LATIN, ("vi",), "vi_Latn", None, (), "vi"),
    "uk-UA": LocaleText(("CYRILLIC",), ("uk",), "uk_Cyrl", "ukrainian", (), "uk"),
    "pl-PL": LocaleText(_LATIN, ("pl",), "pl_Latn", None, ("pl",), "pl"),
    "sv-SE": LocaleText(_LATIN, ("sv",), "sv_Latn", "swedish", (), "sv"),
    "cs-CZ": LocaleText(_LATIN, ("cs",), "cs_Latn", None, ("cs",), "cs"),
    "nb-NO": LocaleText(_LATIN, ("nb",), "nb_Latn", None, (), "no"),
    "da-DK": LocaleText(_LATIN, ("da",), "da_Latn", None, (), "da"),
    "bg-BG": LocaleText(("CYRILLIC",), ("bg",), "bg_Cyrl", None, ("bg",), None),
    "fi-FI": LocaleText(_LATIN, ("fi",), "fi_Latn", None, (), "fi"),
    "hr-HR": LocaleText(_LATIN, ("hr",), "hr_Latn", None, (), None),
    "sk-SK": LocaleText(_LATIN, ("sk",), "sk_Latn", None, ("sk",), "sk"),
    "zh-CN": LocaleText(("CJK",), ("zh_Hans",), "zh_Hans", "chinese", (), None),
    "hu-HU": LocaleText(_LATIN, ("hu",), "hu_Latn", None, (), "hu"),
    "ro-RO": LocaleText(_LATIN, ("ro",), "ro_Latn", None, (), "ro"),
    "et-EE": LocaleText(_LATIN, ("et",), "et_Latn", None, (), None),
    "el-GR": LocaleText(("GREEK",), ("el",), "el_Grek", None, (), None),
    "lt-LT": LocaleText(_LATIN, ("lt",), "lt_Latn", None, (), "lt"),
    "lv-LV": LocaleText(_LATIN, ("lv",), "lv_Latn", None, (), "lv"),
    "mt-MT": LocaleText(_LATIN, (), "mt_Latn", None, (), None),
    "sl-SI": LocaleText(_LATIN, ("sl",), "sl_Latn", None, (), "sl"),
    "he-IL": LocaleText(("HEBREW",), ("he",), "he_Hebr", "hebrew", (), "he"),
    "th-TH": LocaleText(("THAI",), ("th",), "th_Thai", "thai", (), "th"),
    "nn-NO": LocaleText(_LATIN, ("nn",), "nn_Latn", None, (), "no"),
}


@dataclass(frozen=True)
class Sentence:
    """A normalised sentence and the source it came from ("django", "udhr", ...)."""

    text: str
    source: str


def language_of(locale: str) -> str:
    """The language part of a locale: "de" for "de-DE"."""
    return locale.split("-")[0]


def normalize_text(text: str, locale: str, *, require_sentence: bool = True) -> str | None:
    """The transcript the model should output for `text`, or None when it cannot be one.

    Args:
        text: raw text from a source.
        locale: one of `LOCALE_TEXT`, e.g. "de-DE".
        require_sentence: also demand a sentence form: starting with an upper-case letter
            (in cased scripts) and ending in sentence punctuation (not for Thai, which has
            none), between 2 and 30 words (4 to 60 characters in zh/ja/th).

    Returns:
        The NFKC text with digits spelled out, or None when it has characters the locale
        cannot have, symbols, markup, dotted words (addresses, abbreviations), or digits
        num2words cannot spell in this language.

    Raises:
        KeyError: an unknown locale.
    """
    spec = LOCALE_TEXT[locale]
    language = language_of(locale)
    text = unicodedata.normalize("NFKC", text).translate(_DROPPED)
    text = _SPACES.sub(" ", text).strip()
    # "www.example.com", "z.B.", "e.g.": not read as written.
    if _DOTTED_WORD.search(text):
        return None
    # A dash between words is a pause: nothing after a sentence end, else a comma.
    text = _DASHES.sub(", ", re.sub(r"([.?!])\s+[-–—]+\s+", r"\1 ", text))
    # Single quotes used as quotation marks go; apostrophes inside words stay.
    if _OPENING_QUOTE.search(text):
        text = _CLOSING_QUOTE.sub("", _OPENING_QUOTE.sub(r"\1", text))
    if language in _FULL_STOP:
        text = re.sub(r"\.\s*", _FULL_STOP[language], text)
    elif language not in _NO_SPACE_LANGUAGES:
        text = _MISSING_SPACE.sub(r"\1 ", text)
    # A cut-off prompt ("... participants") keeps its words, not its leading dots.
    text = text.lstrip(".,;:- ")
    if _DIGITS.search(text):
        text = _spell_digits(text, spec.num2words, language)
        if text is None:
            return None
    if not text or not _characters_allowed(text, spec.scripts, language):
        return None
    # NeMo's RNNT decoding deletes the space before any punctuation mark of the vocabulary
    # (French "sûr ?" comes out "sûr?"): a transcript has none, so decoding gives it back.
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    if require_sentence and not _is_sentence(text, language):
        return None
    return text


def sentences(locale: str, sources: tuple[str, ...] = TEXT_SOURCES) -> list[Sentence]:
    """All usable sentences of a locale, normalised, deduplicated, sorted by text.

    Args:
        locale: one of `LOCALE_TEXT`.
        sources: which of `TEXT_SOURCES` to read.

    Raises:
        TextSourceError: an unknown source, or a package the locale needs is not installed.
        KeyError: an unknown locale.
    """
    spec = LOCALE_TEXT[locale]
    unknown = set(sources) - set(TEXT_SOURCES)
    if unknown:
        raise TextSourceError(f"unknown text sources {sorted(unknown)}; known: {TEXT_SOURCES}")
    readers = {
        "django": lambda: _django_texts(spec.django),
        "udhr": lambda: _udhr_texts(spec.udhr),
        "chatterbot": lambda: _chatterbot_texts(spec.chatterbot),
        "fortunes": lambda: _fortune_texts(spec.fortunes),
        "numbers": lambda: _number_texts(spec.num2words),
    }
    found: dict[str, str] = {}
    for source in sources:
        for raw in readers[source]():
            # A number alone is no sentence, but it is all that is said: keep it.
            text = normalize_text(raw, locale, require_sentence=source != "numbers")
            if text is not None:
                found.setdefault(text, source)
    return [Sentence(text, found[text]) for text in sorted(found)]


def _spell_digits(text: str, lang: str | None, language: str) -> str | None:
    if lang is None:
        return None
    # Without spaces between words, digits touch letters in ordinary text ("25歳").
    pattern = _DIGIT_IN_NUMBER if language in _NO_SPACE_LANGUAGES else _DIGIT_IN_WORD
    if pattern.search(text):
        return None
    words = [_num2words(int(m.group()), lang, "cardinal") for m in _DIGITS.finditer(text)]
    if None in words:
        return None
    spelled = iter(words)
    return _DIGITS.sub(lambda _: next(spelled), text)


def _characters_allowed(text: str, scripts: tuple[str, ...], language: str) -> bool:
    punct = _COMMON_PUNCT | frozenset(_EXTRA_PUNCT.get(language, ""))
    for ch in text:
        if ch == " " or ch in punct:
            continue
        category = unicodedata.category(ch)
        if category[0] in "LM":
            name = unicodedata.name(ch, "")
            if name.split(" ")[0] not in scripts:
                return False
        else:
            return False
    return True


def _is_sentence(text: str, language: str) -> bool:
    if language in _NO_SPACE_LANGUAGES:
        if not 4 <= len(text) <= 60:
            return False
    elif not 2 <= len(text.split()) <= 30:
        return False
    if language != "th" and text[-1] not in _SENTENCE_END:
        return False
    first = next((ch for ch in text if ch.isalpha()), "")
    # Uncased scripts have no upper case to demand.
    return first.upper() == first.lower() or first.isupper()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError(
            f"Python package {name!r} is not installed (run scripts/install_corpus_tools.sh)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _django_texts(folders: tuple[str, ...]) -> Iterator[str]:
    if not folders:
        return
    import polib

    root = _package_dir("django")
    for folder in folders:
        # English is Django's source language: its sentences are the msgids of any catalog.
        pattern = f"**/locale/{folder or 'fr'}/LC_MESSAGES/django.po"
        for path in sorted(root.glob(pattern)):
            try:
                catalog = polib.pofile(str(path))
            except (OSError, ValueError) as e:
                raise TextSourceError(f"unreadable Django catalog {path}: {e}") from e
            for entry in catalog:
                if entry.obsolete or entry.fuzzy or entry.msgid_plural:
                    continue
                yield entry.msgid if not folder else entry.msgstr


def _udhr_texts(key: str | None) -> Iterator[str]:
    if key is None:
        return
    languages = _gflanguages()
    if key not in languages:
        raise TextSourceError(f"gflanguages has no language {key!r}")
    sample = languages[key].sample_text
    for field in ("tester", "specimen_36", "specimen_48", "poster_md"):
        yield from re.split(r"(?<=[.!?。।؟])\s*", getattr(sample, field, ""))


@functools.cache
def _gflanguages() -> dict:
    _package_dir("gflanguages")
    import gflanguages

    # Parses some 1,700 language records: once per process.
    return gflanguages.LoadLanguages()


def _chatterbot_texts(folder: str | None) -> Iterator[str]:
    if folder is None:
        return
    root = _package_dir("chatterbot_corpus") / "data" / folder
    for path in sorted(root.glob("*.yml")):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise TextSourceError(f"unreadable chatterbot file {path}: {e}") from e
        for conversation in (data or {}).get("conversations") or []:
            for line in conversation if isinstance(conversation, list) else []:
                if isinstance(line, str):
                    yield line


def _fortune_texts(names: tuple[str, ...]) -> Iterator[str]:
    for name in names:
        path = FORTUNES / name
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for file in files:
            if file.suffix in (".dat", ".u8") or not file.is_file():
                continue
            try:
                data = file.read_bytes()
                if file.suffix == ".gz":
                    data = gzip.decompress(data)
                content = data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # some fortune files are in legacy 8-bit encodings: not worth guessing
            for cookie in re.split(r"^%$", content, flags=re.M):
                # Attribution lines ("-- Mark Twain") are not part of what is said.
                lines = [ln for ln in cookie.splitlines() if not re.match(r"\s*(--|—)", ln)]
                yield " ".join(lines)


def _number_texts(lang: str | None) -> Iterator[str]:
    if lang is None:
        return
    values = [*range(0, 21), 30, 42, 57, 99, 100, 101, 365, 512, 1000, 1999, 2024, 10_000, 65_536]
    for value in values:
        for to in ("cardinal", "ordinal", "year"):
            words = _num2words(value, lang, to)
            if words is not None:
                yield words[:1].upper() + words[1:] + _NUMBER_END.get(lang, ".")


def _num2words(value: int, lang: str, to: str) -> str | None:
    from num2words import num2words

    try:
        return num2words(value, lang=lang, to=to)
    # num2words lacks some forms in some languages, each failing in its own way
    # (NotImplementedError, AttributeError, IndexError, ...): a number it cannot spell is skipped.
    except Exception:
        return None
