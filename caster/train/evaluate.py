"""Scoring a model: WER/CER per chunk size, prompt mode and language.

Used by the training loop's validation and by `caster eval`. Errors are counted by
`caster.scoring` (CER for zh, ja, ko and th, WER elsewhere; corpus-level rates).
Prompt choice lives here too, since scoring and training pick each utterance's prompt
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from caster.config import ModelConfig, PromptConfig
from caster.decoding import greedy_decode, initial_decoder_state
from caster.languages import AUTO, LanguageError, resolve_language
from caster.scoring import (
    ErrorCount,
    add_count,
    count_errors,
    merge_counts,
    metric_of,
    pooled_counts,
    uses_cer,
)
from caster.tokenizer import Tokenizer
from caster.train.data import (
    AsrDataset,
    Batch,
    DurationBucketSampler,
    ManifestEntry,
    SkipCounter,
    collate,
)
from caster.transducer import Transducer

if TYPE_CHECKING:
    from caster.model import Model

# (chunk_ms, prompt mode, language) -> errors and reference units
ErrorCounts = dict[tuple[int, str, str], ErrorCount]
# (chunk_ms, language) -> utterances whose language the `auto` prompt got wrong (errors) of
# all scored (units): the language named by the last tag the model emitted, none = wrong.
LanguageIdCounts = dict[tuple[int, str], ErrorCount]


@dataclass
class Scores:
    """What `evaluate` counts; add the parts of several processes with `merge_scores`.

    errors:      WER (CER for zh, ja, ko, th) counts per (chunk_ms, mode, language)
    characters:  CER counts for every language, same keys
    language_id: `auto` mode's language identification per (chunk_ms, language)
    """

    errors: ErrorCounts = field(default_factory=dict)
    characters: ErrorCounts = field(default_factory=dict)
    language_id: LanguageIdCounts = field(default_factory=dict)


def merge_scores(parts: Iterable[Scores]) -> Scores:
    parts = list(parts)
    return Scores(
        merge_counts(p.errors for p in parts),
        merge_counts(p.characters for p in parts),
        merge_counts(p.language_id for p in parts),
    )


@torch.inference_mode()
def evaluate(
    net: Transducer,
    tokenizer: Tokenizer,
    batches: Iterable[Batch],
    references: Callable[[int], str],
    chunk_ms: Sequence[int],
    prompt_modes: dict[str, Callable[[Sequence[str | None]], Tensor | None]],
    device: torch.device,
    ctc_head: nn.Module | None = None,
) -> Scores:
    """Greedy-decode batches at several chunk sizes and prompt modes; count errors.

    The offline encoder with a chunk size's attention context gives exactly what a
    stream with that chunk size gives, so this scores streaming recognition.

    Args:
        net: the model, in eval mode.
        tokenizer: its tokenizer.
        batches: from `collate`.
        references: dataset index -> reference text (language tags are removed).
        chunk_ms: chunk sizes to score.
        prompt_modes: mode name -> function giving the (B,) prompt indices of a batch's
            languages (None for a model without a prompt).
        device: where the model is.
        ctc_head: decode with this training-only CTC head (greedy) instead of the
            transducer: what the encoder has learnt while the prediction network and joint
            have not trained yet (`model.ctc_only_steps`).

    Returns:
        error and unit counts per (chunk_ms, mode, language), and in `auto` mode the
        language identification counts per (chunk_ms, language) of utterances with a
        known language.
    """
    contexts = {ms: net.cfg.context_for_chunk_ms(ms) for ms in chunk_ms}
    scores = Scores()
    for batch in batches:
        if batch.size == 0:
            continue
        batch = batch.to(device)
        mel, mel_lengths = net.preprocessor(batch.audio, batch.audio_lengths)
        for ms, context in contexts.items():
            encoded, lengths = net.encoder(mel, mel_lengths, context)
            for mode, prompts_of in prompt_modes.items():
                prompts = prompts_of(batch.languages)
                prompted = net.apply_prompt(
                    encoded, None if prompts is None else prompts.to(device)
                )
                if ctc_head is None:
                    state = initial_decoder_state(net, batch.size)
                    token_ids = [
                        h.token_ids for h in greedy_decode(net, prompted, lengths, state)[0]
                    ]
                else:
                    blank = net.cfg.decoder.blank_id
                    token_ids = ctc_greedy(ctc_head(prompted), lengths, blank)
                for ids, index, language in zip(
                    token_ids, batch.indices, batch.languages, strict=True
                ):
                    text, tags = tokenizer.split_language_tags(tokenizer.decode(ids))
                    reference, _ = tokenizer.split_language_tags(references(index))
                    key = (ms, mode, language or "none")
                    characters = count_errors(reference, text, True)
                    add_count(scores.characters, key, characters)
                    count = (
                        characters if uses_cer(language) else count_errors(reference, text, False)
                    )
                    add_count(scores.errors, key, count)
                    if mode == AUTO and language is not None:
                        wrong = not tags or tags[-1] != language
                        add_count(scores.language_id, (ms, language), ErrorCount(int(wrong), 1, 1))
    return scores


def ctc_greedy(logits: Tensor, lengths: Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: the most likely label per frame, repeats merged, blanks dropped.

    Args:
        logits: (B, T, V+1) per-frame label scores; lengths: (B,) valid frames.
    """
    best = logits.argmax(-1).tolist()  # (B, T)
    sequences = []
    for labels, length in zip(best, lengths.tolist(), strict=True):
        ids, previous = [], blank
        for label in labels[:length]:
            if label != previous and label != blank:
                ids.append(label)
            previous = label
        sequences.append(ids)
    return sequences


