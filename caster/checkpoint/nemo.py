"""Read NeMo `.nemo` archives without NeMo, and without trusting them.

A `.nemo` file is a tar archive (plain since NeMo 1.7, gzip before) holding
`model_config.yaml` (the `model:` section of the training config),
`model_weights.ckpt` (a `torch.save` of the state dict) and tokenizer
artifacts renamed `<uuid>_tokenizer.model`, which the config references as
`tokenizer.model_path: nemo:<uuid>_tokenizer.model`. Member names start
with `./` because NeMo adds the directory as `arcname="."`.

Safety: every member header is checked before any member is read (no
absolute paths, no `..`, nothing but regular files and directories, no
absurd sizes), nothing is ever extracted to disk under its archive name, and
the weights are unpickled with `weights_only=True`, which refuses anything
but tensors and plain containers, so a hostile pickle cannot run code.

Memory: the weights are copied to a temporary file (`TMPDIR`, so it should be
on disk, not tmpfs, for the 2.5 GB models) and memory-mapped by `torch.load`;
the tensors are then backed by file pages rather than held twice in RAM.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
import yaml

from caster.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from caster.config import ConfigError, ModelConfig

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
# Bounds far above any real checkpoint (3.5: 2.5 GB weights, ~300 KB config,
# ~500 KB tokenizer, 8 members) that stop a hostile header from making us
# allocate or copy without limit.
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 64 * 2**30
MAX_CONFIG_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20
_COPY_CHUNK_BYTES = 16 * 2**20
_GZIP_MAGIC = b"\x1f\x8b"


def is_tar_archive(path: str | os.PathLike) -> bool:
    """Whether `path` begins with a valid tar header, plain or gzip-compressed.

    Looks at the content, not the suffix: only the first header block is read
    (and its checksum verified), so this is cheap even for a 2.5 GB file.
    """
    path = Path(path)
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (OSError, EOFError, zlib.error, tarfile.HeaderError):
        return False
    return True


def load_nemo(path: str | os.PathLike) -> Checkpoint:
    """Load a NeMo `.nemo` archive.

    Args:
        path: the `.nemo` file (a plain or gzip-compressed tar archive).

    Returns:
        The validated checkpoint; its tensors are memory-mapped from a deleted
        temporary file, on CPU, under NeMo's key names.

    Raises:
        CheckpointError: naming the file and the reason, for an unreadable,
            truncated, unsafe or unsupported archive.
    """
    return read_checkpoint(
        path,
        _read_archive,
        (tarfile.TarError, OSError, EOFError, zlib.error),
        "not a readable .nemo archive: ",
    )


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _read_archive(path: Path) -> Checkpoint:
    compressed = _is_gzip(path)
    with tarfile.open(path, "r:gz" if compressed else "r:") as tar:
        # A plain tar's member data must lie inside the file; tarfile itself
        # silently stops at a truncated header instead of failing.
        size_limit = None if compressed else path.stat().st_size
        members = _checked_members(tar, size_limit)
        config, tokenizer_name = _parse_config(
            _read_member(tar, members, CONFIG_MEMBER, MAX_CONFIG_BYTES)
        )
        tokenizer = _read_member(tar, members, tokenizer_name, MAX_TOKENIZER_BYTES)
        state_dict = _load_weights(tar, _find(members, WEIGHTS_MEMBER))
    return Checkpoint(config=config, state_dict=state_dict, tokenizer_model=tokenizer)


def _checked_members(tar: tarfile.TarFile, file_size: int | None) -> dict[str, tarfile.TarInfo]:
    """Check every member header; return the regular files by normalized name."""
    files: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise CheckpointError(f"the archive has more than {MAX_MEMBERS} members")
        name = _safe_name(member.name)
        if member.isdir():
            continue
        if not member.isreg():
            raise CheckpointError(
                f"member {member.name!r} is a {_kind(member)}; only regular files are allowed"
            )
        if member.size > MAX_MEMBER_BYTES:
            raise CheckpointError(
                f"member {member.name!r} claims {member.size} bytes, over the "
                f"{MAX_MEMBER_BYTES}-byte limit"
            )
        if file_size is not None and member.offset_data + member.size > file_size:
            raise CheckpointError(f"the archive is truncated inside member {member.name!r}")
        if name in files:
            raise CheckpointError(f"member {name!r} appears twice")
        files[name] = member
    return files


def _safe_name(name: str) -> str:
    """`name` without `./` prefixes, after rejecting absolute and `..` paths."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        raise CheckpointError(f"member {name!r} has an absolute path")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise CheckpointError(f"member {name!r} has a '..' path component")
    return "/".join(p for p in parts if p not in ("", "."))


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device node"
    if member.isfifo():
        return "FIFO"
    return f"special member (tar type {member.type!r})"


