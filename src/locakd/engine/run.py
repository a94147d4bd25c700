"""The lifecycle of one training run, written once for every pipeline.

A trainer (image epochs, LM optimizer steps) is a client of :func:`open_run`::

    with open_run(config, out_dir=..., command="distill", checkpoint_format="locakd-image-v1",
                  position_key="epoch", resume=resume) as run:
        ...build data and models on run.device; restore them from run.checkpoint...
        run.restore_rng()
        logger = run.begin()                 # folder cleaned, metrics trimmed, config.yaml written
        for position in range(run.position, total):
            ...train, logger.log(...), check_finite(...)...
            run.save({"epoch": position + 1, "model": ...}, best=is_best)
        return run.finish({...pipeline summary...})

What happens where:

* :func:`open_run`: resolve the device (``run.device``, this process's local GPU), refuse a precision the
  device cannot run, join or create the process group (one teardown policy, see
  :mod:`~locakd.engine.distributed`), then :class:`Run` checks the folder.
* :class:`Run`: ``resume=False`` refuses a folder that already holds a ``last.pt``; ``resume=True`` needs
  one, of the right format, whose config differs from this one only in keys that may change on resume
  (field metadata, :func:`locakd.config.config_keys`; keys the saved config lacks, added to locakd after
  it was written, count as their defaults). :attr:`Run.position` is where it stopped.
* :meth:`Run.begin`: removes what a killed atomic write left (:func:`~locakd.engine.io.clean_stale_files`),
  keeps only the metrics rows up to the checkpoint (all of them go on a fresh start), opens TensorBoard
  with ``purge_step`` so no step appears twice, writes ``config.yaml``.
* :meth:`Run.save`: every rank's RNG state (a collective), then rank 0 writes ``best.pt`` (optional) and
  ``last.pt`` atomically with the format, config, world size and wall time.
* :meth:`Run.finish`: ``summary.json`` with the keys every pipeline shares (:data:`SUMMARY_KEYS`) plus the
  pipeline's own.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import config_changes, config_keys, fill_defaults, to_dict
from ..errors import CheckpointError, ConfigError, NonFiniteLossError
from . import rng
from .distributed import DistEnv, all_reduce, barrier, distributed_session, env_from_environment
from .io import atomic_write_text, clean_stale_files, load_checkpoint, save_checkpoint
from .logging import RunLogger
from .runtime import autocast_context, resolve_device

__all__ = ["SUMMARY_KEYS", "FiniteWatch", "Run", "check_finite", "open_run"]

SUMMARY_KEYS = ("command", "status", "method", "seed", "world_size", "device", "precision", "wall_time_s", "run_dir")
"""Keys of ``summary.json`` that every pipeline writes, with the same meaning."""


@contextlib.contextmanager
def open_run(
    config: Any,
    *,
    out_dir: str | Path,
    command: str,
    checkpoint_format: str,
    position_key: str,
    resume: bool,
) -> Iterator[Run]:
    """Device, process group and run folder for one run of ``config`` (which has a ``run`` section)."""
    section = config.run
    device = resolve_device(section.device, env_from_environment().local_rank)
    autocast_context(device, section.precision)  # e.g. float16 on the CPU fails here, before any work
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with distributed_session(device, section.dist_timeout_s) as env:
        run = Run(config, out_dir=out_dir, command=command, checkpoint_format=checkpoint_format,
                  position_key=position_key, resume=resume, env=env, device=device)
        try:
            yield run
        finally:
            run.close()


class Run:
    """One run folder: resume checks, checkpoints with RNG state, logging, summary (see module doc)."""

    def __init__(
        self,
        config: Any,
        *,
        out_dir: str | Path,
        command: str,
        checkpoint_format: str,
        position_key: str,
        resume: bool,
        env: DistEnv | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.started = time.time()
        self.config = config
        self.out_dir = Path(out_dir)
        self.command = command
        self.checkpoint_format = checkpoint_format
        self.position_key = position_key
        self.env = env or DistEnv()
        self.device = torch.device(device)
        self.last_path = self.out_dir / "last.pt"
        self.best_path = self.out_dir / "best.pt"
        self.resumable_keys = config_keys(type(config), resume=True)
        self.logger: RunLogger | None = None
        self.checkpoint = self.open_checkpoint(resume)
        if self.checkpoint is not None:
            self.check_config(self.checkpoint.get("config") or {})
        self.position = int(self.checkpoint[position_key]) if self.checkpoint is not None else 0
        self.wall_before = float(self.checkpoint.get("wall_time_s", 0.0)) if self.checkpoint is not None else 0.0

    def open_checkpoint(self, resume: bool) -> dict[str, Any] | None:
        """The state to resume from (``None`` on a fresh start); refuses a folder that holds a run unless resuming.

        This reads ``last.pt``. A pipeline whose checkpoints live elsewhere (the Hugging Face Trainer's
        ``checkpoint-N/``) overrides it, returning the entries the run reads: ``position_key``, ``config``
        (the config the checkpoint was written with) and ``wall_time_s``.
        """
        last = self.last_path
        if not resume:
            # a Trainer checkpoint-N/ is a run of the other LM engine (run.engine=hf): starting afresh here would
            # overwrite its metrics and mix the two runs' files
            trainer_checkpoints = sorted(p.name for p in self.out_dir.glob("checkpoint-*") if p.is_dir()) \
                if self.out_dir.is_dir() else []
            if last.is_file() or trainer_checkpoints:
                held = "last.pt" if last.is_file() else f"{trainer_checkpoints[-1]}/, a run.engine=hf run"
                raise ConfigError(
                    f"{self.out_dir} already holds a run ({held}): pass --resume to continue it, "
                    "or set run.out_dir (or run.seed) for a new run"
                )
            return None
        if not last.is_file():
            raise CheckpointError(
                f"cannot resume: {last} does not exist (nothing to resume; start the run without --resume, "
                "or check run.out_dir)"
            )
        state = load_checkpoint(last)
        found = state.get("format")
        if found != self.checkpoint_format:
            hint = ""
            if isinstance(found, str) and found.rpartition("-")[0] == self.checkpoint_format.rpartition("-")[0]:
                hint = "; it was written by another locakd version, whose run state differs: start a new run folder"
            raise CheckpointError(
                f"{last} is not a {self.checkpoint_format} checkpoint (format {found!r}){hint}"
            )
        return state

    def check_config(self, saved: dict[str, Any]) -> None:
        """Refuse to resume when ``saved`` (the checkpoint's config) differs from this run's config in a key
        that may not change on resume. Keys the saved config lacks (added to locakd after it was written)
        count as their defaults, so only real changes are reported."""
        saved = fill_defaults(type(self.config), saved)
        changes = config_changes(saved, to_dict(self.config), self.resumable_keys)
        if changes:
            raise ConfigError(
                f"cannot resume {self.out_dir} with a different config ({'; '.join(changes)}); only "
                f"{', '.join(sorted(self.resumable_keys))} may change"
            )

    # ------------------------------------------------------------------ state

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    def restore_rng(self) -> bool:
        """This rank's RNG state from the checkpoint (see :func:`locakd.engine.rng.restore_own`)."""
        if self.checkpoint is None:
            return True
        exact = rng.restore_own(self.checkpoint.get("rng") or [], self.env, seed=self.config.run.seed,
                                position=self.position)
        if not exact and self.logger is not None:
            self.logger.info(
                f"note: {self.last_path} was written by {len(self.checkpoint.get('rng') or [])} process(es), this "
                f"run has {self.env.world_size}: random streams are reseeded, so the result is not bitwise "
                "that of an uninterrupted run"
            )
        return exact

    def wall_time(self) -> float:
        """Seconds of training over every session of this run."""
        return self.wall_before + time.time() - self.started

    # ------------------------------------------------------------------ folder

    def begin(self) -> RunLogger:
        """Clean the folder, trim the metrics to the checkpoint, open the logger, write config.yaml."""
        section = self.config.run
        removed = clean_stale_files(self.out_dir) if self.env.is_main else []
        self.logger = RunLogger(
            self.out_dir,
            enabled=self.env.is_main,
            tensorboard=section.tensorboard,
            progress=section.progress,
            purge_step=self.position + 1 if self.resumed else 0,
        )
        self.logger.keep_through(self.position if self.resumed else None)
        self.logger.save_config(self.config)
        if removed:
            self.logger.info(f"removed what interrupted writes left in {self.out_dir}: {', '.join(removed)}")
        return self.logger

    def save(self, state: dict[str, Any], *, best: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt``) with ``state`` plus the run's own entries; every rank calls it."""
        rng_states = rng.capture_all_ranks(self.env)  # a collective: every rank takes part
        if not self.env.is_main:
            return
        full = {
            "format": self.checkpoint_format,
            **state,
            "rng": rng_states,
            "world_size": self.env.world_size,
            "wall_time_s": self.wall_time(),
            "config": to_dict(self.config),
        }
        if best:
            save_checkpoint(full, self.best_path)
        save_checkpoint(full, self.last_path)

    def finish(self, summary: dict[str, Any], *, status: str = "finished") -> dict[str, Any]:
        """Write ``summary.json`` (rank 0): the shared keys, then the pipeline's ``summary``; return it."""
        section = self.config.run
        summary = dict(summary)
        full: dict[str, Any] = {
            "command": self.command,
            "status": status,
            "method": summary.pop("method", None),
            "seed": section.seed,
            "world_size": self.env.world_size,
            "device": str(self.device),
            "precision": section.precision,
            **summary,
            "wall_time_s": self.wall_time(),
            "run_dir": str(self.out_dir),
        }
        if self.env.is_main:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(full, indent=2) + "\n")
        barrier()
        return full

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


