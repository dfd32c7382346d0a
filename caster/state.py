"""Batch-first streaming state: stack many streams' states, select some back out.

Every streaming state in caster (encoder caches, decoder state) is a frozen
dataclass whose fields are tensors (or such dataclasses) with the batch on dimension 0.
The functions here are the only place that joins, splits or writes them, so the
engine can batch any mix of streams: it keeps every stream's state as one row
of preallocated tensors (`grow_state`), gathers a batch's rows (`select_state`)
and writes the new ones back in place (`write_state_`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import torch

S = TypeVar("S")


def stack_states(states: Sequence[S]) -> S:
    """Concatenate states of the same type along the batch dimension."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    fields = {
        f.name: stack_states([getattr(s, f.name) for s in states])
        for f in dataclasses.fields(first)
    }
    return type(first)(**fields)


def select_state(state: S, index: torch.Tensor | Sequence[int] | slice) -> S:
    """The states of the streams at `index` (a slice keeps views, indices copy)."""
    if not isinstance(index, slice | torch.Tensor):
        index = torch.as_tensor(index, dtype=torch.long)
    if isinstance(state, torch.Tensor):
        return state[index]
    fields = {
        f.name: select_state(getattr(state, f.name), index) for f in dataclasses.fields(state)
    }
    return type(state)(**fields)


def write_state_(state: S, index: torch.Tensor | slice, rows: S) -> None:
    """Write `rows` into `state` at the streams `index` names, in place.

    `rows` holds as many streams as `index` names, or one, written to each of them.
    It may be (or share memory with) the rows it replaces: a step hands back what
    it did not change.
    """
    if isinstance(state, torch.Tensor):
        state[index] = rows
        return
    for f in dataclasses.fields(state):
        write_state_(getattr(state, f.name), index, getattr(rows, f.name))


def grow_state(state: S, rows: int) -> S:
    """A copy of `state` with zero rows appended up to `rows` streams."""
    if isinstance(state, torch.Tensor):
        grown = state.new_zeros(rows, *state.shape[1:])
        grown[: state.shape[0]] = state
        return grown
    fields = {f.name: grow_state(getattr(state, f.name), rows) for f in dataclasses.fields(state)}
    return type(state)(**fields)


def batch_size(state: object) -> int:
    while not isinstance(state, torch.Tensor):
        state = getattr(state, dataclasses.fields(state)[0].name)
    return state.shape[0]


def split_states(state: S) -> list[S]:
    """One state per stream (batch size 1 each)."""
    return [select_state(state, slice(i, i + 1)) for i in range(batch_size(state))]
