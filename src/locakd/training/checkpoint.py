"""Atomic checkpoint and file writes, and loads that fail with a clear message.

A checkpoint is written to a temporary file in the same folder, flushed to disk
and renamed over the target, so an interrupted run never leaves a half-written
``last.pt`` behind: the previous one stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text), mode="w")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} could not be read (corrupt, truncated or not a locakd checkpoint): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of state (got {type(state).__name__})")
    return state


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which model and file disagree."""
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing key(s) e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:3]}")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatch(es) e.g. {mismatched[:2]}")
        raise CheckpointError(
            f"the {what} checkpoint {source} does not fit the configured {what} architecture "
            f"({'; '.join(details)}); check the model name and num_classes in the config"
        )
    model.load_state_dict(state_dict, strict=True)