# ---------------------------------------------------------------------- non-finite losses


def check_finite(where: str, **terms: float) -> None:
    """Raise :class:`~locakd.errors.NonFiniteLossError` naming the first term that is NaN or infinite."""
    for name, value in terms.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(name, value, where)


class FiniteWatch:
    """The first step at which each loss term was not finite, tracked on the device (no host sync per step).

    ``update(step, ce=..., kd=...)`` after every step; ``check(describe)`` once in a while (one sync, and
    under DDP the earliest step over all ranks) raises :class:`~locakd.errors.NonFiniteLossError`.
    """

    _NONE = 2**62

    def __init__(self, terms: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.terms = list(terms)
        self.first = torch.full((len(self.terms),), self._NONE, dtype=torch.int64, device=device)
        self.values = torch.zeros(len(self.terms), dtype=torch.float64, device=device)

    def update(self, step: int, **values: torch.Tensor) -> None:
        """Record this step's value of every term (each a scalar tensor; all terms every step)."""
        current = torch.stack([values[name].detach().double().reshape(()) for name in self.terms])
        new = ~torch.isfinite(current) & (self.first == self._NONE)
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, current, self.values)

    def check(self, describe: Callable[[int], str]) -> None:
        first = all_reduce(self.first.clone(), "min").tolist()
        index = min(range(len(first)), key=lambda i: first[i], default=None)
        if index is not None and first[index] != self._NONE:
            value = float(self.values[index])
            raise NonFiniteLossError(self.terms[index], value if not math.isfinite(value) else None,
                                     describe(first[index]))
