"""The runtime every training pipeline shares (image epochs and LM optimizer steps alike).

* :mod:`~locakd.engine.runtime` -- device, autocast precision, gradient scaler, seeding;
* :mod:`~locakd.engine.distributed` -- the process group (one teardown policy), reductions, gather,
  broadcast, DDP wrapping and unwrapping;
* :mod:`~locakd.engine.io` -- atomic file / folder / checkpoint writes, clear load errors, cleanup of
  what a killed write left;
* :mod:`~locakd.engine.rng` -- the RNG state of every device, per rank, for exact resumption;
* :mod:`~locakd.engine.logging` -- :class:`RunLogger` (metrics JSONL, TensorBoard, progress bars);
* :mod:`~locakd.engine.run` -- the run lifecycle: :func:`open_run`, :class:`Run`, non-finite checks.
"""

from .distributed import (
    DistEnv,
    all_reduce,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    convert_sync_batchnorm,
    distributed_session,
    gather_objects,
    unwrap,
    wrap_ddp,
)
from .io import (
    atomic_write,
    atomic_write_dir,
    atomic_write_text,
    clean_stale_files,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    save_config,
)
from .logging import RunLogger, read_metrics
from .run import SUMMARY_KEYS, FiniteWatch, Run, check_finite, open_run
from .runtime import PRECISIONS, autocast_context, make_grad_scaler, resolve_device, seed_everything

__all__ = [
    "PRECISIONS",
    "SUMMARY_KEYS",
    "DistEnv",
    "FiniteWatch",
    "Run",
    "RunLogger",
    "all_reduce",
    "all_reduce_sum",
    "atomic_write",
    "atomic_write_dir",
    "atomic_write_text",
    "autocast_context",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "check_finite",
    "clean_stale_files",
    "convert_sync_batchnorm",
    "distributed_session",
    "gather_objects",
    "load_checkpoint",
    "load_model_state",
    "make_grad_scaler",
    "open_run",
    "read_metrics",
    "resolve_device",
    "save_checkpoint",
    "save_config",
    "seed_everything",
    "unwrap",
    "wrap_ddp",
]
