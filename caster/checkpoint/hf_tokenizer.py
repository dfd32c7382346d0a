"""Read the tokenizer of a Hugging Face transformers directory as a SentencePiece model.

transformers' converters do not keep the SentencePiece file: they write
`tokenizer.json`, a `tokenizers` BPE model with the same pieces and ids (and
`tokenizer_config.json` beside it). `tokenizer_model` uses `tokenizer.model` as
it is when the directory has one, else rebuilds the SentencePiece model proto
from `tokenizer.json` (`sentencepiece_from_tokenizer_json`). Every file is
untrusted input.

The checked JSON readers (`_field`, `_read_json`) live here too and
`caster.checkpoint.hf` imports them for its config files; this module imports
nothing from it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

from caster.checkpoint import CheckpointError, read_bounded
from caster.sentencepiece_proto import (
    BPE,
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    model_proto,
)

TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"

# Far above any real file (3.5: config ~2 KB, tokenizer.json ~1 MB); stops a
# hostile file from being read into memory whole.
MAX_JSON_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20

# Python types a JSON value of each expected kind may have (bool is not an int here).
_JSON_KINDS: dict[type, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
    list: (list,),
    dict: (dict,),
}
_REQUIRED = object()


def _field(
    section: dict[str, Any],
    key: str,
    kind: type,
    where: str,
    default: Any = _REQUIRED,
    minimum: int | None = None,
) -> Any:
    """`section[key]`, checked to be of `kind` (and >= minimum); `default` when absent."""
    if key not in section:
        if default is _REQUIRED:
            raise CheckpointError(f"{where} has no {key!r}")
        return default
    value = section[key]
    if type(value) not in _JSON_KINDS[kind]:
        raise CheckpointError(f"{where}.{key} is {value!r}; expected a {kind.__name__}")
    if minimum is not None and value < minimum:
        raise CheckpointError(f"{where}.{key} is {value}; expected at least {minimum}")
    return float(value) if kind is float else value


def _read_json(file: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    try:
        data: Any = json.loads(read_bounded(file, limit))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{file.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name} holds a {type(data).__name__}, not an object")
    return data


def tokenizer_model(path: Path, vocab_size: int) -> bytes:
    """The SentencePiece model: `tokenizer.model` as it is, else rebuilt from `tokenizer.json`."""
    if (path / SENTENCEPIECE_FILE).is_file():
        return read_bounded(path / SENTENCEPIECE_FILE, MAX_TOKENIZER_BYTES)
    if not (path / TOKENIZER_JSON_FILE).is_file():
        raise CheckpointError(
            f"no tokenizer: neither {SENTENCEPIECE_FILE} nor {TOKENIZER_JSON_FILE}"
        )
    tokenizer = _read_json(path / TOKENIZER_JSON_FILE, MAX_TOKENIZER_BYTES)
    tokenizer_config = {}
    if (path / TOKENIZER_CONFIG_FILE).is_file():
        tokenizer_config = _read_json(path / TOKENIZER_CONFIG_FILE)
    return sentencepiece_from_tokenizer_json(tokenizer, tokenizer_config, vocab_size)


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def sentencepiece_from_tokenizer_json(
    tokenizer: dict[str, Any], tokenizer_config: dict[str, Any], vocab_size: int
) -> bytes:
    """Rebuild the SentencePiece model that transformers converted into `tokenizer.json`.

    transformers' `ParakeetConverter` turns the SentencePiece model into a
    `tokenizers` BPE model with the same pieces and ids, the normalizer's
    precompiled character map verbatim and merges ordered by piece score, and
    the converter appends `<pad>` and `<blank>` after the vocabulary. The
    inverse: the first `vocab_size` ids are the pieces. A piece is UNKNOWN if it
    is the unk token; CONTROL if it is a special added token; USER_DEFINED if
    it is any other added token, including the `<xx-XX>` language tags that the
    3.5 converter promotes to special (it lists them in `tokenizer_config.json`);
    BYTE if it is `<0xXX>`; else NORMAL, scored -(its rank among the normal
    pieces), the score SentencePiece's BPE trainer gives, which orders merges
    as `tokenizer.json` does.

    The result decodes every id as the original model does, and encodes text as
    it does when the original was a BPE model (so for both fixtures). A Unigram
    original's scores are not in `tokenizer.json`; text then encodes as
    transformers' own BPE conversion encodes it.

    Args:
        tokenizer: the parsed `tokenizer.json`.
        tokenizer_config: the parsed `tokenizer_config.json` ({} if absent).
        vocab_size: the decoder's vocabulary (number of pieces), i.e. the blank id.

    Returns:
        A serialized `sentencepiece.ModelProto`.

    Raises:
        CheckpointError: the tokenizer is not a converted SentencePiece model.
    """
    model = _field(tokenizer, "model", dict, TOKENIZER_JSON_FILE)
    kind = _field(model, "type", str, f"{TOKENIZER_JSON_FILE} model")
    if kind != "BPE":
        raise CheckpointError(
            f"{TOKENIZER_JSON_FILE} has a {kind!r} model; transformers' converter writes BPE"
        )
    added = _added_tokens(tokenizer)
    pieces = _pieces(
        _field(model, "vocab", dict, f"{TOKENIZER_JSON_FILE} model"), added, vocab_size
    )
    promoted = _promoted_special_tokens(tokenizer_config)
    types = []
    for i, piece in enumerate(pieces):
        token = added.get(i)
        if piece == model.get("unk_token"):
            types.append(UNKNOWN)
        elif token is not None and token["content"] == piece:
            types.append(CONTROL if token["special"] and piece not in promoted else USER_DEFINED)
        elif model.get("byte_fallback") is True and _BYTE_PIECE.fullmatch(piece):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    if types.count(UNKNOWN) != 1:
        raise CheckpointError(f"{TOKENIZER_JSON_FILE} has no unk_token among its pieces")
    ranks = iter(range(vocab_size))
    scores = [-float(next(ranks)) if t == NORMAL else 0.0 for t in types]
    charsmap, squeeze_spaces = _normalizer(tokenizer.get("normalizer"))
    return model_proto(
        pieces,
        scores,
        types,
        model_type=BPE,
        charsmap=charsmap,
        squeeze_spaces=squeeze_spaces,
        dummy_prefix=_dummy_prefix(tokenizer.get("pre_tokenizer")),
        byte_fallback=BYTE in types,
    )


def _pieces(vocab: dict[str, Any], added: dict[int, dict[str, Any]], vocab_size: int) -> list[str]:
    """The pieces with ids 0..vocab_size-1; any others must be the converter's added tokens."""
    by_id = {index: piece for piece, index in vocab.items() if type(index) is int}
    if len(by_id) != len(vocab):
        raise CheckpointError(f"{TOKENIZER_JSON_FILE} has duplicate or non-integer piece ids")
    if missing := [i for i in range(vocab_size) if i not in by_id]:
        raise CheckpointError(
            f"{TOKENIZER_JSON_FILE} lacks piece id {missing[0]} of the decoder's "
            f"{vocab_size}-token vocabulary"
        )
    if extra := sorted(i for i in by_id if i >= vocab_size and i not in added):
        raise CheckpointError(
            f"{TOKENIZER_JSON_FILE} has piece id {extra[0]} beyond the decoder's "
            f"{vocab_size}-token vocabulary"
        )
    return [by_id[i] for i in range(vocab_size)]


