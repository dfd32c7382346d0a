"""Speech synthesis for the corpus: espeak-ng for all 40 locales, flite for English, augmentation.

Which voice reads a locale (`ESPEAK_VOICES`) was checked against espeak-ng 1.51 (Debian 12):
- fr-CA and nn-NO have no voice of their own: the nearest, fr-fr and nb, read them.
- zh-CN: the `cmn` voice reads most Han characters as their pinyin spelled out in English
  ("们" is heard as "men five"), so the text goes through `pypinyin` (tone numbers) to the
  `cmn-latn-pinyin` voice, which reads pinyin syllables with their tones.
- ja-JP: the `ja` voice reads kana only; a kanji is heard as the English words "Chinese letter".
  `pykakasi` turns the text into its hiragana reading first (readings are sometimes wrong,
  e.g. the particle は read "ha").
- th-TH: the voice reads Thai, but not SARA AM as NFKC writes it (two characters), which is
  joined again for it.
- ko-KR, he-IL, ar-AR, hi-IN read their scripts (Hebrew and Arabic without vowel points,
  so with errors on words they guess wrongly).
Every text is read with `-x`, which prints espeak-ng's phonemes: a language switch there ("(en)"
where the voice met a word it takes for English, or a character it cannot read) means the audio
would not say the transcript, and `synthesize` refuses the item.

Held-out voices: dev and test use voice variants, pitches and speeds that training never uses
(`HELD_OUT_*`), so a test score measures unseen voices as well as unseen sentences.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from caster.audio import resample

SAMPLE_RATE = 16_000
ESPEAK_VOICES: dict[str, str] = {
    "en-US": "en-us", "en-GB": "en-gb", "es-US": "es-419", "es-ES": "es", "fr-FR": "fr-fr",
    "fr-CA": "fr-fr", "it-IT": "it", "pt-BR": "pt-br", "pt-PT": "pt", "nl-NL": "nl",
    "de-DE": "de", "tr-TR": "tr", "ru-RU": "ru", "ar-AR": "ar", "hi-IN": "hi", "ja-JP": "ja",
    "ko-KR": "ko", "vi-VN": "vi", "uk-UA": "uk", "pl-PL": "pl", "sv-SE": "sv", "cs-CZ": "cs",
    "nb-NO": "nb", "da-DK": "da", "bg-BG": "bg", "fi-FI": "fi", "hr-HR": "hr", "sk-SK": "sk",
    "zh-CN": "cmn-latn-pinyin", "hu-HU": "hu", "ro-RO": "ro", "et-EE": "et", "el-GR": "el",
    "lt-LT": "lt", "lv-LV": "lv", "mt-MT": "mt", "sl-SI": "sl", "he-IL": "he", "th-TH": "th",
    "nn-NO": "nb",
}  # fmt: skip
# flite's voices are English only; awb is a Scottish speaker, so it reads en-GB.
FLITE_VOICES: dict[str, tuple[str, ...]] = {"en-US": ("rms", "kal16", "slt"), "en-GB": ("awb",)}
HELD_OUT_FLITE = frozenset({"slt"})

# espeak-ng's voice variants (`-v de+f3`), pitch (`-p`, 0-99) and speed (`-s`, words/min):
# training draws from the first tuples, dev and test from the held-out ones.
TRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m6", "f1", "f2", "f4")
HELD_OUT_VARIANTS = ("m4", "m7", "f3", "f5")
TRAIN_PITCHES = (30, 40, 50, 60, 70)
HELD_OUT_PITCHES = (35, 55, 65)
TRAIN_SPEEDS = (130, 150, 170, 190)
HELD_OUT_SPEEDS = (140, 160, 180)
# flite: duration stretch (1 = its natural speed) and mean f0 in Hz.
TRAIN_STRETCH = (0.85, 1.0, 1.15)
HELD_OUT_STRETCH = (0.92, 1.08)

_LANGUAGE_SWITCH = re.compile(r"\(([a-z]{2,3}(?:-[a-z0-9]+)?)\)")
_TIMEOUT_S = 60


class SynthesisError(ValueError):
    """A synthesizer is missing, failed, or would not say the text as written."""


@dataclass(frozen=True)
class Voice:
    """One synthesizer setting.

    engine:  "espeak" or "flite"
    name:    espeak-ng voice ("de") or flite voice ("slt")
    variant: espeak-ng variant ("f3"), "" for flite
    pitch:   espeak-ng pitch 0-99, 0 for flite
    speed:   espeak-ng words per minute, or flite duration stretch x 100
    """

    engine: str
    name: str
    variant: str
    pitch: int
    speed: int

    def key(self) -> str:
        """A stable text form, used in item seeds and ids."""
        return f"{self.engine}:{self.name}+{self.variant}:p{self.pitch}:s{self.speed}"


def pick_voice(locale: str, engine: str, held_out: bool, rng: np.random.Generator) -> Voice:
    """Draw a voice setting for one item.

    Args:
        locale: one of `ESPEAK_VOICES`.
        engine: "espeak", or "flite" for a locale in `FLITE_VOICES`.
        held_out: draw from the settings reserved for dev and test.
        rng: the item's generator.

    Raises:
        SynthesisError: the engine has no voice for the locale.
    """
    if engine == "espeak":
        variants = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS
        pitches = HELD_OUT_PITCHES if held_out else TRAIN_PITCHES
        speeds = HELD_OUT_SPEEDS if held_out else TRAIN_SPEEDS
        return Voice(
            "espeak",
            ESPEAK_VOICES[locale],
            str(rng.choice(variants)),
            int(rng.choice(pitches)),
            int(rng.choice(speeds)),
        )
    if engine == "flite" and locale in FLITE_VOICES:
        names = [v for v in FLITE_VOICES[locale] if (v in HELD_OUT_FLITE) == held_out]
        if not names:
            # A locale with one flite voice uses it everywhere, told apart by its speed.
            names = list(FLITE_VOICES[locale])
        stretches = HELD_OUT_STRETCH if held_out else TRAIN_STRETCH
        return Voice("flite", str(rng.choice(names)), "", 0, round(100 * rng.choice(stretches)))
    raise SynthesisError(f"engine {engine!r} has no voice for {locale}")


def require_tool(name: str) -> str:
    """The path of a synthesizer binary.

    Raises:
        SynthesisError: it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        raise SynthesisError(f"{name} is not installed (run scripts/install_corpus_tools.sh)")
    return path


