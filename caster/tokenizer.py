"""SentencePiece tokenizer with NeMo's RNNT hypothesis-text rules.

NeMo's `RNNTBPEDecoding` turns greedy token ids into text in three steps: drop
the blank id, map ids to pieces and `decode_pieces` them, then delete one
whitespace character before every punctuation mark the vocabulary knows
(some vocabularies hold "▁," pieces, which would otherwise print "hello , world").
`Tokenizer.decode` reproduces that text exactly, language tags such as
"<en-US>" included; `Tokenizer.split_language_tags` takes them out afterwards.
"""

from __future__ import annotations

import operator
import re
import unicodedata
from collections.abc import Iterable, Sequence

import sentencepiece

# Language-tag pieces of the multilingual (3.5) vocabulary: "<en-US>", "<haw-US>".
LANGUAGE_TAG = re.compile(r"<([a-z]{2,3}-[A-Za-z]{2})>")

# NeMo's `extract_punctuation_from_vocab` ignores the characters of pieces that
# look special ("<unk>", "<en-US>", "[laugh]"), word-piece continuations ("##x"),
# word-initial pieces ("▁¿") and whitespace-only pieces.
_SPECIAL_PIECE = re.compile(r"(?:<.*>|\[.*\])$|##|▁|\s*$")


class TokenizerError(ValueError):
    """A tokenizer model or a token id is unusable."""


def vocabulary_punctuation(pieces: Iterable[str]) -> frozenset[str]:
    """The punctuation marks NeMo's RNNT decoding treats as supported.

    Every character of Unicode category P that occurs in a piece which is not
    special by NeMo's rule (see `_SPECIAL_PIECE`).

    Args:
        pieces: the vocabulary, one string per piece.

    Returns:
        The set of single punctuation characters.
    """
    return frozenset(
        char
        for piece in pieces
        if not _SPECIAL_PIECE.match(piece)
        for char in piece
        if unicodedata.category(char).startswith("P")
    )


class Tokenizer:
    """A SentencePiece model plus the RNNT conventions caster needs.

    The RNNT blank id equals `vocab_size`; it is not a piece.

    Args:
        model_proto: the serialized SentencePiece model (the `*_tokenizer.model`
            file of a `.nemo` archive).

    Raises:
        TokenizerError: the bytes are not a SentencePiece model, or it has no pieces.
    """

    def __init__(self, model_proto: bytes) -> None:
        if not isinstance(model_proto, bytes | bytearray | memoryview):
            raise TokenizerError(
                f"a SentencePiece model must be given as bytes, not {type(model_proto).__name__}"
            )
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(model_proto))
        except (RuntimeError, TypeError, ValueError) as e:
            raise TokenizerError(
                f"not a valid SentencePiece model ({len(model_proto)} bytes)"
            ) from e
        self._pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        if not self._pieces:
            raise TokenizerError("the SentencePiece model has no pieces")
        self._punctuation = vocabulary_punctuation(self._pieces)
        # NeMo: re.compile(r'(\s)(p1|p2|...)').sub(r'\2', text); every mark is one
        # character, so a character class is the same pattern.
        self._space_before_punct = (
            re.compile(r"\s([" + "".join(re.escape(p) for p in sorted(self._punctuation)) + "])")
            if self._punctuation
            else None
        )
        self._language_tag_ids = {
            i: m.group(1)
            for i, piece in enumerate(self._pieces)
            if (m := LANGUAGE_TAG.fullmatch(piece))
        }
        self._language_tags = (
            re.compile(
                r"\s*("
                + "|".join(re.escape(f"<{tag}>") for tag in self._language_tag_ids.values())
                + r")\s*"
            )
            if self._language_tag_ids
            else None
        )

    @property
    def vocab_size(self) -> int:
        """Number of pieces; also the RNNT blank id."""
        return len(self._pieces)

    @property
    def blank_id(self) -> int:
        return len(self._pieces)

    @property
    def pieces(self) -> list[str]:
        """The vocabulary, indexed by token id (a copy)."""
        return list(self._pieces)

    @property
    def punctuation(self) -> frozenset[str]:
        """Punctuation marks before which decoding deletes one whitespace."""
        return self._punctuation

    @property
    def language_tag_ids(self) -> dict[int, str]:
        """Token id -> locale ("en-US") of every language-tag piece (a copy)."""
        return dict(self._language_tag_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (SentencePiece's own encoding, as NeMo's `text_to_ids`)."""
        return self._sp.encode(text, out_type=int)

    def id_to_piece(self, token_id: int) -> str:
        """The piece of a token id; raises TokenizerError for the blank or any other non-piece."""
        i = operator.index(token_id)
        if not 0 <= i < len(self._pieces):
            raise TokenizerError(f"token id {i} is not a piece (vocabulary of {len(self._pieces)})")
        return self._pieces[i]

    def decode(self, ids: Sequence[int]) -> str:
        """Hypothesis text exactly as NeMo's RNNT BPE decoding builds it.

        Blank ids are dropped; language tags stay in the text.

        Args:
            ids: token ids, (U,); blank (== vocab_size) allowed anywhere.

        Returns:
            The text, which can end in a space (NeMo keeps a trailing "▁").

        Raises:
            TokenizerError: an id is negative or above the blank id.
        """
        blank = self.blank_id
        pieces = [self.id_to_piece(i) for i in ids if operator.index(i) != blank]
        text = self._sp.decode_pieces(pieces)
        if self._space_before_punct is not None:
            text = self._space_before_punct.sub(r"\1", text)
        return text

    def split_language_tags(self, text: str) -> tuple[str, list[str]]:
        """Remove this vocabulary's language tags from decoded text.

        The whitespace around each tag collapses to one space between the text
        on either side, and to nothing at the start or end:
        "Texas. <en-US> The" -> ("Texas. The", ["en-US"]). Text without tags
        comes back unchanged.

        Args:
            text: output of `decode`.

        Returns:
            The text without tags, and the tags' locales in order of appearance.
        """
        if self._language_tags is None:
            return text, []
        # split() with one group alternates text segment, tag, text segment, ...
        parts = self._language_tags.split(text)
        segments, tags = parts[0::2], parts[1::2]
        return " ".join(s for s in segments if s), [tag[1:-1] for tag in tags]