def _added_tokens(tokenizer: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Added tokens by id, each with a str `content` and a bool `special`."""
    added = {}
    for entry in _field(tokenizer, "added_tokens", list, TOKENIZER_JSON_FILE, []):
        if not (
            isinstance(entry, dict)
            and type(entry.get("id")) is int
            and isinstance(entry.get("content"), str)
            and isinstance(entry.get("special"), bool)
        ):
            raise CheckpointError(f"{TOKENIZER_JSON_FILE} has a malformed added token {entry!r}")
        added[entry["id"]] = entry
    return added


def _promoted_special_tokens(tokenizer_config: dict[str, Any]) -> set[str]:
    """Tokens the converter marked special although SentencePiece has them as ordinary pieces.

    `convert_nemotron3_5_asr_to_hf.py` lists the `<xx-XX>` language tags under
    `extra_special_tokens` (transformers 5; `additional_special_tokens` before).
    """
    names: set[str] = set()
    for key in ("extra_special_tokens", "additional_special_tokens"):
        for entry in _field(tokenizer_config, key, list, TOKENIZER_CONFIG_FILE, []):
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} {key} has {entry!r}")
            names.add(content)
    return names


def _normalizer(spec: Any) -> tuple[bytes, bool]:
    """(precompiled character map, remove_extra_whitespaces) from a `tokenizers` normalizer.

    transformers writes SentencePiece's normalizer as `Precompiled(charsmap)`
    followed by `Strip(right)` and `Replace(" {2,}", "▁")`, its form of
    `remove_extra_whitespaces`; anything else has no SentencePiece equivalent.
    """
    if spec is None:
        return b"", False
    if not isinstance(spec, dict):
        raise CheckpointError(f"{TOKENIZER_JSON_FILE} normalizer is {spec!r}")
    steps = spec.get("normalizers") if spec.get("type") == "Sequence" else [spec]
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise CheckpointError(f"{TOKENIZER_JSON_FILE} normalizer is malformed")
    charsmap = b""
    kinds = []
    for step in steps:
        kind = step.get("type")
        if kind == "Precompiled":
            encoded = step.get("precompiled_charsmap")
            try:
                charsmap = base64.b64decode(encoded or "", validate=True)
            except (binascii.Error, TypeError) as e:
                raise CheckpointError(
                    f"{TOKENIZER_JSON_FILE} has a corrupt precompiled_charsmap"
                ) from e
        elif (
            kind == "Strip" and step.get("strip_left") is False and step.get("strip_right") is True
        ):
            kinds.append("strip")
        elif (
            kind == "Replace"
            and step.get("pattern") == {"Regex": " {2,}"}
            and step.get("content") == "▁"
        ):
            kinds.append("squeeze")
        else:
            raise CheckpointError(
                f"{TOKENIZER_JSON_FILE} normalizer step {step.get('type')!r} has no SentencePiece "
                "equivalent"
            )
    if kinds not in ([], ["strip", "squeeze"]):
        raise CheckpointError(
            f"{TOKENIZER_JSON_FILE} normalizer steps {kinds} are not SentencePiece's"
        )
    return charsmap, bool(kinds)


def _dummy_prefix(spec: Any) -> bool:
    """SentencePiece's add_dummy_prefix from the `Metaspace` pre-tokenizer."""
    if not (
        isinstance(spec, dict)
        and spec.get("type") == "Metaspace"
        and spec.get("replacement") == "▁"
    ):
        raise CheckpointError(
            f"{TOKENIZER_JSON_FILE} pre_tokenizer is {spec!r}; expected a Metaspace with '▁'"
        )
    scheme = spec.get("prepend_scheme")
    if scheme not in ("always", "first", "never"):
        raise CheckpointError(f"{TOKENIZER_JSON_FILE} Metaspace prepend_scheme is {scheme!r}")
    return scheme != "never"
