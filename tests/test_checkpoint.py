"""Checkpoint loading: NeMo fixtures, hostile archives, caster's own format.

Every hostile file is built here in tmp_path. The malicious archives keep all
the valid members of a real fixture, so the only thing that can make a load
fail is the hostile part.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import sys
import tarfile
import types
from pathlib import Path

import pytest
import sentencepiece
import torch
import yaml
from conftest import EN_MODEL, NEMO_FIXTURES, PROMPT_MODEL, nemo_path, require_fixture

from caster.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from caster.checkpoint import nemo as nemo_format
from caster.checkpoint.native import load_native, save_native
from caster.checkpoint.nemo import load_nemo
from caster.config import ModelConfig


def _expected_state_dict(model: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from NeMo's own listing `<model>.state_dict.txt`."""
    listing = require_fixture(NEMO_FIXTURES / f"{model}.state_dict.txt").read_text()
    expected = {}
    for line in listing.splitlines():
        key, shape, dtype = line.split("\t")
        expected[key] = (tuple(json.loads(shape)), dtype)
    return expected


def _fixture_files(model: str) -> dict[str, bytes]:
    """The fixture archive's regular files, by name without './'."""
    with tarfile.open(nemo_path(model)) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}


def _config_of(files: dict[str, bytes]) -> dict:
    return yaml.safe_load(files["model_config.yaml"])


