"""Process-group handling for runs launched with ``torchrun`` (and plain single-process runs).

Under torchrun the environment carries RANK, WORLD_SIZE and LOCAL_RANK; without
it every helper here is a cheap no-op, so the trainers have one code path.
gloo is used on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environment() -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun set up (if any); pick the backend from the device."""
    env = env_from_environment()
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return env


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place) and return it; identity when not distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of ``obj`` on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
