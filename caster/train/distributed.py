"""Data-parallel training across processes with PyTorch's own `torchrun` and DDP.

One command scales from one process to many machines:

    caster train run.yaml                                   # one process
    torchrun --nproc_per_node=8 -m caster train run.yaml    # 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 -m caster train run.yaml

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_distributed` reads them and joins the process group (NCCL on GPUs,
gloo on CPU). Without them the run is a single process and every helper here
is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """The distributed environment variables are inconsistent."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group `torchrun` describes, or run alone.

    Args:
        device: "auto" (this process's GPU if there is one, else CPU), "cpu" or "cuda".

    Returns:
        rank, world size and the device this process trains on.

    Raises:
        DistributedError: malformed RANK/WORLD_SIZE/LOCAL_RANK, or cuda asked for
            on a machine without it.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise DistributedError(f"malformed torchrun environment variable: {e}") from e
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise DistributedError(f"RANK={rank} / WORLD_SIZE={world_size} are inconsistent")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (after the last collective)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise sum of `value` over all processes (a copy; `value` is unchanged)."""
    out = value.clone()
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's `obj` (picklable, small), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
