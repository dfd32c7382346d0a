"""Scoring a model: WER/CER per chunk size, prompt mode and language.

Used by the training loop's validation and by `caster eval`. zh, ja, ko and th are
scored by characters without whitespace (CER), every other language by words (WER);
rates are corpus-level (all edits / all reference units). Prompt choice lives here
too, since scoring and training pick each utterance's prompt the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from caster.config import ENCODER_FRAME_MS, ModelConfig, PromptConfig
from caster.decoding import greedy_decode, initial_decoder_state
from caster.languages import AUTO, LanguageError, resolve_language
from caster.tokenizer import Tokenizer
from caster.train.data import Batch
from caster.transducer import Transducer

# Languages scored by character error rate: their text has no spaces between words.
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th"})

_Key = TypeVar("_Key")


def uses_cer(language: str | None) -> bool:
    """Whether a language is scored by characters (zh, ja, ko, th) instead of words."""
    return language is not None and language.split("-")[0].lower() in CER_LANGUAGES


def metric_of(language: str | None) -> str:
    """The metric of a language: "cer" (zh, ja, ko, th: by characters), else "wer"."""
    return "cer" if uses_cer(language) else "wer"


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def count_errors(reference: str, hypothesis: str, by_character: bool) -> tuple[int, int]:
    """(edit errors, reference units): words, or characters without whitespace for CER."""
    if by_character:
        ref, hyp = list("".join(reference.split())), list("".join(hypothesis.split()))
    else:
        ref, hyp = reference.split(), hypothesis.split()
    return edit_distance(ref, hyp), len(ref)


# (chunk_ms, prompt mode, language) -> [errors, units]
ErrorCounts = dict[tuple[int, str, str], list[int]]


@torch.inference_mode()
def evaluate(
    net: Transducer,
    tokenizer: Tokenizer,
    batches: Iterable[Batch],
    references: Callable[[int], str],
    chunk_ms: Sequence[int],
    prompt_modes: dict[str, Callable[[Sequence[str | None]], Tensor | None]],
    device: torch.device,
) -> ErrorCounts:
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

    Returns:
        error and unit counts per (chunk_ms, mode, language); add them across processes.
    """
    contexts = {ms: net.cfg.context_for_chunk_ms(ms) for ms in chunk_ms}
    counts: ErrorCounts = {}
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
                hyps, _ = greedy_decode(
                    net, prompted, lengths, initial_decoder_state(net, batch.size)
                )
                for hyp, index, language in zip(hyps, batch.indices, batch.languages, strict=True):
                    text, _ = tokenizer.split_language_tags(tokenizer.decode(hyp.token_ids))
                    reference, _ = tokenizer.split_language_tags(references(index))
                    errors, units = count_errors(reference, text, uses_cer(language))
                    _add(counts, (ms, mode, language or "none"), errors, units)
    return counts


def error_rates(counts: ErrorCounts) -> dict[str, float]:
    """Rates keyed "<ms>ms[/<mode>]/<language>/{wer,cer}"; language "all" pools them.

    The mode is omitted for "language" (the true-language prompt, or no prompt).
    """
    rates: dict[str, float] = {}
    for (ms, mode, language), (errors, units) in sorted(counts.items()):
        rates[f"{_prefix(ms, mode)}/{language}/{metric_of(language)}"] = errors / max(units, 1)
    for (ms, mode, metric), (errors, units) in pooled_counts(counts).items():
        rates[f"{_prefix(ms, mode)}/all/{metric}"] = errors / max(units, 1)
    return rates


def pooled_counts(counts: ErrorCounts) -> dict[tuple[int, str, str], list[int]]:
    """The counts added over languages: (chunk_ms, mode, "wer" or "cer") -> [errors, units]."""
    pooled: dict[tuple[int, str, str], list[int]] = {}
    for (ms, mode, language), (errors, units) in sorted(counts.items()):
        _add(pooled, (ms, mode, metric_of(language)), errors, units)
    return pooled


def merge_counts(parts: Iterable[ErrorCounts]) -> ErrorCounts:
    """The counts of several processes (or data shards) added together."""
    merged: ErrorCounts = {}
    for part in parts:
        for key, (errors, units) in part.items():
            _add(merged, key, errors, units)
    return merged


def _prefix(ms: int, mode: str) -> str:
    return f"{ms}ms" if mode == "language" else f"{ms}ms/{mode}"


def _add(counts: dict[_Key, list[int]], key: _Key, errors: int, units: int) -> None:
    total = counts.setdefault(key, [0, 0])
    total[0] += errors
    total[1] += units


def trained_chunk_ms(config: ModelConfig) -> list[int]:
    """The chunk sizes (ms) of the attention contexts a model was trained with."""
    return sorted({(right + 1) * ENCODER_FRAME_MS for _, right in config.encoder.att_context_size})


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
