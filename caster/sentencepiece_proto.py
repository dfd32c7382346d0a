"""Serialize a SentencePiece model (`sentencepiece.ModelProto`) without protobuf.

Two callers build a model from pieces: `caster.checkpoint.hf_tokenizer`
rebuilds the original from a transformers `tokenizer.json`, and
`caster.presets` makes a placeholder vocabulary. The protocol-buffer wire
format is written by hand (field numbers of sentencepiece_model.proto) so that
neither needs a protobuf dependency.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2


def model_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    model_type: int,
    charsmap: bytes = b"",
    squeeze_spaces: bool = True,
    dummy_prefix: bool = True,
    byte_fallback: bool = False,
) -> bytes:
    """Serialize a `sentencepiece.ModelProto`.

    The trainer spec records the ids SentencePiece derives from the pieces
    (unk, and bos/eos/pad as the CONTROL pieces `<s>`, `</s>`, `<pad>`, else -1).
    The normalizer always escapes whitespace as "▁", as every model here does.

    Args:
        pieces: the vocabulary, id order.
        scores: one score per piece.
        types: one `ModelProto.SentencePiece.Type` per piece (NORMAL, ...);
            exactly one UNKNOWN.
        model_type: UNIGRAM or BPE.
        charsmap: the normalizer's precompiled character map; empty for none.
        squeeze_spaces: the normalizer's remove_extra_whitespaces.
        dummy_prefix: the normalizer's add_dummy_prefix (a "▁" before the text).
        byte_fallback: unknown characters encode as `<0xXX>` BYTE pieces.

    Returns:
        The serialized proto, loadable by `sentencepiece.SentencePieceProcessor`.

    Raises:
        ValueError: the lists differ in length, there is not exactly one
            UNKNOWN piece, or the model type is neither UNIGRAM nor BPE.
    """
    if model_type not in (UNIGRAM, BPE):
        raise ValueError(f"model_type is {model_type}; expected UNIGRAM (1) or BPE (2)")
    if list(types).count(UNKNOWN) != 1:
        raise ValueError(f"{list(types).count(UNKNOWN)} UNKNOWN pieces; SentencePiece needs one")

    def control_id(name: str) -> int:
        return next((i for i, p in enumerate(pieces) if p == name and types[i] == CONTROL), -1)

    unk = list(types).index(UNKNOWN)
    # repeated SentencePiece pieces = 1 {piece = 1; float score = 2; type = 3}
    proto = b"".join(
        _bytes_field(
            1,
            _bytes_field(1, piece.encode())
            + _tag(2, 5)
            + struct.pack("<f", score)
            + _varint_field(3, piece_type),
        )
        for piece, score, piece_type in zip(pieces, scores, types, strict=True)
    )
    trainer = b"".join(
        (
            _varint_field(3, model_type),  # model_type
            _varint_field(4, len(pieces)),  # vocab_size
            _varint_field(35, byte_fallback),  # byte_fallback
            _varint_field(40, unk),  # unk_id
            _varint_field(41, control_id("<s>")),  # bos_id
            _varint_field(42, control_id("</s>")),  # eos_id
            _varint_field(43, control_id("<pad>")),  # pad_id
            _bytes_field(45, pieces[unk].encode()),  # unk_piece
        )
    )
    normalizer = b"".join(
        (
            # name: informational once a character map is given.
            _bytes_field(1, b"user_defined" if charsmap else b"identity"),
            _bytes_field(2, charsmap),  # precompiled_charsmap
            _varint_field(3, dummy_prefix),  # add_dummy_prefix
            _varint_field(4, squeeze_spaces),  # remove_extra_whitespaces
            _varint_field(5, True),  # escape_whitespaces (Metaspace "▁")
        )
    )
    return proto + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


# Protocol-buffer wire format, just what a ModelProto needs.
def _varint(value: int) -> bytes:
    value &= 2**64 - 1  # a negative int32 is sent as its 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
    return _tag(field, 0) + _varint(int(value))


def _bytes_field(field: int, data: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(data)) + data
