"""The full-size architecture presets: exact parameter counts, tokenizer, chunk sizes."""

from __future__ import annotations

import pytest
import torch

from caster.presets import PRESETS, preset_config, synthetic_tokenizer
from caster.tokenizer import Tokenizer
from caster.transducer import Transducer

# architecture.md §5.2: counted from the released checkpoints' shapes.
EXPECTED_WEIGHTS = {
    "nemotron-3.5-asr-streaming-0.6b": 637_997_088,
    "nemotron-speech-streaming-en-0.6b": 618_084_865,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_and_keys(name):
    with torch.device("meta"):  # shapes only, no memory
        net = Transducer(preset_config(name))
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("preprocessor.")}
    assert sum(v.numel() for v in weights.values()) == EXPECTED_WEIGHTS[name]
    assert net.state_dict()["preprocessor.featurizer.fb"].shape == (1, 128, 257)
    assert len(weights) == (655 if preset_config(name).prompt else 651)  # + 2 front-end buffers


def test_chunk_sizes_of_presets():
    assert preset_config("nemotron-3.5-asr-streaming-0.6b").supported_chunk_ms() == [
        80, 160, 320, 560, 1120
    ]  # fmt: skip
    en = preset_config("nemotron-speech-streaming-en-0.6b")
    assert en.supported_chunk_ms() == [80, 160, 560, 1120]
    with pytest.raises(
        ValueError, match=r"320 .*supported chunk sizes: 80 ms, 160 ms, 560 ms, 1120 ms"
    ):
        en.context_for_chunk_ms(320)
    assert en.context_for_chunk_ms(None) == (70, 13)
    assert en.context_for_chunk_ms(160) == (70, 1)


def test_synthetic_tokenizer():
    tok = Tokenizer(synthetic_tokenizer(13087, ["<en-US>", "<de-DE>"]))
    assert tok.vocab_size == 13087
    assert set(tok.language_tag_ids.values()) == {"en-US", "de-DE"}
    text, tags = tok.split_language_tags(tok.decode([5, 1, 6]))
    assert tags == ["en-US"] and "<" not in text


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"presets: nemotron-3\.5"):
        preset_config("nope")