def _find(members: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    member = members.get(name)
    if member is None:
        raise CheckpointError(f"the archive has no member {name!r}")
    return member


def _read_member(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, limit: int
) -> bytes:
    member = _find(members, name)
    if member.size > limit:
        raise CheckpointError(f"{name} is {member.size} bytes, over the {limit}-byte limit")
    f = tar.extractfile(member)
    assert f is not None  # _checked_members kept regular files only
    return f.read()


def _parse_config(raw: bytes) -> tuple[ModelConfig, str]:
    """The model config and the archive member name of the SentencePiece model."""
    try:
        cfg = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as e:
        raise CheckpointError(f"{CONFIG_MEMBER} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{CONFIG_MEMBER} is a {type(cfg).__name__}, not a mapping")
    try:
        config = ModelConfig.from_nemo(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_MEMBER}: {e}") from e
    tokenizer = cfg.get("tokenizer")
    model_path = tokenizer.get("model_path") if isinstance(tokenizer, dict) else None
    if not isinstance(model_path, str) or not model_path.startswith("nemo:"):
        # Anything but an archive member would mean reading a path on this machine.
        raise CheckpointError(
            f"{CONFIG_MEMBER} has tokenizer.model_path={model_path!r}; expected "
            "'nemo:<member name>'"
        )
    return config, _safe_name(model_path.removeprefix("nemo:"))


def _load_weights(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, torch.Tensor]:
    source = tar.extractfile(member)
    assert source is not None  # _checked_members kept regular files only
    fd, tmp = tempfile.mkstemp(prefix="caster-", suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as copy:
            # mmap needs a file of its own: the member sits at an offset inside the tar.
            while chunk := source.read(_COPY_CHUNK_BYTES):
                try:
                    copy.write(chunk)
                except OSError as e:
                    raise CheckpointError(f"cannot write a temporary copy at {tmp}: {e}") from e
        if not _is_zip(tmp):
            raise CheckpointError(
                f"{WEIGHTS_MEMBER} is not a PyTorch zip checkpoint (corrupt or truncated)"
            )
        loaded = _torch_load(tmp)
    finally:
        # The mapping outlives the name on POSIX, so the disk space is freed once
        # the tensors are dropped.
        os.unlink(tmp)
    return _state_dict_of(loaded)


def _is_zip(path: str) -> bool:
    # torch.load itself tells zip from legacy files by the leading magic; both
    # ends are checked so that a damaged file is named as such, not as legacy.
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic == b"PK\x03\x04" and zipfile.is_zipfile(path)


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        # torch.load raises many exception types on hostile or corrupt input;
        # all of them mean the same thing here.
        message = str(e)
        # Keep torch's reason, not its advice to retry with weights_only=False.
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please|\n|$)", message)
        if refused:
            raise CheckpointError(
                f"{WEIGHTS_MEMBER} contains pickled objects other than tensors, refused "
                f"without running them ({refused.group(1)})"
            ) from e
        raise CheckpointError(f"{WEIGHTS_MEMBER} is corrupt: {type(e).__name__}: {message}") from e


def _state_dict_of(loaded: Any) -> dict[str, torch.Tensor]:
    # NeMo saves the bare state dict; Lightning-style files nest it.
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{WEIGHTS_MEMBER} holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)
