"""The Hugging Face transformers layout: tests/data/hf/ against the NeMo fixtures.

tests/data/hf/<model>/ were written by transformers' own converters from the
two NeMo fixtures (tests/data/hf/README.md), so a faithful reader must give
back exactly the `.nemo`'s tensors, config and tokenizer. Broken directories
are copies of those with one thing wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import sentencepiece
import torch
from conftest import DATA, EN_MODEL, PROMPT_MODEL, nemo_path

from caster.checkpoint import CheckpointError, load_checkpoint
from caster.checkpoint.hf import load_hf
from caster.checkpoint.nemo import load_nemo

HF_DATA = DATA / "hf"
MODELS = [EN_MODEL, PROMPT_MODEL]
# HF's converter drops NeMo's featurizer buffers; caster computes them from MelConfig.
FEATURIZER = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")
# Default attention context of each fixture, as tagged in oracle.npz.
DEFAULT_CONTEXT = {EN_MODEL: "ctx70_13", PROMPT_MODEL: "ctx56_3"}
TEXTS = [
    "the speech model listens to the audio stream",
    "Hello  World, wir sind   noch nicht da ",
    "ﬁne ① ÀÉÎ <en-US> nous sommes <fr-FR>",
]


def _copy(model: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(HF_DATA / model, tmp_path / model))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_weights(directory: Path, edit) -> None:
    tensors = safetensors.torch.load_file(directory / "model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize("model", MODELS)
def test_state_dict_is_the_nemo_one(model):
    hf = load_hf(HF_DATA / model)
    nemo = load_nemo(nemo_path(model))
    expected = {k: v for k, v in nemo.state_dict.items() if k not in FEATURIZER}
    assert len(expected) == len(nemo.state_dict) - 2
    assert sorted(hf.state_dict) == sorted(expected)
    for key, tensor in expected.items():
        assert hf.state_dict[key].dtype == tensor.dtype, key
        assert torch.equal(hf.state_dict[key], tensor), key


@pytest.mark.parametrize("model", MODELS)
def test_config_is_the_nemo_one(model):
    # Every field is equal. Three are not in the HF layout and come from
    # ModelConfig.from_nemo's defaults: encoder.dropout_pre_encoder (0.1),
    # encoder.att_context_probs (None) and decoder.dropout (0.2). They matter only
    # for training and equal the fixtures' values. The mel settings other than
    # rates, sizes, pre-emphasis and pad value are hard-coded in HF's feature
    # extractor, and equal NeMo's.
    assert load_hf(HF_DATA / model).config == load_nemo(nemo_path(model)).config


def test_prompt_dictionary_comes_from_the_processor_config(tmp_path):
    hf = load_hf(HF_DATA / PROMPT_MODEL).config.prompt
    assert hf is not None and hf.dictionary["auto"] == 101 and hf.num_prompts == 128
    assert load_hf(HF_DATA / EN_MODEL).config.prompt is None

    directory = _copy(PROMPT_MODEL, tmp_path)
    _edit_json(directory / "processor_config.json", lambda p: p.update(prompt_dictionary={"xx": 5}))
    assert load_hf(directory).config.prompt.dictionary == {"xx": 5}


@pytest.mark.parametrize("model", MODELS)
def test_tokenizer_rebuilt_from_tokenizer_json_is_the_nemo_one(model):
    rebuilt = sentencepiece.SentencePieceProcessor(
        model_proto=load_hf(HF_DATA / model).tokenizer_model
    )
    original = sentencepiece.SentencePieceProcessor(
        model_proto=load_nemo(nemo_path(model)).tokenizer_model
    )
    ids = range(original.get_piece_size())
    assert rebuilt.get_piece_size() == original.get_piece_size()
    for query in ("id_to_piece", "get_score", "is_unknown", "is_control", "is_byte", "is_unused"):
        assert [getattr(rebuilt, query)(i) for i in ids] == [
            getattr(original, query)(i) for i in ids
        ], query
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(original.encode(text)) == original.decode(original.encode(text))
    assert rebuilt.decode(list(ids)) == original.decode(list(ids))


def test_language_tags_stay_single_user_pieces():
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_proto=load_hf(HF_DATA / PROMPT_MODEL).tokenizer_model
    )
    tag = tokenizer.piece_to_id("<de-DE>")
    assert tag != tokenizer.unk_id() and not tokenizer.is_control(tag)
    assert tag in tokenizer.encode("wir sind <de-DE> da")
    assert tokenizer.decode([tag]) == "<de-DE>"


def test_sentencepiece_file_is_used_as_it_is(tmp_path):
    nemo = load_nemo(nemo_path(PROMPT_MODEL))
    directory = _copy(PROMPT_MODEL, tmp_path)
    (directory / "tokenizer.model").write_bytes(nemo.tokenizer_model)
    (directory / "tokenizer.json").unlink()
    assert load_hf(directory).tokenizer_model == nemo.tokenizer_model


def test_load_checkpoint_reads_the_hf_layout():
    checkpoint = load_checkpoint(HF_DATA / EN_MODEL)
    assert checkpoint.config == load_hf(HF_DATA / EN_MODEL).config


def test_linear_shaped_pointwise_conv_is_reshaped(tmp_path):
    directory = _copy(EN_MODEL, tmp_path)
    key = "encoder.layers.1.conv.pointwise_conv1.weight"  # the same name in both layouts
    _edit_weights(directory, lambda t: t.update({key: t[key][:, :, 0].clone()}))
    loaded = load_hf(directory).state_dict[key]
    assert loaded.shape == (192, 96, 1)
    assert torch.equal(loaded, load_nemo(nemo_path(EN_MODEL)).state_dict[key])


@pytest.mark.parametrize("model", MODELS)
def test_transformers_ran_the_same_model(model, oracle):
    """transformers' own outputs with these files equal NeMo's (see make_hf_outputs.py)."""
    hf = np.load(HF_DATA / "hf_outputs.npz")
    nemo = f"{model}/wave_a/{DEFAULT_CONTEXT[model]}/offline"
    np.testing.assert_allclose(
        hf[f"{model}/wave_a/encoded"], oracle[f"{nemo}/encoded"], rtol=0, atol=1e-5
    )
    languages = [""] if model == EN_MODEL else ["/en-US", "/de-DE", "/fr-FR", "/auto"]
    for language in languages:
        np.testing.assert_array_equal(
            hf[f"{model}/wave_a{language}/tokens"], oracle[f"{nemo}{language}/tokens"]
        )


def _without(name):
    return lambda d: (d / name).unlink()


def _set_config(path, value):
    """Set config.json field `path` ("a.b") to value."""

    def edit(directory):
        def change(config):
            *parents, leaf = path.split(".")
            for part in parents:
                config = config[part]
            config[leaf] = value

        _edit_json(directory / "config.json", change)

    return edit


def _weights(edit):
    return lambda d: _edit_weights(d, edit)


def _tokenizer_json(edit):
    return lambda d: _edit_json(d / "tokenizer.json", edit)


BROKEN = {
    "no config": (_without("config.json"), r"config\.json"),
    "no weights": (_without("model.safetensors"), r"model\.safetensors"),
    "no tokenizer": (_without("tokenizer.json"), "no tokenizer"),
    "config not json": (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1]"), "not an object"),
    "other model type": (_set_config("model_type", "parakeet_ctc"), "model_type"),
    "string size": (_set_config("encoder_config.hidden_size", "96"), r"hidden_size is '96'"),
    "bool size": (_set_config("num_decoder_layers", True), "num_decoder_layers"),
    "empty encoder": (_set_config("encoder_config", {}), "encoder_config has no"),
    "blank not last": (_set_config("blank_token_id", 5), "blank"),
    "no heads": (_set_config("encoder_config.num_attention_heads", 0), "expected at least 1"),
    "huge depth": (_set_config("encoder_config.num_hidden_layers", 10**9), "more layers than"),
    "left context": (_set_config("encoder_config.sliding_window", 70), "att_context_size"),
    "lookahead": (
        _set_config("encoder_config.default_num_lookahead_tokens", 2),
        "not a supported lookahead",
    ),
    "split biases": (_set_config("encoder_config.convolution_bias", False), "use_bias"),
    "other act": (_set_config("encoder_config.hidden_act", "gelu"), "hidden_act"),
    "unknown key": (
        _weights(lambda t: t.update({"encoder.extra.weight": torch.zeros(2)})),
        "does not know: 'encoder.extra.weight'",
    ),
    "missing key": (
        _weights(lambda t: t.pop("encoder.layers.0.self_attn.q_proj.weight")),
        "lacks tensors: 'encoder.layers.0.self_attn.linear_q.weight'",
    ),
    "extra layer": (
        _weights(lambda t: t.update({"encoder.layers.7.norm_out.bias": torch.zeros(96)})),
        "does not describe.*'encoder.layers.7.norm_out.bias'",
    ),
    "wrong shape": (
        _weights(lambda t: t.update({"joint.head.weight": torch.zeros(129, 63)})),
        r"'joint.joint_net.2.weight' has shape \[129, 63\]; the config implies \[129, 64\]",
    ),
    "corrupt weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
        "corrupt",
    ),
    "other feature extractor": (
        lambda d: _edit_json(
            d / "processor_config.json",
            lambda p: p["feature_extractor"].update(
                feature_extractor_type="ParakeetFeatureExtractor"
            ),
        ),
        "ParakeetFeatureExtractor",
    ),
    "tokenizer piece missing": (
        _tokenizer_json(lambda t: t["model"]["vocab"].pop("▁a")),
        "lacks piece id 1",
    ),
    "tokenizer lowercases": (
        _tokenizer_json(lambda t: t["normalizer"]["normalizers"].append({"type": "Lowercase"})),
        "'Lowercase' has no SentencePiece equivalent",
    ),
    "tokenizer not bpe": (_tokenizer_json(lambda t: t["model"].update(type="WordPiece")), "BPE"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_directory_is_refused_clearly(case, tmp_path):
    break_it, message = BROKEN[case]
    directory = _copy(EN_MODEL, tmp_path)
    break_it(directory)
    with pytest.raises(CheckpointError, match=message) as error:
        load_hf(directory)
    assert str(directory) in str(error.value)


def test_prompt_model_needs_its_prompt_dictionary(tmp_path):
    directory = _copy(PROMPT_MODEL, tmp_path)
    _edit_json(directory / "processor_config.json", lambda p: p.pop("prompt_dictionary"))
    with pytest.raises(CheckpointError, match="no 'prompt_dictionary'"):
        load_hf(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "missing")


@pytest.mark.parametrize(("model", "language"), [(EN_MODEL, None), (PROMPT_MODEL, "de-DE")])
def test_caster_transcribes_from_the_hf_layout_as_nemo(model, language, oracle):
    from caster.model import load

    transcript = load(HF_DATA / model).transcribe(oracle["inputs/wave_a"], language=language)
    nemo = f"{model}/wave_a/{DEFAULT_CONTEXT[model]}/offline" + (f"/{language}" if language else "")
    assert transcript.token_ids == oracle[f"{nemo}/tokens"].tolist()
