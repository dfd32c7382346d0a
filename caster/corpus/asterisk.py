"""Real recorded speech: Debian's Asterisk core prompts, G.722 at 16 kHz, with transcripts.

`asterisk-core-sounds-<ll>-g722` ships the recordings under /usr/share/asterisk/sounds/<voice>/,
`asterisk-core-sounds-<ll>` the transcripts (`core-sounds-<ll>.txt.gz` in its doc folder, one
"name: text" line per prompt). Lines that are wholly or partly in brackets ("[beep tone]") are
not speech and are dropped, and so are lines with a "?" before their end (mojibake in the
Italian file, where "?" stands for a lost accented letter); digits are spelled out by
`caster.corpus.text.normalize_text`, which also drops prompts with symbols ("press * to ...").

Split by a fixed rule on the prompt name, so a prompt never moves between splits:
the first hex digit of sha1(name) is 0-2 for test, 3 for dev, 4-f for train.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caster.corpus.text import normalize_text

SOUNDS = Path("/usr/share/asterisk/sounds")
DOCS = Path("/usr/share/doc")
# Debian package language -> (caster locale, voice folder). The recordings are US English,
# Mexican Spanish (nearest of the 40: es-US), Canadian French, Italian and Russian.
ASTERISK_VOICES: dict[str, tuple[str, str]] = {
    "en": ("en-US", "en_US_f_Allison"),
    "es": ("es-US", "es_MX_f_Allison"),
    "fr": ("fr-CA", "fr_CA_f_June"),
    "it": ("it-IT", "it_IT_m_Carlo"),
    "ru": ("ru-RU", "ru_RU_f_IvrvoiceRU"),
}
MAX_G722_BYTES = 8 << 20  # 8 MiB = 131 s at 64 kbit/s; the longest prompt is far shorter


class AsteriskError(ValueError):
    """A transcript file or a recording is missing or unreadable."""


@dataclass(frozen=True)
class Prompt:
    """One recorded prompt: its name ("vm-intro", "digits/1"), locale, transcript and file."""

    name: str
    locale: str
    text: str
    path: Path


def prompt_split(name: str) -> str:
    """The split of a prompt: "test", "dev" or "train", from the first hex digit of sha1(name)."""
    first = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[0], 16)
    return "test" if first <= 2 else "dev" if first == 3 else "train"


def locales() -> dict[str, str]:
    """Locale -> Debian package language for the Asterisk recordings ("en-US" -> "en")."""
    return {locale: language for language, (locale, _) in ASTERISK_VOICES.items()}


def prompts(locale: str) -> list[Prompt]:
    """The usable prompts of a locale, sorted by name.

    Args:
        locale: one of the locales of `ASTERISK_VOICES` ("en-US", "es-US", "fr-CA", "it-IT",
            "ru-RU").

    Raises:
        AsteriskError: the locale has no recordings, or its packages are not installed.
    """
    language = locales().get(locale)
    if language is None:
        raise AsteriskError(f"no Asterisk recordings for {locale}; they exist for {locales()}")
    voice_dir = SOUNDS / ASTERISK_VOICES[language][1]
    transcripts = DOCS / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"
    if not voice_dir.is_dir() or not transcripts.is_file():
        raise AsteriskError(
            f"asterisk-core-sounds-{language} and asterisk-core-sounds-{language}-g722 are not "
            "installed (run scripts/install_corpus_tools.sh)"
        )
    try:
        # utf-8-sig: the Italian file starts with a byte-order mark.
        lines = gzip.decompress(transcripts.read_bytes()).decode("utf-8-sig").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise AsteriskError(f"unreadable transcripts {transcripts}: {e}") from e
    found = {}
    for line in lines:
        name, sep, raw = line.partition(":")
        name = name.strip()
        if not sep or not name or line.startswith(";") or "[" in raw or "]" in raw:
            continue
        # The Italian transcripts lost some accented letters to "?" ("non ? attiva" for
        # "non è attiva"); a question mark before the end is one of those.
        if "?" in raw.strip().rstrip("?.").rstrip():
            continue
        path = voice_dir / f"{name}.g722"
        # A name with ".." or an absolute path must not reach outside the voice folder.
        if ".." in Path(name).parts or not path.resolve().is_relative_to(voice_dir.resolve()):
            continue
        text = normalize_text(raw, locale, require_sentence=False)
        if text is not None and path.is_file():
            found[name] = Prompt(name, locale, text, path)
    return [found[name] for name in sorted(found)]


def decode_g722(path: Path) -> np.ndarray:
    """Decode a raw G.722 file (64 kbit/s, 16 kHz) to mono float32 samples, (N,).

    Raises:
        AsteriskError: the file is unreadable, empty or too large, or the decoder is missing.
    """
    try:
        import G722
    except ImportError as e:
        raise AsteriskError(
            "the g722 package is not installed (run scripts/install_corpus_tools.sh)"
        ) from e
    try:
        size = path.stat().st_size
        if not 0 < size <= MAX_G722_BYTES:
            raise AsteriskError(f"{path}: {size} bytes is not a prompt recording")
        data = path.read_bytes()
    except OSError as e:
        raise AsteriskError(f"unreadable recording {path}: {e}") from e
    pcm = np.asarray(G722.G722(16_000, 64_000).decode(data), dtype=np.int16)  # (2 * bytes,)
    return pcm.astype(np.float32) / 32768.0