def spoken_form(text: str, locale: str) -> str:
    """What the synthesizer is given for a transcript (see the module docstring).

    zh-CN becomes pinyin with tone numbers, ja-JP its hiragana reading, th-TH gets its SARA AM
    back (NFKC splits it); others are unchanged.
    """
    if locale == "zh-CN":
        import pypinyin

        syllables = pypinyin.lazy_pinyin(
            text, style=pypinyin.Style.TONE3, neutral_tone_with_five=True, v_to_u=False
        )
        spoken = " ".join(syllables)
        return spoken.translate(str.maketrans("。，、？！：；", ".,,?!:;"))
    if locale == "th-TH":
        # NFKC splits SARA AM into NIKHAHIT + SARA AA, which espeak-ng cannot read.
        return text.replace("\u0e4d\u0e32", "\u0e33")
    if locale == "ja-JP":
        import pykakasi

        return "".join(part["hira"] for part in pykakasi.kakasi().convert(text))
    return text


def synthesize(text: str, locale: str, voice: Voice) -> np.ndarray:
    """Speak a transcript with one voice setting.

    Args:
        text: the normalised transcript.
        locale: its locale.
        voice: from `pick_voice`.

    Returns:
        Mono float32 samples at 16 kHz, leading and trailing silence trimmed to 0.1 s.

    Raises:
        SynthesisError: the tool is missing or fails, produces no sound, or (espeak-ng) switches
            language somewhere in the text.
    """
    spoken = spoken_form(text, locale)
    with tempfile.TemporaryDirectory(prefix="caster-synth-") as tmp:
        wav = Path(tmp) / "out.wav"
        if voice.engine == "espeak":
            command = [
                require_tool("espeak-ng"), "-x", "-v", f"{voice.name}+{voice.variant}",
                "-p", str(voice.pitch), "-s", str(voice.speed), "-w", str(wav), "--", spoken,
            ]  # fmt: skip
        elif voice.engine == "flite":
            command = [
                require_tool("flite"), "-voice", voice.name,
                "--setf", f"duration_stretch={voice.speed / 100:.2f}",
                "-t", spoken, "-o", str(wav),
            ]  # fmt: skip
        else:
            raise SynthesisError(f"unknown engine {voice.engine!r}")
        try:
            done = subprocess.run(command, capture_output=True, timeout=_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SynthesisError(f"{voice.engine} failed on {text!r}: {e}") from e
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise SynthesisError(f"{voice.engine} failed on {text!r}: {message}")
        if voice.engine == "espeak":
            switches = set(_LANGUAGE_SWITCH.findall(done.stdout.decode(errors="replace")))
            if switches:
                raise SynthesisError(
                    f"espeak-ng voice {voice.name} switches to {sorted(switches)} in {text!r}"
                )
        try:
            samples, rate = sf.read(io.BytesIO(wav.read_bytes()), dtype="float32")
        except (OSError, sf.LibsndfileError) as e:
            raise SynthesisError(f"{voice.engine} wrote no readable audio for {text!r}") from e
    if samples.ndim != 1:
        samples = samples.mean(axis=1)
    audio = resample(samples.astype(np.float32), rate, SAMPLE_RATE)
    return trim_silence(audio, text)


def trim_silence(audio: np.ndarray, what: str, keep_s: float = 0.1) -> np.ndarray:
    """Cut leading and trailing silence (below -50 dBFS) down to `keep_s` seconds.

    Raises:
        SynthesisError: the audio is silent throughout.
    """
    loud = np.flatnonzero(np.abs(audio) > 10 ** (-50 / 20))
    if loud.size == 0:
        raise SynthesisError(f"silent audio for {what!r}")
    keep = round(keep_s * SAMPLE_RATE)
    return audio[max(0, loud[0] - keep) : loud[-1] + 1 + keep]
