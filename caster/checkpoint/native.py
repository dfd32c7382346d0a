"""caster's own checkpoint format: a directory that loads fast and holds no pickle.

Layout:

- `model.safetensors`: the state dict under NeMo's key names;
- `tokenizer.model`: the serialized SentencePiece model;
- `caster.json`: `{"format": "caster", "version": 1, "config": ModelConfig.to_dict()}`.

`caster.json` marks the directory as a caster checkpoint, so `save_native`
writes it last: an interrupted save leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from caster.checkpoint import (
    Checkpoint,
    CheckpointError,
    read_bounded,
    read_checkpoint,
    validate_checkpoint,
)
from caster.config import ModelConfig

FORMAT = "caster"
VERSION = 1
META_FILE = "caster.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
# Far above any real file (3.5: caster.json ~2 KB, tokenizer ~500 KB); stops a
# hostile file from being read into memory whole.
MAX_META_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20


def save_native(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` as a caster checkpoint directory.

    Args:
        path: the directory to create (parents too); files already there with
            the same names are replaced.
        checkpoint: what to save; it is validated first, so nothing is written
            that `load_native` would refuse.

    Returns:
        The directory.

    Raises:
        CheckpointError: if the checkpoint fails validation.
    """
    validate_checkpoint(checkpoint)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta_path = path / META_FILE
    meta_path.unlink(missing_ok=True)
    safetensors.torch.save_file(
        _storable(checkpoint.state_dict), path / WEIGHTS_FILE, metadata={"format": "pt"}
    )
    (path / TOKENIZER_FILE).write_bytes(checkpoint.tokenizer_model)
    meta = {"format": FORMAT, "version": VERSION, "config": checkpoint.config.to_dict()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def load_native(path: str | os.PathLike) -> Checkpoint:
    """Load a caster checkpoint directory.

    Args:
        path: a directory written by `save_native`.

    Returns:
        The validated checkpoint, tensors on CPU.

    Raises:
        CheckpointError: naming the directory and the reason, for a missing
            file, an unknown format or version, a malformed config or corrupt
            weights.
    """
    return read_checkpoint(path, _read_dir)


def _storable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, CPU, each owning its whole storage.

    safetensors refuses tensors that share memory (tied weights, views of one
    buffer), so any tensor whose storage is shared or larger than itself is
    cloned.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _read_dir(path: Path) -> Checkpoint:
    config = _read_meta(path / META_FILE)
    tokenizer = read_bounded(path / TOKENIZER_FILE, MAX_TOKENIZER_BYTES)
    try:
        # load_file memory-maps the file: no pickle, no intermediate copy.
        state_dict = safetensors.torch.load_file(path / WEIGHTS_FILE, device="cpu")
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{WEIGHTS_FILE} is corrupt: {e}") from e
    return Checkpoint(config=config, state_dict=state_dict, tokenizer_model=tokenizer)


def _read_meta(meta_path: Path) -> ModelConfig:
    try:
        meta: Any = json.loads(read_bounded(meta_path, MAX_META_BYTES))
    except ValueError as e:
        raise CheckpointError(f"{META_FILE} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{META_FILE} holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{META_FILE} has format {meta.get('format')!r}; expected {FORMAT!r}")
    version = meta.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(
            f"{META_FILE} has version {version!r}; this caster reads version {VERSION} only"
        )
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{META_FILE} has no 'config' object")
    try:
        return ModelConfig.from_dict(config)
    except ValueError as e:
        # ConfigError, or a ValueError from building the dataclasses.
        raise CheckpointError(f"{META_FILE} has a malformed config: {e}") from e
