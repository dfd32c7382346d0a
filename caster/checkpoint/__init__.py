"""Model checkpoints: one in-memory form, three on-disk layouts.

A `Checkpoint` is the typed config, the state dict under NeMo's own key names
(`encoder.layers.0.self_attn.linear_q.weight`, `joint.joint_net.2.weight`, ...;
caster's modules mirror them so `load_state_dict(strict=True)` needs no
renaming) and the serialized SentencePiece model.

`load_checkpoint` picks the reader from what is on disk:

- a `.nemo` file (a tar archive, found by its content) -> `caster.checkpoint.nemo`;
- a directory with `caster.json` -> caster's own format, `caster.checkpoint.native`;
- a directory with `config.json` and `model.safetensors` -> Hugging Face layout,
  `caster.checkpoint.hf`.

Every file is untrusted input: anything wrong raises `CheckpointError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch

from caster.config import ModelConfig

# Top-level modules of the NeMo model that caster rebuilds; any other key means a
# different architecture (e.g. the `ctc_decoder.` of a hybrid RNNT/CTC model).
KNOWN_KEY_PREFIXES = (
    "preprocessor.featurizer.",
    "encoder.",
    "decoder.prediction.",
    "joint.",
    "prompt_kernel.",
)
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, unsafe or unsupported."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to build a model.

    Attributes:
        config: the model's hyper-parameters.
        state_dict: tensors keyed by NeMo's names, on CPU.
        tokenizer_model: the serialized SentencePiece model (`.model` file bytes).
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_model: bytes


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint in any of the layouts caster reads.

    Args:
        path: a `.nemo` archive, or a directory in caster's or Hugging Face's layout.

    Returns:
        The validated checkpoint.

    Raises:
        CheckpointError: if `path` is none of the supported layouts, or is one but
            is malformed.
    """
    path = Path(path)
    if path.is_file():
        from caster.checkpoint.nemo import is_tar_archive, load_nemo

        if is_tar_archive(path):
            return load_nemo(path)
        raise CheckpointError(
            f"{path} is not a .nemo archive (a tar file); expected a .nemo file or a "
            "checkpoint directory"
        )
    if path.is_dir():
        if (path / "caster.json").is_file():
            from caster.checkpoint.native import load_native

            return load_native(path)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            from caster.checkpoint.hf import load_hf

            checkpoint = load_hf(path)
            validate_checkpoint(checkpoint)
            return checkpoint
        raise CheckpointError(
            f"{path} is a directory without caster.json (caster's format) or "
            "config.json + model.safetensors (Hugging Face layout)"
        )
    raise CheckpointError(
        f"{path} does not exist; expected a .nemo file, a directory with caster.json, "
        "or a directory with config.json + model.safetensors"
    )


def validate_checkpoint(checkpoint: Checkpoint) -> None:
    """Cheap consistency checks shared by every reader.

    Shapes are left to the model's strict `load_state_dict`; this only rejects
    what could not be this architecture at all: a non-tensor value, a tensor
    that is neither floating point nor integer, a key outside the known modules,
    or a tokenizer whose size differs from the decoder's vocabulary (the RNNT
    blank id is `vocab_size`, so a mismatch would shift every token).

    Raises:
        CheckpointError: naming the first problem found.
    """
    if not checkpoint.state_dict:
        raise CheckpointError("the state dict is empty")
    for key, tensor in checkpoint.state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is not a named tensor")
        if not (tensor.dtype.is_floating_point or tensor.dtype in _INTEGER_DTYPES):
            raise CheckpointError(f"tensor {key!r} has unsupported dtype {tensor.dtype}")
        if not key.startswith(KNOWN_KEY_PREFIXES):
            raise CheckpointError(
                f"unexpected state dict key {key!r}: caster knows only "
                + ", ".join(f"{p}*" for p in KNOWN_KEY_PREFIXES)
            )
    if not checkpoint.tokenizer_model:
        raise CheckpointError("the tokenizer model is empty")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=checkpoint.tokenizer_model)
    except (RuntimeError, OSError, TypeError) as e:
        raise CheckpointError(f"the tokenizer is not a SentencePiece model: {e}") from e
    pieces = processor.get_piece_size()
    if pieces != checkpoint.config.decoder.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {pieces} pieces but the decoder vocabulary has "
            f"{checkpoint.config.decoder.vocab_size}"
        )


def read_checkpoint(
    path: str | os.PathLike,
    reader: Callable[[Path], Checkpoint],
    errors: tuple[type[BaseException], ...] = (OSError,),
    what: str = "",
) -> Checkpoint:
    """Run one layout's reader and validate its result; every failure names the path.

    Args:
        reader: reads the checkpoint at a path (raising CheckpointError or `errors`).
        errors: further exceptions that mean the file is unreadable.
        what: prefix for those, e.g. "not a readable .nemo archive: ".
    """
    path = Path(path)
    try:
        checkpoint = reader(path)
        validate_checkpoint(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"cannot load {path}: {e}") from e
    except errors as e:
        raise CheckpointError(f"cannot load {path}: {what}{e}") from e
    return checkpoint


def read_bounded(file: Path, limit: int) -> bytes:
    """A file's bytes, refusing files over `limit` without reading them whole."""
    with open(file, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{file.name} is over the {limit}-byte limit")
    return data
