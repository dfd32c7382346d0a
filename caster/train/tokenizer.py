"""Train a SentencePiece tokenizer for a model trained from scratch.

The result matches the released multilingual vocabulary's conventions: `nmt_nfkc`
normalisation, no byte fallback, `<unk>` as id 0, no BOS/EOS/PAD pieces, and one
user-defined piece per language tag (`<en-US>`), which SentencePiece never splits or
normalises, so `caster.tokenizer.Tokenizer.language_tag_ids` finds them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from typing import Literal

import sentencepiece

from caster.tokenizer import LANGUAGE_TAG, Tokenizer
from caster.train.data import ManifestEntry

ModelType = Literal["unigram", "bpe"]


class TokenizerTrainingError(ValueError):
    """SentencePiece training cannot run on these texts or settings."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    language_tags: list[str],
    model_type: ModelType = "unigram",
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    seed_sentencepiece_size: int = 1_000_000,
) -> bytes:
    """Train a SentencePiece model in memory.

    Args:
        texts: training sentences (transcripts), one string each; empty ones are ignored.
        vocab_size: pieces in the model, language tags and `<unk>` included; the RNN-T
            blank will be id `vocab_size`.
        language_tags: locales such as "en-US" (or "<en-US>"); each becomes a piece
            "<en-US>". Order is kept: the first tag gets id 1.
        model_type: "unigram" (the released models' algorithm) or "bpe".
        character_coverage: share of characters covered by the vocabulary; the rest map to
            `<unk>`. 0.9995 is SentencePiece's advice for large multilingual character sets;
            use 1.0 for small alphabets where every character must be encodable.
        max_sentences: at most this many sentences are sampled for training.
        seed_sentencepiece_size: unigram seed vocabulary size.

    Returns:
        The serialized model (the bytes of a `tokenizer.model` file).

    Raises:
        TokenizerTrainingError: a malformed tag, duplicate tags, a vocabulary too small for
            the tags, no text, or SentencePiece's own refusal (e.g. vocab_size larger than
            the text supports).
    """
    if model_type not in ("unigram", "bpe"):
        raise TokenizerTrainingError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    symbols = [_tag_piece(tag) for tag in language_tags]
    if len(set(symbols)) != len(symbols):
        raise TokenizerTrainingError(f"duplicate language tags in {language_tags}")
    if vocab_size < len(symbols) + 2:
        raise TokenizerTrainingError(
            f"vocab_size {vocab_size} leaves no room beside <unk> and {len(symbols)} tags"
        )
    sentences = _non_empty(texts)
    try:
        first = next(sentences)
    except StopIteration:
        raise TokenizerTrainingError("no non-empty text to train the tokenizer on") from None
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_chain(first, sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=symbols,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            byte_fallback=False,
            normalization_rule_name="nmt_nfkc",
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerTrainingError(f"SentencePiece training failed: {e}") from e
    proto = model.getvalue()
    tokenizer = Tokenizer(proto)
    found = sorted(tokenizer.language_tag_ids.values())
    if found != sorted(symbol[1:-1] for symbol in symbols):
        raise TokenizerTrainingError(f"language tags missing from the model: {found}")
    return proto


def manifest_texts(entries: Iterable[ManifestEntry]) -> Iterator[str]:
    """The transcripts of manifest entries, for `train_tokenizer`."""
    return (entry.text for entry in entries)


def manifest_languages(entries: Iterable[ManifestEntry]) -> list[str]:
    """The distinct language fields of manifest entries, sorted; entries without one skipped."""
    return sorted({entry.language for entry in entries if entry.language})


def _tag_piece(tag: str) -> str:
    piece = tag if tag.startswith("<") else f"<{tag}>"
    if not LANGUAGE_TAG.fullmatch(piece):
        raise TokenizerTrainingError(
            f"language tag {tag!r} is not a locale like 'en-US' (pattern {LANGUAGE_TAG.pattern})"
        )
    return piece


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerTrainingError(f"texts must be strings, got {type(text).__name__}")
        if text.strip():
            yield text


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
