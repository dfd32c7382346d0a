"""Training data: NeMo-style JSONL manifests, weighted mixing, duration buckets, audio samples.

A manifest has one JSON object per line: `audio_filepath` (relative paths are resolved against
the manifest's folder), `duration` (seconds), `text`, optionally `offset` (seconds into the
file) and a language under `lang`, `language`, `locale` or `source_lang`. Lines are parsed by
`caster.manifest.manifest_lines` (as inference manifests are); training adds its own checks:
duration and text are required, duration and offset must be usable. Audio can be in any format
`caster.audio.load_audio` reads.

Nothing in a manifest is trusted. A bad line (invalid JSON, a missing or mistyped field, a
non-positive duration) and a bad entry (missing file, unreadable audio, empty text, text with
characters the tokenizer maps to `<unk>`) is skipped, counted by reason in a `SkipCounter` and
logged; it never stops training.

Features are not made here: the training loop runs the model's own preprocessor on the padded
audio, so training features are NeMo-exact; `caster.train.augment` has SpecAugment for them.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from caster import manifest
from caster.audio import AudioError, load_audio
from caster.manifest import ManifestError
from caster.tokenizer import Tokenizer
from caster.train.augment import mix_noise, speed_perturb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance of a manifest.

    audio_filepath: the line's path; a relative one joined to the manifest's folder
    duration:       seconds of audio to use (from `offset`)
    text:           transcript
    language:       the line's `lang`/`language`/`locale` value, None when absent
    offset:         seconds into the file where the utterance starts
    """

    audio_filepath: Path
    duration: float
    text: str
    language: str | None = None
    offset: float = 0.0