def _write_tar(
    path: Path,
    files: dict[str, bytes],
    extra: list[tarfile.TarInfo] = (),
    mode: str = "w",
    prefix: str = "./",
) -> Path:
    """A tar of `files` (named prefix + name), then the `extra` header-only members."""
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _member(name: str, kind: bytes, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _Payload:
    """Unpickling this creates `marker`, as a code-execution exploit would."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the NeMo fixtures ---------------------------------------------------------------


@pytest.mark.parametrize("model", [EN_MODEL, PROMPT_MODEL])
def test_loads_fixture_keys_shapes_config_tokenizer(model):
    checkpoint = load_checkpoint(nemo_path(model))

    got = {
        k: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for k, t in checkpoint.state_dict.items()
    }
    assert got == _expected_state_dict(model)
    yaml_path = require_fixture(NEMO_FIXTURES / f"{model}.model_config.yaml")
    assert checkpoint.config == ModelConfig.from_nemo(yaml.safe_load(yaml_path.read_text()))
    processor = sentencepiece.SentencePieceProcessor(model_proto=checkpoint.tokenizer_model)
    assert processor.get_piece_size() == checkpoint.config.decoder.vocab_size == 128


def test_fixture_configs_differ_as_documented():
    en = load_nemo(nemo_path(EN_MODEL))
    prompt = load_nemo(nemo_path(PROMPT_MODEL))
    assert en.config.prompt is None
    assert en.config.encoder.att_context_size[0] == (70, 13)
    assert prompt.config.prompt is not None
    assert prompt.config.prompt.dictionary["auto"] == 101
    assert prompt.config.encoder.att_context_size[0] == (56, 3)
    assert "prompt_kernel.0.weight" in prompt.state_dict
    processor = sentencepiece.SentencePieceProcessor(model_proto=prompt.tokenizer_model)
    assert processor.piece_to_id("<de-DE>") != processor.unk_id()


def test_gzip_archive_without_dot_prefix_and_any_suffix(tmp_path):
    files = _fixture_files(EN_MODEL)
    path = _write_tar(tmp_path / "model.bin", files, mode="w:gz", prefix="")
    checkpoint = load_checkpoint(path)
    reference = load_nemo(nemo_path(EN_MODEL))
    assert checkpoint.config == reference.config
    assert checkpoint.tokenizer_model == reference.tokenizer_model
    assert all(torch.equal(checkpoint.state_dict[k], t) for k, t in reference.state_dict.items())


def test_state_dict_nested_under_state_dict_is_accepted(tmp_path):
    files = _fixture_files(EN_MODEL)
    flat = torch.load(io.BytesIO(files["model_weights.ckpt"]), weights_only=True)
    files["model_weights.ckpt"] = _torch_bytes({"state_dict": flat, "epoch": 3})
    checkpoint = load_nemo(_write_tar(tmp_path / "nested.nemo", files))
    assert checkpoint.state_dict.keys() == flat.keys()


# --- hostile archives ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (_member("/tmp/evil.txt", tarfile.REGTYPE), "absolute path"),
        (_member("../evil.txt", tarfile.REGTYPE), "'..'"),
        (_member("./sub/../../evil.txt", tarfile.REGTYPE), "'..'"),
        (_member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
        (_member("hard", tarfile.LNKTYPE, linkname="model_config.yaml"), "hard link"),
        (_member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), "device node"),
        (_member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device node"),
        (_member("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "chr", "blk", "fifo"],
)
def test_unsafe_member_is_rejected(tmp_path, extra, reason):
    # The hostile member comes last: a reader that stops once it has what it
    # needs would miss it.
    path = _write_tar(tmp_path / "evil.nemo", _fixture_files(EN_MODEL), extra=[extra])
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path)


def test_symlink_named_as_config_is_rejected(tmp_path):
    files = _fixture_files(EN_MODEL)
    del files["model_config.yaml"]
    link = _member("./model_config.yaml", tarfile.SYMTYPE, linkname="/etc/passwd")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_nemo(_write_tar(tmp_path / "evil.nemo", files, extra=[link]))


def test_absurd_member_size_is_rejected(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in _fixture_files(EN_MODEL).items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        end_of_members = tar.offset
    # Then a header that claims 1 TiB, with no data behind it.
    header = tarfile.TarInfo("./huge.bin")
    header.size = 2**40
    path = tmp_path / "big.nemo"
    path.write_bytes(
        buffer.getvalue()[:end_of_members]
        + header.tobuf(tarfile.GNU_FORMAT)
        + b"\0" * (2 * tarfile.BLOCKSIZE)
    )
    with pytest.raises(CheckpointError, match="claims 1099511627776 bytes"):
        load_nemo(path)


def test_duplicate_member_is_rejected(tmp_path):
    files = _fixture_files(EN_MODEL)
    extra = _member("model_weights.ckpt", tarfile.REGTYPE)  # same name without './'
    with pytest.raises(CheckpointError, match="appears twice"):
        load_nemo(_write_tar(tmp_path / "dup.nemo", files, extra=[extra]))


def test_too_many_members_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(nemo_format, "MAX_MEMBERS", 4)
    path = _write_tar(tmp_path / "many.nemo", _fixture_files(EN_MODEL))  # 5 files + none
    with pytest.raises(CheckpointError, match="more than 4 members"):
        load_nemo(path)


def test_pickle_payload_in_torch_zip_does_not_run(tmp_path):
    payload = _torch_bytes(_Payload(tmp_path / "control"))
    torch.load(io.BytesIO(payload), weights_only=False)  # the unsafe way runs it...
    assert (tmp_path / "control").exists()

    marker = tmp_path / "pwned"
    files = _fixture_files(EN_MODEL)
    files["model_weights.ckpt"] = _torch_bytes({"encoder.x": _Payload(marker)})
    with pytest.raises(CheckpointError, match="refused without running"):
        load_checkpoint(_write_tar(tmp_path / "evil.nemo", files))
    assert not marker.exists()


def test_raw_pickle_payload_does_not_run(tmp_path):
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the unsafe way runs it...
    assert (tmp_path / "control").exists()

    marker = tmp_path / "pwned"
    files = _fixture_files(EN_MODEL)
    files["model_weights.ckpt"] = pickle.dumps(_Payload(marker))
    with pytest.raises(CheckpointError, match="not a PyTorch zip"):
        load_checkpoint(_write_tar(tmp_path / "evil.nemo", files))
    assert not marker.exists()


@pytest.mark.parametrize("model", [EN_MODEL, PROMPT_MODEL])
def test_truncated_archive(tmp_path, model):
    data = nemo_path(model).read_bytes()
    path = tmp_path / "cut.nemo"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_truncated_gzip_archive(tmp_path):
    path = _write_tar(tmp_path / "full.nemo", _fixture_files(EN_MODEL), mode="w:gz")
    data = path.read_bytes()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.nemo"):
        load_checkpoint(cut)


@pytest.mark.parametrize(
    "content", [b"", random.Random(0).randbytes(10_000), b"\x1f\x8b" + b"not gzip" * 100]
)
@pytest.mark.parametrize("loader", [load_checkpoint, load_nemo])
def test_not_an_archive(tmp_path, content, loader):
    path = tmp_path / "junk.nemo"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"junk\.nemo"):
        loader(path)


@pytest.mark.parametrize("role", ["weights", "config", "tokenizer"])
def test_missing_member(tmp_path, role):
    files = _fixture_files(EN_MODEL)
    tokenizer = _config_of(files)["tokenizer"]["model_path"].removeprefix("nemo:")
    missing = {"weights": "model_weights.ckpt", "config": "model_config.yaml"}.get(role, tokenizer)
    del files[missing]
    with pytest.raises(CheckpointError, match=f"no member '{missing}'"):
        load_nemo(_write_tar(tmp_path / "partial.nemo", files))


def _with_config(tmp_path: Path, config_text: str) -> Path:
    files = _fixture_files(EN_MODEL)
    files["model_config.yaml"] = config_text.encode()
    return _write_tar(tmp_path / "cfg.nemo", files)


@pytest.mark.parametrize(
    ("config_text", "reason"),
    [
        ("- just\n- a list\n", "not a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
        ("[" * 100_000, "not valid YAML"),
        ("preprocessor: [1]\nencoder: {}\ndecoder: {}\njoint: {}\n", "malformed"),
        ("target: some.Model\n", "unsupported or malformed"),
    ],
    ids=["list", "bad-yaml", "deep-nesting", "section-not-mapping", "empty-model"],
)
def test_bad_config(tmp_path, config_text, reason):
    with pytest.raises(CheckpointError, match=reason):
        load_nemo(_with_config(tmp_path, config_text))


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("encoder", "self_attention_model", "abs_pos", "attention model"),
        ("encoder", "att_context_style", "regular", "att_context_style"),
        ("tokenizer", "model_path", "/home/someone/tokenizer.model", "model_path"),
        ("tokenizer", "model_path", "nemo:../../etc/passwd", "'..'"),
    ],
)
def test_unsupported_config(tmp_path, section, key, value, reason):
    cfg = _config_of(_fixture_files(EN_MODEL))
    cfg[section][key] = value
    with pytest.raises(CheckpointError, match=reason):
        load_nemo(_with_config(tmp_path, yaml.safe_dump(cfg)))


def _with_weights(tmp_path: Path, weights: bytes) -> Path:
    files = _fixture_files(EN_MODEL)
    files["model_weights.ckpt"] = weights
    return _write_tar(tmp_path / "w.nemo", files)


@pytest.mark.parametrize(
    "where", [slice(4, 4096), slice(-3000, -100)], ids=["data.pkl", "central-directory"]
)
def test_corrupt_zip_inside(tmp_path, where):
    weights = bytearray(_fixture_files(EN_MODEL)["model_weights.ckpt"])
    weights[where] = random.Random(1).randbytes(len(weights[where]))
    with pytest.raises(CheckpointError, match=r"model_weights\.ckpt is corrupt"):
        load_nemo(_with_weights(tmp_path, bytes(weights)))


def test_truncated_zip_inside(tmp_path):
    weights = _fixture_files(EN_MODEL)["model_weights.ckpt"]
    with pytest.raises(CheckpointError, match="not a PyTorch zip"):
        load_nemo(_with_weights(tmp_path, weights[: len(weights) // 2]))


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ([torch.zeros(3)], "holds a list"),
        ({"ctc_decoder.decoder_layers.0.weight": torch.zeros(3)}, "unexpected state dict key"),
        ({"encoder.mask": torch.zeros(3, dtype=torch.bool)}, "dtype"),
        ({"encoder.c": torch.zeros(3, dtype=torch.complex64)}, "dtype"),
        ({}, "empty"),
    ],
    ids=["list", "unknown-prefix", "bool", "complex", "empty"],
)
def test_bad_state_dict(tmp_path, weights, reason):
    with pytest.raises(CheckpointError, match=reason):
        load_nemo(_with_weights(tmp_path, _torch_bytes(weights)))


def test_tokenizer_must_be_sentencepiece_of_vocab_size(tmp_path):
    files = _fixture_files(EN_MODEL)
    name = _config_of(files)["tokenizer"]["model_path"].removeprefix("nemo:")
    files[name] = b"not a sentencepiece model"
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        load_nemo(_write_tar(tmp_path / "tok.nemo", files))

    files = _fixture_files(EN_MODEL)
    cfg = _config_of(files)
    cfg["decoder"]["vocab_size"] = 127
    cfg["joint"]["num_classes"] = 127
    files["model_config.yaml"] = yaml.safe_dump(cfg).encode()
    with pytest.raises(CheckpointError, match="128 pieces"):
        load_nemo(_write_tar(tmp_path / "vocab.nemo", files))


# --- caster's own format ------------------------------------------------------------


@pytest.mark.parametrize("model", [EN_MODEL, PROMPT_MODEL])
def test_native_round_trip_is_exact(tmp_path, model):
    original = load_nemo(nemo_path(model))
    save_native(tmp_path / "ckpt", original)
    for loaded in (load_native(tmp_path / "ckpt"), load_checkpoint(tmp_path / "ckpt")):
        assert loaded.config == original.config
        assert loaded.tokenizer_model == original.tokenizer_model
        assert loaded.state_dict.keys() == original.state_dict.keys()  # order may differ
        for key, tensor in original.state_dict.items():
            assert loaded.state_dict[key].dtype == tensor.dtype
            assert torch.equal(loaded.state_dict[key], tensor), key


def test_native_saves_shared_and_non_contiguous_tensors(tmp_path):
    original = load_nemo(nemo_path(EN_MODEL))
    tied = torch.randn(4, 5)
    buffer = torch.randn(6, 8)
    state_dict = dict(original.state_dict)
    state_dict |= {
        "encoder.tied_a": tied,
        "encoder.tied_b": tied,
        "encoder.strided": buffer[:, ::2],  # non-contiguous view
        "encoder.slice": buffer[2],  # contiguous, but a part of a larger storage
        "encoder.transposed": buffer.t(),
    }
    checkpoint = Checkpoint(original.config, state_dict, original.tokenizer_model)
    loaded = load_native(save_native(tmp_path / "ckpt", checkpoint))
    for key, tensor in state_dict.items():
        assert torch.equal(loaded.state_dict[key], tensor), key
    assert state_dict["encoder.tied_a"] is tied  # the caller's dict is untouched


def test_native_save_overwrites(tmp_path):
    save_native(tmp_path / "ckpt", load_nemo(nemo_path(EN_MODEL)))
    prompt = load_nemo(nemo_path(PROMPT_MODEL))
    loaded = load_native(save_native(tmp_path / "ckpt", prompt))
    assert loaded.config == prompt.config
    assert loaded.state_dict.keys() == prompt.state_dict.keys()


@pytest.fixture
def native_dir(tmp_path) -> Path:
    return save_native(tmp_path / "ckpt", load_nemo(nemo_path(EN_MODEL)))


def _edit_meta(native_dir: Path, edit) -> None:
    meta_path = native_dir / "caster.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(version=2), "version 2; this caster reads version 1"),
        (lambda m: m.update(version="1"), "version '1'"),
        (lambda m: m.update(version=True), "version True"),
        (lambda m: m.pop("version"), "version None"),
        (lambda m: m.update(format="nemo"), "format 'nemo'"),
        (lambda m: m.pop("format"), "format None"),
        (lambda m: m.pop("config"), "no 'config'"),
        (lambda m: m["config"].pop("decoder"), "malformed config"),
        (lambda m: m["config"]["encoder"].update(n_layerz=3), "malformed config"),
        (lambda m: m["config"]["encoder"].update(att_context_size=5), "malformed config"),
    ],
)
def test_native_tampered_meta(native_dir, edit, reason):
    _edit_meta(native_dir, edit)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(native_dir)


@pytest.mark.parametrize(
    ("content", "reason"), [(b"{not json", "not valid JSON"), (b"[1, 2]", "not an object")]
)
def test_native_meta_not_an_object(native_dir, content, reason):
    (native_dir / "caster.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_native(native_dir)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.model"])
def test_native_missing_file(native_dir, name):
    (native_dir / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_native(native_dir)


def test_native_corrupt_weights(native_dir):
    (native_dir / "model.safetensors").write_bytes(random.Random(2).randbytes(5000))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_native(native_dir)


def test_save_native_refuses_invalid_checkpoint(tmp_path):
    original = load_nemo(nemo_path(EN_MODEL))
    bad = Checkpoint(original.config, {"ctc_decoder.w": torch.zeros(1)}, original.tokenizer_model)
    with pytest.raises(CheckpointError, match="unexpected state dict key"):
        save_native(tmp_path / "ckpt", bad)
    assert not (tmp_path / "ckpt" / "caster.json").exists()


# --- dispatch -----------------------------------------------------------------------


def test_dispatches_hf_layout(tmp_path, monkeypatch):
    reference = load_nemo(nemo_path(EN_MODEL))
    calls = []

    def load_hf(path: Path) -> Checkpoint:
        calls.append(path)
        return reference

    monkeypatch.setitem(sys.modules, "caster.checkpoint.hf", types.SimpleNamespace(load_hf=load_hf))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert load_checkpoint(tmp_path) is reference
    assert calls == [tmp_path]


def test_dispatch_validates_hf_result(tmp_path, monkeypatch):
    reference = load_nemo(nemo_path(EN_MODEL))
    bad = Checkpoint(reference.config, {"model.w": torch.zeros(1)}, reference.tokenizer_model)
    monkeypatch.setitem(
        sys.modules, "caster.checkpoint.hf", types.SimpleNamespace(load_hf=lambda path: bad)
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unexpected state dict key 'model\.w'"):
        load_checkpoint(tmp_path)


def test_dispatch_rejects_unknown_layouts(tmp_path):
    with pytest.raises(CheckpointError, match=r"caster\.json.*config\.json \+ model\.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # HF needs the weights too
    with pytest.raises(CheckpointError, match=r"caster\.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.nemo")
    text = tmp_path / "model.safetensors"
    text.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match=r"not a \.nemo archive"):
        load_checkpoint(text)
