"""Training data: manifests, mixing, bucketed sampling, the dataset, augmentation, tokenizer."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from caster.tokenizer import Tokenizer
from caster.train.augment import AugmentError, mix_noise, spec_augment, speed_perturb
from caster.train.data import (
    AsrDataset,
    DurationBucketSampler,
    ManifestEntry,
    ManifestError,
    MixedManifests,
    Sample,
    SkipCounter,
    Skipped,
    collate,
    filter_entries,
    read_manifest,
)
from caster.train.tokenizer import (
    TokenizerTrainingError,
    manifest_languages,
    manifest_texts,
    train_tokenizer,
)

RATE = 16000
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "der schnelle braune fuchs springt",
    "über den faulen hund",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_tokenizer(SENTENCES, 40, ["en-US", "de-DE"], character_coverage=1.0))


def write_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(round(seconds * RATE))).astype(np.float32), RATE)
    return path


def write_manifest(path: Path, lines: list) -> Path:
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


def entries(durations: list[float]) -> list[ManifestEntry]:
    return [ManifestEntry(Path(f"/a/{i}.wav"), d, "x") for i, d in enumerate(durations)]


# Manifests


def test_read_manifest_skips_and_counts_hostile_lines(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    good = [
        {"audio_filepath": "sub/a.wav", "duration": 1.5, "text": "hello", "lang": "en-US"},
        {"audio_filepath": "/abs/b.flac", "duration": 2, "text": "hallo", "source_lang": "de-DE "},
        {"audio_filepath": "c.wav", "duration": 0.5, "text": "", "language": None, "offset": 1},
    ]
    hostile = [
        "{not json",
        "[1, 2]",
        '"a string"',
        "[" * 100_000,
        "1" * 5000,
        b"\xff\xfe garbage",
        {"duration": 1.0, "text": "no path"},
        {"audio_filepath": "x.wav", "text": "no duration"},
        {"audio_filepath": "x.wav", "duration": 1.0},
        {"audio_filepath": 3, "duration": 1.0, "text": "a"},
        {"audio_filepath": "", "duration": 1.0, "text": "a"},
        {"audio_filepath": "x.wav", "duration": "1.0", "text": "a"},
        {"audio_filepath": "x.wav", "duration": True, "text": "a"},
        {"audio_filepath": "x.wav", "duration": -1.0, "text": "a"},
        {"audio_filepath": "x.wav", "duration": 0, "text": "a"},
        '{"audio_filepath": "x.wav", "duration": NaN, "text": "a"}',
        '{"audio_filepath": "x.wav", "duration": Infinity, "text": "a"}',
        {"audio_filepath": "x.wav", "duration": 1.0, "text": ["a"]},
        {"audio_filepath": "x.wav", "duration": 1.0, "text": "a", "offset": -2},
        {"audio_filepath": "x.wav", "duration": 1.0, "text": "a", "lang": 7},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", [good[0], *hostile, "", good[1], good[2]])
    counter = SkipCounter(log_first=2)
    with caplog.at_level(logging.WARNING, logger="caster.train.data"):
        got = read_manifest(manifest, counter)
    assert got == [
        ManifestEntry(tmp_path / "sub" / "a.wav", 1.5, "hello", "en-US"),
        ManifestEntry(Path("/abs/b.flac"), 2.0, "hallo", "de-DE"),
        ManifestEntry(tmp_path / "c.wav", 0.5, "", None, 1.0),
    ]
    assert counter.total == len(hostile)
    assert counter.counts["invalid JSON"] == 3
    assert counter.counts["bad duration"] == 6
    assert counter.counts["missing field"] == 3
    assert "20 skipped" in counter.summary()
    # The first skips of a reason are logged with where they are; later ones only counted.
    assert f"{manifest}:2" in caplog.text
    assert "counted but not logged" in caplog.text
    assert caplog.text.count("bad duration") <= 3


def test_read_manifest_missing_file_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "nope.jsonl")


def test_mixed_manifests_weights_are_shares_of_epoch_time(tmp_path):
    big = entries([2.0] * 30)  # 60 s
    small = entries([1.0] * 20)  # 20 s
    mixed = MixedManifests.mix([(big, 1.0), (small, 1.0)])
    # An epoch lasts 80 s, half from each: big entries 40/60 copies, small ones 40/20.
    assert len(mixed.entries) == 50
    assert mixed.weights[0] == pytest.approx(2 / 3)
    assert mixed.weights[-1] == pytest.approx(2.0)
    proportional = MixedManifests.mix([(big, 3.0), (small, 1.0)])
    assert proportional.weights == pytest.approx([1.0] * 50)
    for bad in ([(big, -1.0)], [(big, 0.0)], [(big, 1.0), ([], 1.0)], [(big, float("nan"))]):
        with pytest.raises(ManifestError):
            MixedManifests.mix(bad)
    a = write_manifest(tmp_path / "a.jsonl", [{"audio_filepath": "a", "duration": 1, "text": "a"}])
    assert len(MixedManifests.read([(a, 1.0), (a, 2.0)]).entries) == 2


# Sampler


def flat(batches) -> list[int]:
    return [i for batch in batches for i in batch]


def test_sampler_batches_respect_the_budget_and_cover_each_entry_once():
    rng = np.random.default_rng(0)
    durations = [*rng.uniform(0.5, 12.0, 300).tolist(), 40.0]
    counter = SkipCounter()
    sampler = DurationBucketSampler(entries(durations), 30.0, num_buckets=5, counter=counter)
    batches = list(sampler)
    assert sorted(flat(batches)) == list(range(300))  # the 40 s entry is left out
    assert counter.counts["longer than max_batch_seconds"] == 1
    for batch in batches:
        assert len(batch) * max(durations[i] for i in batch) <= 30.0
    # Bucketing keeps batch members of similar length.
    spreads = [np.ptp([durations[i] for i in b]) for b in batches if len(b) > 1]
    assert np.mean(spreads) < 3.0


def test_sampler_is_deterministic_per_seed_and_epoch():
    items = entries(np.random.default_rng(1).uniform(1, 5, 100).tolist())

    def epoch_batches(seed, epoch):
        sampler = DurationBucketSampler(items, 20.0, num_buckets=3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(1, 0)
    ordered = DurationBucketSampler(items, 20.0, num_buckets=1, shuffle=False)
    assert flat(ordered) == list(range(100))


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_shards_ranks_equally(drop_last):
    items = entries(np.random.default_rng(2).uniform(1, 5, 101).tolist())
    shards = [
        list(
            DurationBucketSampler(items, 12.0, 4, seed=3, rank=r, world_size=3, drop_last=drop_last)
        )
        for r in range(3)
    ]
    assert len({len(shard) for shard in shards}) == 1
    whole = list(DurationBucketSampler(items, 12.0, 4, seed=3))
    if drop_last:
        seen = [flat(shard) for shard in shards]
        assert sum(map(len, seen)) == len(set().union(*seen))  # disjoint
        assert len(whole) - 2 <= sum(map(len, shards)) <= len(whole)
    else:
        assert set().union(*(flat(shard) for shard in shards)) == set(range(101))
    with pytest.raises(ManifestError, match="rank"):
        DurationBucketSampler(items, 12.0, rank=3, world_size=3)


def test_sampler_resumes_mid_epoch_and_moves_on():
    items = entries(np.random.default_rng(4).uniform(1, 5, 80).tolist())
    sampler = DurationBucketSampler(items, 15.0, num_buckets=3, seed=7, rank=1, world_size=2)
    sampler.set_epoch(2)
    reference = DurationBucketSampler(items, 15.0, 3, seed=7, rank=1, world_size=2)
    reference.set_epoch(2)
    whole = list(reference)
    it = iter(sampler)
    first = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 5
    resumed = DurationBucketSampler(items, 15.0, num_buckets=3, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop re-selecting the same epoch keeps the position
    assert first + list(resumed) == whole
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    assert sampler.state_dict(position=3)["position"] == 3
    other = DurationBucketSampler(items, 15.0, num_buckets=3, seed=8, rank=1, world_size=2)
    with pytest.raises(ManifestError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ManifestError, match="position"):
        resumed.load_state_dict(state | {"position": 10_000})


def test_sampler_weights_repeat_and_subsample_entries():
    items = entries([1.0] * 40)
    weights = [2.5] * 20 + [0.25] * 20
    counts = Counter()
    sampler = DurationBucketSampler(items, 8.0, num_buckets=1, weights=weights)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts.update(flat(sampler))
    heavy = sum(counts[i] for i in range(20)) / (20 * 20)
    light = sum(counts[i] for i in range(20, 40)) / (20 * 20)
    assert heavy == pytest.approx(2.5, abs=0.1)
    assert light == pytest.approx(0.25, abs=0.07)
    with pytest.raises(ManifestError, match="weights"):
        DurationBucketSampler(items, 8.0, weights=[1.0])


# Dataset


def test_dataset_skips_bad_entries_and_collates(tmp_path, tokenizer, caplog):
    good = write_wav(tmp_path / "good.wav", 1.0)
    long = write_wav(tmp_path / "long.flac", 2.0, seed=1)
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "empty.wav").write_bytes(b"")
    items = [
        ManifestEntry(good, 1.0, "the quick fox", "en-US"),
        ManifestEntry(tmp_path / "missing.wav", 1.0, "the dog"),
        ManifestEntry(tmp_path / "garbage.wav", 1.0, "the dog"),
        ManifestEntry(tmp_path / "empty.wav", 1.0, "the dog"),
        ManifestEntry(good, 1.0, "   "),
        ManifestEntry(good, 1.0, "the 狐狸 fox"),
        ManifestEntry(long, 0.5, "über den hund", "de-DE", offset=1.25),
        ManifestEntry(long, 0.05, "the dog", offset=0.1),
    ]
    counter = SkipCounter()
    dataset = AsrDataset(items, tokenizer, counter=counter)
    with caplog.at_level(logging.WARNING, logger="caster.train.data"):
        got = [dataset[i] for i in range(len(dataset))]
    reasons = [g.reason if isinstance(g, Skipped) else None for g in got]
    assert reasons == [
        None,
        "missing audio file",
        "unreadable audio",
        "unreadable audio",
        "empty text",
        "unencodable text",
        None,
        "audio too short",
    ]
    assert counter.total == 6
    assert "missing.wav" in caplog.text and "unencodable text" in caplog.text
    first, offset = got[0], got[6]
    assert isinstance(first, Sample) and first.audio.dtype == np.float32
    assert tokenizer.decode(first.tokens.tolist()) == "the quick fox"
    full = sf.read(long, dtype="float32")[0]
    np.testing.assert_array_equal(offset.audio, full[20000:28000])

    batch = collate(got)
    assert batch.size == 2 and batch.indices == [0, 6]
    assert batch.audio.shape == (2, 16000) and batch.audio_lengths.tolist() == [16000, 8000]
    assert batch.audio[1, 8000:].abs().max() == 0
    assert batch.targets.shape == (2, max(len(first.tokens), len(offset.tokens)))
    assert batch.target_lengths.tolist() == [len(first.tokens), len(offset.tokens)]
    assert batch.languages == ["en-US", "de-DE"]
    assert batch.skipped == Counter([*reasons[1:6], "audio too short"])
    loader = DataLoader(
        dataset, batch_sampler=DurationBucketSampler(items, 4.0, 2), collate_fn=collate
    )
    loaded = list(loader)
    assert sorted(i for b in loaded for i in b.indices) == [0, 6]
    assert sum((b.skipped for b in loaded), Counter()) == batch.skipped
    empty = collate([got[1]])
    assert empty.size == 0 and empty.audio.shape == (0, 0)

    kept = filter_entries(items, tokenizer)
    assert kept == [items[0], items[2], items[3], items[6], items[7]]


def test_dataset_language_tags_and_scoring_mode(tmp_path, tokenizer):
    good = write_wav(tmp_path / "good.wav", 1.0)
    items = [
        ManifestEntry(good, 1.0, "the quick fox", "en-US"),
        ManifestEntry(good, 1.0, "the quick fox", "fr-FR"),  # no <fr-FR> piece: no tag
        ManifestEntry(good, 1.0, "the quick fox"),
        ManifestEntry(good, 1.0, "the 狐狸 fox", "en-US"),
    ]
    plain = AsrDataset(items, tokenizer)[0].tokens.tolist()
    tagged = AsrDataset(items, tokenizer, language_tags=True)
    tag = {locale: i for i, locale in tokenizer.language_tag_ids.items()}["en-US"]
    assert tagged[0].tokens.tolist() == [*plain, tag]
    assert tokenizer.decode(tagged[0].tokens.tolist()).endswith("<en-US>")
    assert tagged[1].tokens.tolist() == tagged[2].tokens.tolist() == plain
    assert isinstance(tagged[3], Skipped) and tagged[3].reason == "unencodable text"
    # Scoring keeps text the vocabulary cannot spell: no targets, nothing skipped.
    scoring = AsrDataset(items, tokenizer, targets=False)
    assert [scoring[i].tokens.size for i in range(len(items))] == [0, 0, 0, 0]


def test_dataset_augmentation_is_deterministic_per_epoch(tmp_path, tokenizer):
    wav = write_wav(tmp_path / "a.wav", 1.0)
    noise = [np.random.default_rng(5).standard_normal(4000).astype(np.float32)]
    items = [ManifestEntry(wav, 1.0, "the fox")] * 6
    dataset = AsrDataset(
        items, tokenizer, speed_factors=(0.9, 1.0, 1.1), noise=noise, noise_prob=0.5, seed=3
    )
    run = [dataset[i].audio for i in range(6)]
    again = [dataset[i].audio for i in range(6)]
    for a, b in zip(run, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {a.size for a in run} <= {14545, 16000, 17778}
    assert len({a.size for a in run}) > 1
    dataset.set_epoch(1)
    other = [dataset[i].audio for i in range(6)]
    assert any(
        a.size != b.size or not np.array_equal(a, b) for a, b in zip(run, other, strict=True)
    )
    with pytest.raises(ManifestError, match="noise"):
        AsrDataset(items, tokenizer, noise_prob=0.5)


# Augmentation


def test_spec_augment_masks_like_nemo():
    mel = torch.randn(3, 20, 100) + 5.0
    lengths = torch.tensor([100, 60, 10])
    out = spec_augment(mel, lengths, 2, 5, 4, 0.1, torch.Generator().manual_seed(0))
    again = spec_augment(mel, lengths, 2, 5, 4, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == mel.shape
    torch.testing.assert_close(out, again)
    masked = out == 0.0
    # Whole rows (frequency bands) or whole columns (time spans), never partial.
    rows, cols = masked.all(dim=2), masked.all(dim=1)
    assert torch.equal(masked, rows[:, :, None] | cols[:, None, :])
    assert rows.sum(dim=1).le(2 * 4).all()  # two masks of width < 5
    # Adaptive width: at most 4 masks of < 10% of each utterance's length, inside it.
    assert cols.sum(dim=1).le(torch.tensor([4 * 9, 4 * 5, 0])).all()
    assert not cols[1, 60:].any()
    assert torch.equal(out[~masked], mel[~masked])
    frames = spec_augment(mel, lengths, 0, 0, 10, 8, torch.Generator().manual_seed(1)) == 0
    assert frames.all(dim=1).sum() > 0
    for bad in ({"freq_width": 30}, {"time_width": 1.5}, {"time_masks": -1}):
        args = {"freq_masks": 1, "freq_width": 5, "time_masks": 1, "time_width": 5} | bad
        with pytest.raises(AugmentError):
            spec_augment(mel, lengths, generator=torch.Generator(), **args)


def test_speed_perturb_and_noise():
    t = np.arange(RATE) / RATE
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    fast = speed_perturb(tone, RATE, 1.25)
    assert fast.dtype == np.float32 and abs(fast.size - RATE / 1.25) <= 1
    # Pitch goes up with speed: 440 Hz becomes 550 Hz.
    spectrum = np.abs(np.fft.rfft(fast[:8000]))
    assert np.argmax(spectrum) * RATE / 8000 == pytest.approx(550, abs=2)
    np.testing.assert_array_equal(speed_perturb(tone, RATE, 1.0), tone)
    with pytest.raises(AugmentError):
        speed_perturb(tone, RATE, 0.0)

    noise = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    noisy = mix_noise(tone, noise, 10.0, np.random.default_rng(1))
    snr = 10 * np.log10(np.mean(tone**2) / np.mean((noisy - tone) ** 2))
    assert snr == pytest.approx(10.0, abs=1e-3)
    again = mix_noise(tone, noise, 10.0, np.random.default_rng(1))
    np.testing.assert_array_equal(noisy, again)
    np.testing.assert_array_equal(
        mix_noise(np.zeros(10, np.float32), noise, 5.0, np.random.default_rng(0)), 0
    )
    with pytest.raises(AugmentError):
        mix_noise(tone, noise[:0], 10.0, np.random.default_rng(0))


# Tokenizer


def test_trained_tokenizer_has_language_tags_and_nemo_conventions(tokenizer):
    assert tokenizer.language_tag_ids == {1: "en-US", 2: "de-DE"}
    assert tokenizer.pieces[0] == "<unk>" and tokenizer.vocab_size == 40
    ids = tokenizer.encode("<de-DE> über den hund")
    assert 2 in ids and tokenizer.split_language_tags(tokenizer.decode(ids)) == (
        "über den hund",
        ["de-DE"],
    )
    # nmt_nfkc: the full-width letters normalise to ASCII ones.
    assert tokenizer.encode("ｆｏｘ") == tokenizer.encode("fox")


def test_train_tokenizer_from_manifest_entries():
    items = [
        ManifestEntry(Path("a.wav"), 1.0, text, lang)
        for text, lang in zip(SENTENCES, ["en-US", "en-US", "de-DE", None] * 20, strict=True)
    ]
    languages = manifest_languages(items)
    assert languages == ["de-DE", "en-US"]
    proto = train_tokenizer(manifest_texts(items), 40, languages, "bpe", character_coverage=1.0)
    assert Tokenizer(proto).language_tag_ids == {1: "de-DE", 2: "en-US"}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((SENTENCES, 40, ["english"]), "not a locale"),
        ((SENTENCES, 40, ["en-US", "<en-US>"]), "duplicate"),
        ((SENTENCES, 3, ["en-US", "de-DE"]), "no room"),
        ((["", "  "], 40, []), "no non-empty text"),
        ((SENTENCES, 5000, []), "Vocabulary size too high"),
        ((SENTENCES, 40, [], "wordpiece"), "model_type"),
    ],
)
def test_train_tokenizer_rejects_bad_settings(args, match):
    with pytest.raises(TokenizerTrainingError, match=match):
        train_tokenizer(*args)
