"""Capture and restore the global random-number state of a process, per rank, for exact resumption.

:func:`capture` covers Python's ``random``, NumPy's legacy global generator, torch's CPU generator and
the generator of every accelerator device present (all CUDA devices via ``get_rng_state_all``, MPS).
A checkpoint stores one such state per rank (:func:`capture_all_ranks`, a collective); on resume each
rank takes its own back (:func:`restore_own`). If the number of processes changed, the states cannot
be matched to ranks: every rank is then reseeded from (seed, rank, position) instead, so the run goes
on reproducibly, but not bitwise as an uninterrupted one would.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .distributed import DistEnv, gather_objects
from .runtime import seed_everything

__all__ = ["capture", "capture_all_ranks", "restore", "restore_own"]


def capture() -> dict[str, Any]:
    """This process's RNG states as plain Python / tensors (safe for ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        state["mps"] = mps.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned (device states only for devices present here)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # another machine: restore the devices both have
            for index, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, index)
    if "mps" in state and getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def capture_all_ranks(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's :func:`capture`, in rank order (a collective: every rank must call it)."""
    return gather_objects(capture(), env)


def restore_own(states: list[dict[str, Any]], env: DistEnv, *, seed: int, position: int) -> bool:
    """Restore this rank's state from a checkpoint's per-rank list; True if that was possible.

    When the list does not have one state per rank (the world size changed), reseed from
    ``(seed, rank, position)`` instead and return False.
    """
    if len(states) == env.world_size:
        restore(states[env.rank])
        return True
    seed_everything(seed + env.rank + 7919 * position)
    return False
