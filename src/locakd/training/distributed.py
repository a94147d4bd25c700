"""Moved to :mod:`locakd.engine.distributed`; this module keeps the old import path working for one release."""

from ..engine.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    env_from_environment,
    init_distributed,
    shutdown_distributed,
)

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "env_from_environment",
    "init_distributed",
    "shutdown_distributed",
]
