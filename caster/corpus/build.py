"""Plan and build the corpus: items, splits, parallel rendering, NeMo manifests.

Layout of a build in OUT:
    OUT/{train,dev,test}/<locale>.jsonl       NeMo manifests, one line per utterance
    OUT/audio/<locale>/<split>/<id>.flac      16 kHz mono FLAC
    OUT/build.json                            settings, counts and skips of the last build

A manifest line has `audio_filepath` (relative to the manifest), `duration`, `text`, `lang`
(the locale), and what made it: `source` (text source, or "asterisk"), `voice` (synthesizer
settings, or the recording's prompt name) and `augment` (applied settings, absent if none).

Splits hold out sentences and voices. A synthesized sentence's split comes from its text alone
(the first hex digit of sha1(casefolded text): 0 test, 1 dev, else train), so it is the same in
every locale (en-US and en-GB share sentences); an Asterisk prompt's from its name
(`caster.corpus.asterisk.prompt_split`). Any train item whose casefolded text is also in a dev
or test item is then dropped. Dev and test voices use settings training never uses
(`caster.corpus.synth.HELD_OUT_*`). The Asterisk recordings have one speaker per language: their
dev and test hold out prompts only, and are not augmented (clean real speech).

Determinism: every random choice of an item comes from a seed hashed from the build seed, the
locale, the text and the voice settings, so the result does not depend on worker order.
Resuming: an item whose audio file exists and decodes is not rendered again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from caster.audio import AudioError, load_audio
from caster.corpus import asterisk
from caster.corpus.augment import Augmentation, apply_augmentation, draw_augmentation
from caster.corpus.synth import (
    FLITE_VOICES,
    SAMPLE_RATE,
    SynthesisError,
    Voice,
    pick_voice,
    synthesize,
)
from caster.corpus.text import LOCALE_TEXT, TEXT_SOURCES, sentences

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
ENGINES = ("espeak", "flite", "asterisk")


class CorpusError(ValueError):
    """Unusable build settings."""


@dataclass(frozen=True)
class BuildConfig:
    """What to build.

    out:                 output folder
    locales:             locales of `caster.languages.NEMOTRON_3_5_LOCALES`
    engines:             "espeak", "flite" (English only), "asterisk" (real recordings)
    text_sources:        of `caster.corpus.text.TEXT_SOURCES`, for the synthesized items
    max_per_split:       at most this many sentences (and prompts) per locale, split and
                         engine, chosen by seeded hash; None for all
    voices_per_sentence: synthesized versions of each training sentence (dev/test get one)
    seed:                build seed
    workers:             processes rendering audio; 0 renders in this process
    augment:             add reverberation and noise (never to Asterisk dev/test)
    max_duration_s:      longer utterances are skipped
    progress:            show a tqdm progress bar
    """

    out: Path
    locales: tuple[str, ...]
    engines: tuple[str, ...] = ENGINES
    text_sources: tuple[str, ...] = TEXT_SOURCES
    max_per_split: int | None = None
    voices_per_sentence: int = 1
    seed: int = 0
    workers: int = 2
    augment: bool = True
    max_duration_s: float = 20.0
    progress: bool = True


@dataclass(frozen=True)
class Item:
    """One utterance to render.

    id:           stable id, also the audio file's stem
    locale:       e.g. "de-DE"
    split:        "train", "dev" or "test"
    text:         the transcript
    source:       text source ("django", ...) or "asterisk"
    voice:        synthesizer settings; None for a recording
    recording:    the G.722 file of a recording; None for synthesized speech
    prompt:       the recording's prompt name; "" for synthesized speech
    seed:         the item's random seed
    augmentation: what is done to the audio; None for nothing
    """

    id: str
    locale: str
    split: str
    text: str
    source: str
    voice: Voice | None
    recording: Path | None
    prompt: str
    seed: int
    augmentation: Augmentation | None

    @property
    def audio_path(self) -> Path:
        """The audio file, relative to the build folder."""
        return Path("audio") / self.locale / self.split / f"{self.id}.flac"


@dataclass
class BuildReport:
    """What a build made: manifest lines per (split, locale), skips by reason, reused files."""

    lines: dict[tuple[str, str], int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    reused: int = 0
    rendered: int = 0


def sentence_split(text: str) -> str:
    """The split of a synthesized sentence: first hex digit of sha1(casefolded text),
    0 test, 1 dev, else train."""
    first = int(_sha1(text.casefold())[0], 16)
    return "test" if first == 0 else "dev" if first == 1 else "train"


def plan(config: BuildConfig) -> list[Item]:
    """The items of a build, in a fixed order (by locale, then id).

    Raises:
        CorpusError: unknown locales or engines, or non-positive counts.
        TextSourceError, AsteriskError: a source the build needs is not installed.
    """
    _check(config)
    items: list[Item] = []
    for locale in config.locales:
        if "espeak" in config.engines or "flite" in config.engines:
            items += _synthesized_items(config, locale)
        if "asterisk" in config.engines and locale in asterisk.locales():
            items += _recorded_items(config, locale)
    held = {item.text.casefold() for item in items if item.split != "train"}
    # Two copies of a training sentence may draw the same voice: one item per id.
    kept = {
        item.id: item for item in items if item.split != "train" or item.text.casefold() not in held
    }
    return sorted(kept.values(), key=lambda item: (item.locale, item.id))


def build(config: BuildConfig) -> BuildReport:
    """Plan, render (in parallel, resuming) and write the manifests of a build.

    Raises:
        CorpusError: unusable settings.
        TextSourceError, AsteriskError, SynthesisError: a tool or source is not installed.
    """
    items = plan(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport()
    manifests: dict[tuple[str, str], list[dict]] = {}
    for item, duration, outcome in _render_all(items, out, config):
        if duration is None:
            report.skipped[outcome] += 1
            continue
        report.reused += outcome == "reused"
        report.rendered += outcome == "rendered"
        manifests.setdefault((item.split, item.locale), []).append(_manifest_line(item, duration))
    for split in SPLITS:
        for locale in config.locales:
            lines = manifests.get((split, locale), [])
            _write_jsonl(out / split / f"{locale}.jsonl", lines)
            report.lines[(split, locale)] = len(lines)
    summary = {
        "seed": config.seed,
        "locales": list(config.locales),
        "engines": list(config.engines),
        "text_sources": list(config.text_sources),
        "max_per_split": config.max_per_split,
        "voices_per_sentence": config.voices_per_sentence,
        "augment": config.augment,
        "lines": {f"{s}/{loc}": n for (s, loc), n in sorted(report.lines.items())},
        "skipped": dict(sorted(report.skipped.items())),
    }
    _write_text(out / "build.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return report


def render(item: Item, out: Path, max_duration_s: float) -> tuple[float | None, str]:
    """Make one item's audio file unless a valid one exists.

    Returns:
        (duration in seconds, "rendered" or "reused"), or (None, skip reason).
    """
    path = out / item.audio_path
    if path.exists():
        try:
            return len(load_audio(path, SAMPLE_RATE)) / SAMPLE_RATE, "reused"
        except AudioError:
            logger.info("re-rendering %s: its audio does not decode", path)
    try:
        if item.voice is not None:
            audio = synthesize(item.text, item.locale, item.voice)
        else:
            audio = asterisk.decode_g722(item.recording)
    except SynthesisError as e:
        reason = "language switch" if "switches to" in str(e) else "synthesis failed"
        logger.info("skipping %s: %s", item.id, e)
        return None, f"{item.locale}: {reason}"
    except asterisk.AsteriskError as e:
        logger.info("skipping %s: %s", item.id, e)
        return None, f"{item.locale}: unreadable recording"
    if item.augmentation is not None:
        audio = apply_augmentation(audio, item.augmentation, item.seed)
    duration = len(audio) / SAMPLE_RATE
    if not 0 < duration <= max_duration_s:
        return None, f"{item.locale}: longer than {max_duration_s:g} s"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: a killed build never leaves a truncated file to resume from.
    partial = path.with_name(f".{path.stem}.{os.getpid()}.flac")
    sf.write(partial, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(partial, path)
    return duration, "rendered"


def _render_one(job: tuple[Item, Path, float]) -> tuple[float | None, str]:
    return render(*job)


def _render_all(
    items: list[Item], out: Path, config: BuildConfig
) -> Iterator[tuple[Item, float | None, str]]:
    jobs = [(item, out, config.max_duration_s) for item in items]
    with ExitStack() as stack:
        if config.workers == 0:
            results: Iterator[tuple[float | None, str]] = map(_render_one, jobs)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=config.workers))
            results = pool.map(_render_one, jobs, chunksize=8)
        for item, (duration, outcome) in zip(
            items, _progress(results, len(items), config.progress), strict=True
        ):
            yield item, duration, outcome


def _progress(results: Iterator, total: int, enabled: bool) -> Iterator:
    if not enabled:
        return results
    try:
        from tqdm import tqdm
    except ImportError:
        logger.warning("tqdm is not installed: building without a progress bar")
        return results
    return tqdm(results, total=total, unit="utt", desc="caster data build")


def _synthesized_items(config: BuildConfig, locale: str) -> list[Item]:
    engines = [e for e in ("espeak", "flite") if e in config.engines]
    engines = [e for e in engines if e == "espeak" or locale in FLITE_VOICES]
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    sources = {}
    for sentence in sentences(locale, config.text_sources):
        by_split[sentence_split(sentence.text)].append(sentence.text)
        sources[sentence.text] = sentence.source
    items = []
    for split, texts in by_split.items():
        for engine in engines:
            for text in _choose(texts, config, locale, engine):
                copies = config.voices_per_sentence if split == "train" else 1
                for copy in range(copies):
                    rng = np.random.default_rng(_seed(config.seed, locale, text, engine, copy))
                    voice = pick_voice(locale, engine, split != "train", rng)
                    items.append(_item(config, locale, split, text, sources[text], voice, None))
    return items


def _recorded_items(config: BuildConfig, locale: str) -> list[Item]:
    by_split: dict[str, list[asterisk.Prompt]] = {split: [] for split in SPLITS}
    for prompt in asterisk.prompts(locale):
        by_split[asterisk.prompt_split(prompt.name)].append(prompt)
    items = []
    for split, prompts in by_split.items():
        names = set(_choose([p.name for p in prompts], config, locale, "asterisk"))
        for prompt in (p for p in prompts if p.name in names):
            items.append(_item(config, locale, split, prompt.text, "asterisk", None, prompt))
    return items


def _item(
    config: BuildConfig,
    locale: str,
    split: str,
    text: str,
    source: str,
    voice: Voice | None,
    prompt: asterisk.Prompt | None,
) -> Item:
    setting = voice.key() if voice is not None else f"asterisk:{prompt.name}"
    seed = _seed(config.seed, locale, text, setting)
    augmented = config.augment and (voice is not None or split == "train")
    augmentation = draw_augmentation(np.random.default_rng(seed)) if augmented else None
    return Item(
        id=_sha1(f"{config.seed}\n{locale}\n{text}\n{setting}")[:20],
        locale=locale,
        split=split,
        text=text,
        source=source,
        voice=voice,
        recording=prompt.path if prompt is not None else None,
        prompt=prompt.name if prompt is not None else "",
        seed=seed,
        augmentation=augmentation,
    )


def _choose(keys: list[str], config: BuildConfig, locale: str, engine: str) -> list[str]:
    if config.max_per_split is None:
        return keys
    ranked = sorted(keys, key=lambda key: _sha1(f"{config.seed}\n{locale}\n{engine}\n{key}"))
    return sorted(ranked[: config.max_per_split])


def _manifest_line(item: Item, duration: float) -> dict:
    line = {
        "audio_filepath": str(Path("..") / item.audio_path),
        "duration": round(duration, 4),
        "text": item.text,
        "lang": item.locale,
        "source": item.source,
        "voice": item.voice.key() if item.voice is not None else f"asterisk:{item.prompt}",
    }
    if item.augmentation is not None:
        line["augment"] = item.augmentation.to_dict()
    return line


def _check(config: BuildConfig) -> None:
    unknown = [locale for locale in config.locales if locale not in LOCALE_TEXT]
    if unknown or not config.locales:
        raise CorpusError(f"unknown locales {unknown}; known: {', '.join(LOCALE_TEXT)}")
    bad_engines = set(config.engines) - set(ENGINES)
    if bad_engines or not config.engines:
        raise CorpusError(f"unknown engines {sorted(bad_engines)}; known: {ENGINES}")
    if config.max_per_split is not None and config.max_per_split < 1:
        raise CorpusError(f"max_per_split must be at least 1, got {config.max_per_split}")
    if config.voices_per_sentence < 1:
        raise CorpusError(f"voices_per_sentence must be at least 1: {config.voices_per_sentence}")
    if config.workers < 0:
        raise CorpusError(f"workers must be 0 or more, got {config.workers}")
    if not config.max_duration_s > 0:
        raise CorpusError(f"max_duration_s must be positive, got {config.max_duration_s}")


def _seed(*parts: object) -> int:
    return int(_sha1("\n".join(str(p) for p in parts))[:16], 16)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    _write_text(path, body)


def _write_text(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(body, encoding="utf-8")
    os.replace(partial, path)
