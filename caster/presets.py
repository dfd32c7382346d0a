"""Architecture presets of the two released models, with random weights.

They let the full-size model be built, tested and benchmarked without a
download. The weights are random and the tokenizer synthetic (pieces `▁w1`,
`▁w2`, ... plus the language tags), so the output is meaningless text; the cost
of every computation is the real one.
"""

from __future__ import annotations

import struct

import torch

from caster.checkpoint import Checkpoint
from caster.config import DecoderConfig, EncoderConfig, ModelConfig
from caster.languages import NEMOTRON_3_5_LOCALES, NEMOTRON_3_5_PROMPT

# nvidia/nemotron-3.5-asr-streaming-0.6b (architecture.md §2.1, §5.2): 637,997,088 weights.
NEMOTRON_3_5 = ModelConfig(
    encoder=EncoderConfig(att_context_size=((56, 3), (56, 0), (56, 6), (56, 13))),
    decoder=DecoderConfig(vocab_size=13087),
    prompt=NEMOTRON_3_5_PROMPT,
)

# nvidia/nemotron-speech-streaming-en-0.6b: 618,084,865 weights. Its xscaling flag is
# unverified (a real checkpoint carries its own config); it does not change the cost.
NEMOTRON_EN = ModelConfig(
    encoder=EncoderConfig(att_context_size=((70, 13), (70, 6), (70, 1), (70, 0))),
    decoder=DecoderConfig(vocab_size=1024),
)

PRESETS = {
    "nemotron-3.5-asr-streaming-0.6b": NEMOTRON_3_5,
    "nemotron-speech-streaming-en-0.6b": NEMOTRON_EN,
}


def preset_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def random_checkpoint(name: str, seed: int = 0) -> Checkpoint:
    """The preset's architecture with PyTorch's default random initialisation."""
    from caster.transducer import Transducer

    cfg = preset_config(name)
    torch.manual_seed(seed)
    net = Transducer(cfg)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    tags = [f"<{locale}>" for locale in NEMOTRON_3_5_LOCALES] if cfg.prompt else []
    return Checkpoint(cfg, state, synthetic_tokenizer(cfg.decoder.vocab_size, tags))


def synthetic_tokenizer(vocab_size: int, tags: list[str]) -> bytes:
    """A serialized SentencePiece unigram model with `vocab_size` placeholder pieces.

    Written as protobuf by hand (ModelProto: pieces = 1, trainer_spec = 2,
    normalizer_spec = 3) to avoid a protobuf dependency for a test artefact.
    """
    words = [f"▁w{i}" for i in range(1, vocab_size - len(tags))]
    pieces = [("<unk>", 0.0, 2)] + [(t, 0.0, 4) for t in tags]  # 2 UNKNOWN, 4 USER_DEFINED
    pieces += [(w, -float(i), 1) for i, w in enumerate(words, 1)]  # 1 NORMAL
    proto = b"".join(_field(1, _piece(*p)) for p in pieces)
    proto += _field(2, _varint(3 << 3) + _varint(1))  # trainer_spec.model_type = UNIGRAM
    proto += _field(3, _field(1, b"identity") + _varint(3 << 3) + _varint(1))  # add_dummy_prefix
    return proto


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _piece(text: str, score: float, kind: int) -> bytes:
    return (
        _field(1, text.encode())
        + _varint(2 << 3 | 5)
        + struct.pack("<f", score)
        + _varint(3 << 3)
        + _varint(kind)
    )
