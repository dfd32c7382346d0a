"""The resumable training state: the weight average, every RNG state, the state files.

`Trainer.save` writes `output_dir/checkpoints/step-XXXXXXXX.pt` (weights, optimizer,
EMA, step, sampler position, the RNG states of every process and the configs);
`load_training_state` reads one back with `weights_only=True`, so a hostile file cannot
run code. A file is written under a temporary name and renamed, so an interrupted save
never leaves half a state behind.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

STATE_VERSION = 1


class TrainStateError(ValueError):
    """A training-state file is unreadable or does not belong to this run."""


class WeightAverage:
    """Exponential moving average of the trainable weights, kept in float32."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone()
            for name, p in net.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        params = dict(net.named_parameters())
        for name, average in self.shadow.items():
            average.lerp_(params[name].detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise TrainStateError("the saved weight average covers other parameters")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, net: nn.Module) -> Iterator[None]:
        """Within the block, `net` holds the averaged weights."""
        params = dict(net.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, average in self.shadow.items():
                params[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain lists (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt), gauss],
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save under a temporary name, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """A training state saved by `Trainer.save`, loaded without unpickling code.

    Raises:
        TrainStateError: unreadable, not a caster training state, or another version.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for corrupt or hostile files
        raise TrainStateError(f"cannot load training state {path}: {e}") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainStateError(f"{path} is not a version-{STATE_VERSION} caster training state")
    return state


def state_path(output_dir: Path, step: int) -> Path:
    """Where the training state after `step` optimizer steps is saved."""
    return output_dir / "checkpoints" / f"step-{step:08d}.pt"


def saved_states(output_dir: Path) -> list[Path]:
    """The training states saved in `output_dir`, oldest first."""
    return sorted((output_dir / "checkpoints").glob("step-*.pt"))


def latest_training_state(output_dir: Path) -> Path | None:
    """The newest training state saved in `output_dir`, None if there is none."""
    saved = saved_states(output_dir)
    return saved[-1] if saved else None
