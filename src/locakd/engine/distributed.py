"""Process groups for runs launched with ``torchrun`` (and plain single-process runs), and collectives.

Under torchrun the environment carries RANK, WORLD_SIZE and LOCAL_RANK; without it every helper here is
a cheap no-op, so the trainers have one code path. gloo is used on the CPU, nccl on CUDA.

Teardown policy (one for every pipeline, :func:`distributed_session`): a run tears down only a process
group it created itself, and only when it ends normally. After an error the group is left alone:
destroying it could wait for peers that are still inside a collective, and the launcher (torchrun)
stops the other ranks and reports the failing one instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DistEnv",
    "all_reduce",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "convert_sync_batchnorm",
    "distributed_session",
    "env_from_environment",
    "gather_objects",
    "init_distributed",
    "is_initialized",
    "shutdown_distributed",
    "unwrap",
    "wrap_ddp",
]


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


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun set up (if any); pick the backend from the device."""
    env = env_from_environment()
    if env.enabled and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return env


def shutdown_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: torch.device, timeout_s: float = 1800.0) -> Iterator[DistEnv]:
    """Join (or create) the process group for one run; tear down only a group created here, on success."""
    owns_group = not is_initialized()
    env = init_distributed(device, timeout_s)
    yield env
    if owns_group:
        shutdown_distributed()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place (``op``: sum | max | min) and return it."""
    if is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place) and return it; identity when not distributed."""
    return all_reduce(tensor, "sum")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a collective: all ranks must call it)."""
    if not env.enabled or not is_initialized():
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm statistics, which each rank updates on its own) on every rank."""
    if is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device, env: DistEnv) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes run, ``model`` otherwise."""
    if not env.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def convert_sync_batchnorm(model: nn.Module, device: torch.device, env: DistEnv, key: str) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (config key ``key``); a ConfigError off CUDA, where torch cannot sync."""
    if device.type != "cuda":
        raise ConfigError(
            f"config key '{key}' needs CUDA devices: torch's SyncBatchNorm only works with GPU modules "
            f"(device here: {device}); set {key}=false on the {device.type.upper()}"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if env.enabled else model
