"""`.nemo` export: NVIDIA's archive layout, reloading in caster with identical outputs."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest
import torch
import yaml
from conftest import EN_MODEL, NEMO_FIXTURES, PROMPT_MODEL, nemo_path, require_fixture

import caster
from caster.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from caster.config import DecoderConfig, EncoderConfig, MelConfig, ModelConfig
from caster.presets import synthetic_tokenizer
from caster.train.export import NEMO_PROMPT_TARGET, NEMO_TARGET, export_nemo
from caster.transducer import Transducer


def archive_members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.mark.parametrize("name", [EN_MODEL, PROMPT_MODEL])
def test_exported_nemo_reloads_with_identical_outputs(tmp_path, name, oracle):
    source = load_checkpoint(nemo_path(name))
    exported = load_checkpoint(export_nemo(source, tmp_path / "model.nemo"))
    assert exported.config == source.config
    assert exported.tokenizer_model == source.tokenizer_model
    assert exported.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(exported.state_dict[k], v) for k, v in source.state_dict.items())

    original, reloaded = caster.load(nemo_path(name)), caster.load(tmp_path / "model.nemo")
    wave = oracle["inputs/wave_a"]
    languages = ["en-US", "auto"] if source.config.prompt else [None]
    for ms in original.config.supported_chunk_ms():
        for language in languages:
            expected = original.transcribe(wave, language=language, chunk_ms=ms)
            assert reloaded.transcribe(wave, language=language, chunk_ms=ms) == expected
    audio = torch.from_numpy(wave)[None]
    lengths = torch.tensor([audio.shape[1]])
    with torch.inference_mode():
        outputs = [
            m.net.encoder(*m.net.preprocessor(audio, lengths), m.config.default_context)[0]
            for m in (original, reloaded)
        ]
    assert torch.equal(*outputs)


@pytest.mark.parametrize("name", [EN_MODEL, PROMPT_MODEL])
def test_archive_has_nemo_layout(tmp_path, name):
    source = load_checkpoint(nemo_path(name))
    members = archive_members(export_nemo(source, tmp_path / "model.nemo"))
    assert all(member.startswith("./") for member in members)
    config = yaml.safe_load(members["./model_config.yaml"])
    assert ModelConfig.from_nemo(config) == source.config
    assert config["target"] == (NEMO_PROMPT_TARGET if source.config.prompt else NEMO_TARGET)
    tokenizer = config["tokenizer"]
    assert tokenizer["type"] == "bpe"
    for key, suffix in [
        ("model_path", "_tokenizer.model"),
        ("vocab_path", "_vocab.txt"),
        ("spe_tokenizer_vocab", "_tokenizer.vocab"),
    ]:
        member = tokenizer[key].removeprefix("nemo:")
        assert tokenizer[key].startswith("nemo:") and member.endswith(suffix)
        assert f"./{member}" in members
    assert members[f"./{tokenizer['model_path'].removeprefix('nemo:')}"] == source.tokenizer_model
    pieces = caster.load(nemo_path(name)).tokenizer.pieces
    assert config["joint"]["vocabulary"] == config["labels"] == pieces
    weights = torch.load(io.BytesIO(members["./model_weights.ckpt"]), weights_only=True)
    assert weights.keys() == source.state_dict.keys()
    # Every key written is one NeMo itself writes (the fixture configs come from NeMo).
    reference = yaml.safe_load(
        require_fixture(NEMO_FIXTURES / f"{name}.model_config.yaml").read_text()
    )
    for section in ("preprocessor", "encoder", "decoder", "joint", "model_defaults"):
        assert set(config[section]) <= set(reference[section]), section
    assert config["model_defaults"] == reference["model_defaults"]


def tiny_checkpoint(joint_dropout: float) -> Checkpoint:
    config = ModelConfig(
        mel=MelConfig(n_mels=32, preemph=None, mel_norm=None),
        encoder=EncoderConfig(
            feat_in=32,
            n_layers=1,
            d_model=32,
            n_heads=2,
            subsampling_conv_channels=8,
            att_context_size=((8, 1), (8, 0)),
            att_context_probs=(0.25, 0.75),
            xscaling=True,
            use_bias=True,
        ),
        decoder=DecoderConfig(
            vocab_size=20, pred_hidden=16, pred_rnn_layers=1, joint_hidden=16, dropout=joint_dropout
        ),
    )
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in Transducer(config).state_dict().items()}
    return Checkpoint(config, state, synthetic_tokenizer(20, []))


@pytest.mark.parametrize(("dropout", "index"), [(0.0, 1), (0.3, 2)])
def test_joint_output_layer_named_as_nemo_builds_it(tmp_path, dropout, index):
    # NeMo's joint_net is Sequential(ReLU, Linear) without dropout, (ReLU, Dropout, Linear) with.
    checkpoint = tiny_checkpoint(dropout)
    path = export_nemo(checkpoint, tmp_path / "tiny.nemo")
    weights = torch.load(
        io.BytesIO(archive_members(path)["./model_weights.ckpt"]), weights_only=True
    )
    assert f"joint.joint_net.{index}.weight" in weights
    assert f"joint.joint_net.{3 - index}.weight" not in weights
    again = load_checkpoint(path)
    assert again.config == checkpoint.config  # non-default mel, bias and probs survive
    model = caster.load(path)
    expected = checkpoint.state_dict["joint.joint_net.2.weight"]
    assert torch.equal(model.net.joint.joint_net[2].weight, expected)


def test_inconsistent_checkpoint_is_refused(tmp_path):
    checkpoint = tiny_checkpoint(0.0)
    bad = dataclasses.replace(checkpoint, tokenizer_model=synthetic_tokenizer(30, []))
    with pytest.raises(CheckpointError, match="pieces"):
        export_nemo(bad, tmp_path / "bad.nemo")
    assert not list(tmp_path.iterdir())