class SkipCounter:
    """Counts skipped lines and entries by reason, logging the first few of each reason.

    Args:
        log_first: how many skips of each reason get their own warning line; later ones
            are only counted (one line says so).
    """

    def __init__(self, log_first: int = 10) -> None:
        self.counts: Counter[str] = Counter()
        self._log_first = log_first

    def skip(self, reason: str, detail: str) -> None:
        """Record one skip. `reason` is a short category, `detail` says which item and why."""
        self.counts[reason] += 1
        seen = self.counts[reason]
        if seen <= self._log_first:
            logger.warning("skipped %s: %s", detail, reason)
        if seen == self._log_first:
            logger.warning("further skips for %r are counted but not logged", reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: total and count per reason."""
        if not self.counts:
            return "nothing skipped"
        parts = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        return f"{self.total} skipped ({parts})"


def read_manifest(
    path: str | os.PathLike, counter: SkipCounter | None = None
) -> list[ManifestEntry]:
    """Parse a JSONL manifest, skipping and counting bad lines.

    Args:
        path: the manifest file.
        counter: where skips are counted; a fresh one (only logged) when None.

    Returns:
        The valid entries in file order. Blank lines are ignored silently.

    Raises:
        ManifestError: the file itself cannot be opened or read.
    """
    counter = counter if counter is not None else SkipCounter()
    entries = []
    before = counter.total
    for item in manifest.manifest_lines(path):
        if isinstance(item, manifest.ManifestEntry):
            item = _training_entry(item)
        if isinstance(item, manifest.ManifestLineError):
            where = f"{path}:{item.line}"
            counter.skip(item.reason, f"{where} ({item.detail})" if item.detail else where)
        else:
            entries.append(item)
    skipped = counter.total - before
    logger.info("%s: %d entries, %d lines skipped", path, len(entries), skipped)
    return entries


def _training_entry(entry: manifest.ManifestEntry) -> ManifestEntry | manifest.ManifestLineError:
    """The training entry of a parsed line, or why the line cannot be trained on."""
    record, line = entry.record, entry.line
    missing = [key for key in ("duration", "text") if key not in record]
    if missing:
        return manifest.ManifestLineError(line, "missing field", f"no {', '.join(missing)}")
    if entry.text is None:
        return manifest.ManifestLineError(line, "text is not a string", "null")
    duration = _seconds(record["duration"])
    if duration is None or duration <= 0.0:
        return manifest.ManifestLineError(line, "bad duration", f"duration {record['duration']!r}")
    offset = _seconds(record.get("offset", 0.0))
    if offset is None or offset < 0.0:
        return manifest.ManifestLineError(line, "bad offset", f"offset {record.get('offset')!r}")
    return ManifestEntry(entry.audio, duration, entry.text, entry.language, offset)


def _seconds(value: Any) -> float | None:
    """A finite float from a JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class MixedManifests:
    """Several manifests mixed with weights, as entries plus expected copies per epoch.

    Weights are shares of each epoch's audio time: source i with weight w_i fills
    w_i / sum(w) of an epoch, and an epoch lasts as long as all sources together. With
    weights proportional to the sources' durations every entry appears once per epoch; a
    small source with a large weight is repeated, a large one with a small weight is
    subsampled (a fresh random subset each epoch, see `DurationBucketSampler`).

    entries: all sources' entries, concatenated in order
    weights: (len(entries),) expected copies of each entry per epoch
    """

    entries: list[ManifestEntry]
    weights: list[float]

    @classmethod
    def mix(cls, sources: Sequence[tuple[Sequence[ManifestEntry], float]]) -> MixedManifests:
        """Mix already-read sources, each given as (entries, weight).

        Raises:
            ManifestError: a negative or non-finite weight, all weights zero, or a source
                with a positive weight but no entries.
        """
        total_weight = 0.0
        for entries, weight in sources:
            if not math.isfinite(weight) or weight < 0.0:
                raise ManifestError(f"mixing weights must be finite and >= 0, got {weight}")
            if weight > 0.0 and not entries:
                raise ManifestError("a manifest with a positive weight has no usable entries")
            total_weight += weight
        if total_weight <= 0.0:
            raise ManifestError("at least one mixing weight must be positive")
        epoch_seconds = sum(e.duration for entries, _ in sources for e in entries)
        all_entries: list[ManifestEntry] = []
        copies: list[float] = []
        for entries, weight in sources:
            seconds = sum(e.duration for e in entries)
            repeat = weight / total_weight * epoch_seconds / seconds if entries else 0.0
            all_entries.extend(entries)
            copies.extend([repeat] * len(entries))
        return cls(all_entries, copies)

    @classmethod
    def read(
        cls,
        sources: Sequence[tuple[str | os.PathLike, float]],
        counter: SkipCounter | None = None,
    ) -> MixedManifests:
        """Read manifests given as (path, weight) and mix them (see `mix`)."""
        return cls.mix([(read_manifest(path, counter), weight) for path, weight in sources])


class DurationBucketSampler(Sampler[list[int]]):
    """Batches of entry indices grouped by duration, capped by padded audio seconds.

    Entries are split into `num_buckets` duration quantiles; each bucket is shuffled and cut
    into batches whose padded duration (batch size x longest entry, what the padded audio
    tensor actually holds) stays within `max_batch_seconds`; batch order is shuffled across
    buckets. Entries longer than `max_batch_seconds` are left out (counted and logged).

    Deterministic for (seed, epoch). Each of `world_size` ranks takes every world_size-th
    batch, so ranks get disjoint batches of equal count: the batches that do not divide
    evenly are dropped (`drop_last`) or completed by repeating the first ones, as torch's
    DistributedSampler does. Use as a DataLoader's `batch_sampler`.

    Resuming: `state_dict()` holds the epoch and how many batches this sampler has yielded in
    it; after `load_state_dict` iteration continues with the next batch. With a DataLoader
    that prefetches, the sampler runs ahead of training: save
    `state_dict(position=batches_trained)` instead. Exhausting an epoch moves to the next
    one, so calling `set_epoch` every epoch is optional.

    Args:
        entries: the utterances (only their durations are read).
        max_batch_seconds: cap on batch size x longest duration in the batch.
        num_buckets: duration buckets (1 = no bucketing).
        shuffle: shuffle within buckets and the batch order; False keeps manifest order.
        seed: base of every epoch's random generator.
        rank, world_size: this process's shard.
        drop_last: drop the batches that do not divide among ranks instead of repeating.
        weights: optional (len(entries),) expected copies per epoch (`MixedManifests`):
            entry i appears floor(w) times plus once more with probability frac(w).
        counter: where entries too long for a batch are counted.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        max_batch_seconds: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        weights: Sequence[float] | None = None,
        counter: SkipCounter | None = None,
    ) -> None:
        if not max_batch_seconds > 0.0 or num_buckets < 1:
            raise ManifestError(
                f"need max_batch_seconds > 0 and num_buckets >= 1, got {max_batch_seconds}, "
                f"{num_buckets}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ManifestError(f"rank {rank} is not in a world of size {world_size}")
        durations = np.array([e.duration for e in entries], dtype=np.float64)
        copies = np.ones(len(entries)) if weights is None else np.asarray(weights, np.float64)
        if copies.shape != durations.shape or not np.all(np.isfinite(copies) & (copies >= 0)):
            raise ManifestError("weights must be one finite, non-negative value per entry")
        counter = counter if counter is not None else SkipCounter()
        for i in np.flatnonzero(durations > max_batch_seconds):
            counter.skip(
                "longer than max_batch_seconds",
                f"{entries[i].audio_filepath} ({durations[i]:.1f} s > {max_batch_seconds} s)",
            )
        self._eligible = np.flatnonzero(durations <= max_batch_seconds)
        self._durations = durations
        self._copies = copies
        # Quantile bounds over eligible entries: buckets of about equal entry counts.
        kept = durations[self._eligible]
        qs = np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]
        bounds = np.quantile(kept, qs) if kept.size else np.zeros(0)
        self._bucket = np.searchsorted(bounds, durations, side="right")  # (N,)
        self.num_buckets = num_buckets
        self.max_batch_seconds = float(max_batch_seconds)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch restarts at its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self, position: int | None = None) -> dict[str, int]:
        """Where this rank stands: {"epoch", "position", "seed", "world_size", "rank"}.

        Args:
            position: batches already trained on in this epoch, when that differs from the
                batches this sampler has yielded (a prefetching DataLoader).
        """
        return {
            "epoch": self.epoch,
            "position": self.position if position is None else position,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`'s position.

        Raises:
            ManifestError: the state was saved with another seed or world size, or its
                position is outside the epoch.
        """
        if state.get("seed") != self.seed or state.get("world_size") != self.world_size:
            raise ManifestError(
                f"sampler state is for seed {state.get('seed')} and world size "
                f"{state.get('world_size')}, this sampler has {self.seed} and {self.world_size}"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self._plan(epoch)):
            raise ManifestError(f"sampler position {position} is outside epoch {epoch}")
        self.epoch, self.position = epoch, position

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (counted from its start)."""
        return len(self._plan(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self.epoch)
        while self.position < len(plan):
            batch = plan[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def _plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch (cached for the last epoch asked)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self._copies[self._eligible])
        extra = rng.random(self._eligible.size) < self._copies[self._eligible] - whole
        indices = np.repeat(self._eligible, (whole + extra).astype(np.int64))
        batches: list[list[int]] = []
        for bucket in range(self.num_buckets):
            members = indices[self._bucket[indices] == bucket]
            if self.shuffle:
                members = rng.permutation(members)
            batches.extend(self._pack(members))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        remainder = len(batches) % self.world_size
        if remainder and self.drop_last:
            batches = batches[: len(batches) - remainder]
        elif remainder:
            missing = self.world_size - remainder
            batches = batches + [batches[i % len(batches)] for i in range(missing)]
        plan = batches[self.rank :: self.world_size]
        self._plan_cache = (epoch, plan)
        return plan

    def _pack(self, members: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0.0
        for index in members.tolist():
            duration = self._durations[index]
            if batch and (len(batch) + 1) * max(longest, duration) > self.max_batch_seconds:
                batches.append(batch)
                batch, longest = [], 0.0
            batch.append(index)
            longest = max(longest, duration)
        if batch:
            batches.append(batch)
        return batches


@dataclass(frozen=True)
class Sample:
    """One loaded utterance.

    audio:    (N,) float32 at the dataset's sample rate, augmented
    tokens:   (U,) int64 token ids of the text
    language: the manifest's language field, None when absent
    index:    position in the dataset's entries
    """

    audio: np.ndarray
    tokens: np.ndarray
    language: str | None
    index: int


@dataclass(frozen=True)
class Skipped:
    """An entry that could not be used, and why (`collate` counts these)."""

    index: int
    reason: str


class AsrDataset(Dataset):
    """Loads, checks, tokenizes and augments manifest entries.

    `dataset[i]` is a `Sample`, or a `Skipped` for a bad entry (missing file, unreadable or
    too short audio, empty text, text the tokenizer cannot encode), which is also counted in
    `counter` and logged. In DataLoader worker processes each worker counts in its own copy,
    so aggregate `Batch.skipped` in the training loop for the true totals.

    Augmentation randomness comes from (seed, epoch, index): call `set_epoch` every epoch
    (with persistent DataLoader workers the change does not reach the workers' copies).

    Args:
        entries: the utterances.
        tokenizer: encodes the transcripts.
        sample_rate: audio rate the model expects.
        speed_factors: speed perturbation factors, one drawn uniformly per sample
            (e.g. (0.9, 1.0, 1.1)); (1.0,) disables it.
        noise: noise clips (float32 mono at `sample_rate`) for noise mixing.
        noise_prob: probability of mixing one random clip into a sample.
        snr_db: (low, high) range of the uniformly drawn SNR in dB.
        min_seconds: shortest audio kept (after perturbation); shorter gives no encoder frame.
        seed: base of the augmentation randomness.
        counter: where skips are counted; a fresh one when None.
        language_tags: end each utterance's tokens with its language's tag piece (`<de-DE>`)
            where the vocabulary has one, as the released 3.5 model ends its sentences: in
            `auto` prompt mode the model learns to name the language it heard.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        tokenizer: Tokenizer,
        sample_rate: int = 16000,
        speed_factors: Sequence[float] = (1.0,),
        noise: Sequence[np.ndarray] = (),
        noise_prob: float = 0.0,
        snr_db: tuple[float, float] = (10.0, 30.0),
        min_seconds: float = 0.1,
        seed: int = 0,
        counter: SkipCounter | None = None,
        language_tags: bool = False,
        targets: bool = True,
    ) -> None:
        if not speed_factors or not 0.0 <= noise_prob <= 1.0 or snr_db[0] > snr_db[1]:
            raise ManifestError(
                f"need speed_factors, 0 <= noise_prob <= 1 and snr_db low <= high, got "
                f"{speed_factors}, {noise_prob}, {snr_db}"
            )
        if noise_prob > 0.0 and not noise:
            raise ManifestError("noise_prob > 0 needs noise clips")
        self.entries = list(entries)
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.speed_factors = tuple(float(f) for f in speed_factors)
        self.noise = list(noise)
        self.noise_prob = noise_prob
        self.snr_db = snr_db
        self.min_seconds = min_seconds
        self.seed = seed
        self.epoch = 0
        self.counter = counter if counter is not None else SkipCounter()
        self._unk_ids = unknown_ids(tokenizer)
        self.targets = targets
        self._tag_ids = (
            {locale: i for i, locale in tokenizer.language_tag_ids.items()} if language_tags else {}
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample | Skipped:
        entry = self.entries[index]
        tokens = []
        if self.targets:
            try:
                tokens = encode_transcript(entry.text, self.tokenizer, self._unk_ids)
            except TranscriptError as e:
                return self._skip(index, str(e))
        if tokens and entry.language in self._tag_ids:
            tokens = [*tokens, self._tag_ids[entry.language]]
        if not entry.audio_filepath.is_file():
            return self._skip(index, "missing audio file")
        try:
            audio = load_audio(entry.audio_filepath, self.sample_rate)
        except AudioError as e:
            return self._skip(index, "unreadable audio", str(e))
        if entry.offset > 0.0:
            start = round(entry.offset * self.sample_rate)
            audio = audio[start : start + round(entry.duration * self.sample_rate)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        factor = self.speed_factors[int(rng.integers(len(self.speed_factors)))]
        if factor != 1.0:
            audio = speed_perturb(audio, self.sample_rate, factor)
        if self.noise and rng.random() < self.noise_prob:
            clip = self.noise[int(rng.integers(len(self.noise)))]
            audio = mix_noise(audio, clip, float(rng.uniform(*self.snr_db)), rng)
        if audio.size < self.min_seconds * self.sample_rate:
            return self._skip(index, "audio too short", f"{audio.size} samples")
        return Sample(audio, np.asarray(tokens, dtype=np.int64), entry.language, index)

    def _skip(self, index: int, reason: str, detail: str = "") -> Skipped:
        where = str(self.entries[index].audio_filepath)
        self.counter.skip(reason, f"{where} ({detail})" if detail else where)
        return Skipped(index, reason)


def unknown_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the `<unk>` piece: text encoding to one has characters the vocabulary lacks."""
    return frozenset(i for i, piece in enumerate(tokenizer.pieces) if piece == "<unk>")


class TranscriptError(ValueError):
    """A transcript cannot be a training target; the message is the reason."""


def encode_transcript(text: str, tokenizer: Tokenizer, unk_ids: frozenset[int]) -> list[int]:
    """Token ids of a transcript.

    Args:
        text: the manifest's transcript.
        tokenizer: the model's tokenizer.
        unk_ids: `unknown_ids(tokenizer)`.

    Raises:
        TranscriptError: "empty text" (nothing but whitespace), or "unencodable text" (a
            character the vocabulary lacks: SentencePiece maps it to `<unk>`).
    """
    tokens = tokenizer.encode(text) if text.strip() else []
    if not tokens:
        raise TranscriptError("empty text")
    if unk_ids.intersection(tokens):
        raise TranscriptError("unencodable text")
    return tokens


def filter_entries(
    entries: Sequence[ManifestEntry], tokenizer: Tokenizer, counter: SkipCounter | None = None
) -> list[ManifestEntry]:
    """Drop entries that fail the cheap checks (text, file exists) before batching.

    Running this before building the sampler keeps batches full and ranks in step; entries
    whose audio turns out unreadable are still skipped by `AsrDataset`.
    """
    counter = counter if counter is not None else SkipCounter()
    unk = unknown_ids(tokenizer)
    kept = []
    for entry in entries:
        try:
            encode_transcript(entry.text, tokenizer, unk)
        except TranscriptError as e:
            counter.skip(str(e), str(entry.audio_filepath))
            continue
        if not entry.audio_filepath.is_file():
            counter.skip("missing audio file", str(entry.audio_filepath))
        else:
            kept.append(entry)
    return kept


@dataclass
class Batch:
    """Padded training batch from `collate`.

    audio:          (B, N) float32, zero-padded
    audio_lengths:  (B,) int64 samples
    targets:        (B, U) int64 token ids, padded with 0
    target_lengths: (B,) int64
    languages:      B language fields (None where absent)
    indices:        B dataset indices
    skipped:        reason -> entries of this batch that were skipped (not in the tensors)
    """

    audio: Tensor
    audio_lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    languages: list[str | None]
    indices: list[int]
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The tensors moved to `device`."""
        return Batch(
            self.audio.to(device, non_blocking=non_blocking),
            self.audio_lengths.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.target_lengths.to(device, non_blocking=non_blocking),
            self.languages,
            self.indices,
            self.skipped,
        )

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with pin_memory=True."""
        return Batch(
            self.audio.pin_memory(),
            self.audio_lengths.pin_memory(),
            self.targets.pin_memory(),
            self.target_lengths.pin_memory(),
            self.languages,
            self.indices,
            self.skipped,
        )


def collate(items: Sequence[Sample | Skipped]) -> Batch:
    """Pad samples into a `Batch`; skipped entries are only counted in `Batch.skipped`.

    A batch whose entries were all skipped has size 0: the training loop must skip it.
    """
    samples = [item for item in items if isinstance(item, Sample)]
    skipped = Counter(item.reason for item in items if isinstance(item, Skipped))
    batch = len(samples)
    audio_lengths = torch.tensor([s.audio.size for s in samples], dtype=torch.long)
    target_lengths = torch.tensor([s.tokens.size for s in samples], dtype=torch.long)
    audio = torch.zeros(batch, int(audio_lengths.max()) if batch else 0)
    targets = torch.zeros(batch, int(target_lengths.max()) if batch else 0, dtype=torch.long)
    for i, s in enumerate(samples):
        audio[i, : s.audio.size] = torch.from_numpy(s.audio)
        targets[i, : s.tokens.size] = torch.from_numpy(s.tokens)
    return Batch(
        audio,
        audio_lengths,
        targets,
        target_lengths,
        [s.language for s in samples],
        [s.index for s in samples],
        skipped,
    )