def score_entries(
    model: Model,
    entries: Sequence[ManifestEntry],
    chunk_ms: Sequence[int],
    prompt_modes: dict[str, Callable[[Sequence[str | None]], Tensor | None]],
    batch_seconds: float = 120.0,
    workers: int = 0,
    skips: SkipCounter | None = None,
) -> Scores:
    """`evaluate` a loaded model on manifest entries (what `caster eval` runs).

    Every entry with readable audio is scored, also one whose text the vocabulary cannot
    spell (its missing characters count as errors); unreadable or missing audio is counted
    in `skips` and left out.
    """
    skips = skips if skips is not None else SkipCounter()
    kept = []
    for entry in entries:
        if entry.audio_filepath.is_file():
            kept.append(entry)
        else:
            skips.skip("missing audio file", str(entry.audio_filepath))
    entries = kept
    batches = list(DurationBucketSampler(entries, batch_seconds, shuffle=False, counter=skips))
    dataset = AsrDataset(
        entries, model.tokenizer, model.config.mel.sample_rate, counter=skips, targets=False
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=workers,
    )
    references = [e.text for e in entries]
    return evaluate(
        model.net,
        model.tokenizer,
        loader,
        references.__getitem__,
        chunk_ms,
        prompt_modes,
        model.device,
    )


def error_rates(counts: ErrorCounts) -> dict[str, float]:
    """Rates keyed "<ms>ms[/<mode>]/<language>/{wer,cer}"; language "all" pools them.

    The mode is omitted for "language" (the true-language prompt, or no prompt).
    """
    rates: dict[str, float] = {}
    for (ms, mode, language), count in sorted(counts.items()):
        rates[f"{rate_prefix(ms, mode)}/{language}/{metric_of(language)}"] = _rate(count)
    for (ms, mode, metric), count in pooled_counts(counts).items():
        rates[f"{rate_prefix(ms, mode)}/all/{metric}"] = _rate(count)
    return rates


def character_rates(counts: ErrorCounts) -> dict[str, float]:
    """CER of every language (`Scores.characters`) keyed "<ms>ms[/<mode>]/<language>/cer";
    language "all" pools every language (unlike `error_rates`, which pools per metric)."""
    rates: dict[str, float] = {}
    pooled: ErrorCounts = {}
    for (ms, mode, language), count in sorted(counts.items()):
        rates[f"{rate_prefix(ms, mode)}/{language}/cer"] = _rate(count)
        add_count(pooled, (ms, mode, "all"), count)
    for (ms, mode, _), count in pooled.items():
        rates[f"{rate_prefix(ms, mode)}/all/cer"] = _rate(count)
    return rates


def language_id_rates(counts: LanguageIdCounts) -> dict[str, float]:
    """Language identification accuracy keyed "<ms>ms/auto/<language>/lid"; "all" pools."""
    rates: dict[str, float] = {}
    pooled: dict[int, ErrorCount] = {}
    for (ms, language), count in sorted(counts.items()):
        rates[f"{ms}ms/{AUTO}/{language}/lid"] = 1.0 - _rate(count)
        add_count(pooled, ms, count)
    for ms, count in pooled.items():
        rates[f"{ms}ms/{AUTO}/all/lid"] = 1.0 - _rate(count)
    return rates


def rate_prefix(ms: int, mode: str) -> str:
    """The rate keys' head: the mode is left out for "language" (the true-language prompt)."""
    return f"{ms}ms" if mode == "language" else f"{ms}ms/{mode}"


def _rate(count: ErrorCount) -> float:
    # 0.0 where there are no reference units, as validation has always logged.
    return count.errors / max(count.units, 1)


def trained_chunk_ms(config: ModelConfig) -> list[int]:
    """The chunk sizes (ms) of the attention contexts a model was trained with.

    A context with right context R streams chunks of R + 1 encoder frames, each
    `config.encoder_frame_ms` long (40 ms for subsampling x4, 80 ms for x8).
    """
    frame = config.encoder_frame_ms
    return sorted({(right + 1) * frame for _, right in config.encoder.att_context_size})


def prompt_modes(
    prompt: PromptConfig | None, training_mode: str
) -> dict[str, Callable[[Sequence[str | None]], Tensor | None]]:
    """Validation prompt modes: the true language, `auto`, or both for mixed training."""

    def true_language(languages: Sequence[str | None]) -> Tensor | None:
        return choose_prompts(languages, prompt, "language", 0.0, torch.Generator())

    def auto(languages: Sequence[str | None]) -> Tensor | None:
        return choose_prompts(languages, prompt, "auto", 1.0, torch.Generator())

    if prompt is None or training_mode == "language":
        return {"language": true_language}
    if training_mode == "auto":
        return {AUTO: auto}
    return {"language": true_language, AUTO: auto}


def choose_prompts(
    languages: Sequence[str | None],
    prompt: PromptConfig | None,
    mode: str,
    auto_ratio: float,
    generator: torch.Generator,
) -> Tensor | None:
    """Prompt index per utterance: its language, `auto`, or `auto` with probability auto_ratio.

    Utterances without a language always get `auto`.

    Returns:
        (B,) int64, or None for a model without a prompt.

    Raises:
        LanguageError: a language the dictionary lacks, or `auto` needed but absent.
    """
    if prompt is None:
        return None
    draws = torch.rand(len(languages), generator=generator).tolist()
    indices = []
    for language, draw in zip(languages, draws, strict=True):
        use_auto = language is None or mode == "auto" or (mode == "mix" and draw < auto_ratio)
        if use_auto and AUTO not in prompt.dictionary:
            raise LanguageError(f"the prompt dictionary has no {AUTO!r} entry for {language!r}")
        indices.append(prompt.dictionary[AUTO] if use_auto else resolve_language(language, prompt))
    return torch.tensor(indices, dtype=torch.long)
