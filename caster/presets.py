"""Architecture presets of the two released models, with random weights.

They let the full-size model be built, tested and benchmarked without a
download. The weights are random and the tokenizer synthetic (pieces `▁w1`,
`▁w2`, ... plus the language tags), so the output is meaningless text; the cost
of every computation is the real one.
"""

from __future__ import annotations

import torch

from caster.checkpoint import Checkpoint
from caster.config import DecoderConfig, EncoderConfig, ModelConfig
from caster.languages import NEMOTRON_3_5_LOCALES, NEMOTRON_3_5_PROMPT
from caster.sentencepiece_proto import NORMAL, UNIGRAM, UNKNOWN, USER_DEFINED, model_proto

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


def random_checkpoint(name: str | ModelConfig, seed: int = 0) -> Checkpoint:
    """A preset's architecture (or any given config's) with PyTorch's default random
    initialisation."""
    from caster.transducer import Transducer

    cfg = preset_config(name) if isinstance(name, str) else name
    torch.manual_seed(seed)
    net = Transducer(cfg)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    tags = [f"<{locale}>" for locale in NEMOTRON_3_5_LOCALES] if cfg.prompt else []
    return Checkpoint(cfg, state, synthetic_tokenizer(cfg.decoder.vocab_size, tags))


def synthetic_tokenizer(vocab_size: int, tags: list[str]) -> bytes:
    """A serialized SentencePiece unigram model with `vocab_size` placeholder pieces.

    `<unk>`, then the tags as USER_DEFINED pieces, then NORMAL pieces `▁w1`,
    `▁w2`, ... scored -1, -2, ...; SentencePiece's default normalizer settings.
    """
    words = [f"▁w{i}" for i in range(1, vocab_size - len(tags))]
    pieces = ["<unk>", *tags, *words]
    scores = [0.0] * (1 + len(tags)) + [-float(i) for i in range(1, len(words) + 1)]
    types = [UNKNOWN] + [USER_DEFINED] * len(tags) + [NORMAL] * len(words)
    return model_proto(pieces, scores, types, model_type=UNIGRAM)
