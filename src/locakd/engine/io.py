"""Atomic file, folder and checkpoint writes; loads that fail with a clear message; stale-file cleanup.

A file is written to a temporary file in the same folder (``.<name>.<8 random chars>.tmp``), flushed
to disk and renamed over the target, so an interrupted run never leaves a half-written ``last.pt``
behind: the previous one stays intact until the new one is complete. A folder (a ``save_pretrained``
model) is filled under ``.<name>.<random>.tmp`` and swapped in by two renames, keeping the old one as
``.<name>.old`` in between.

A process killed inside such a write (``kill -9``, a node failure) leaves the temporary file or folder
behind. :func:`clean_stale_files` removes them when the run folder is prepared again, and puts a folder
back from ``.<name>.old`` when the kill fell between the two renames, so nothing accumulates over
restarts and nothing finished is lost.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_yaml
from ..errors import CheckpointError

__all__ = [
    "PAUSE_IN_WRITE_ENV",
    "atomic_write",
    "atomic_write_dir",
    "atomic_write_text",
    "clean_stale_files",
    "load_checkpoint",
    "load_model_state",
    "save_checkpoint",
    "save_config",
    "swap_in_dir",
    "temp_dir_for",
]

# Test hook: "NAME:K" pauses (sleeps) inside the K-th atomic write of a file or folder called NAME,
# after the data is in the temporary file and before the rename, so a test can kill the process at
# exactly that point. PAUSE_MARKER_ENV names a file the hook creates when the pause begins; the writes
# of NAME are counted in "<marker>.writes" (the test's file, so no state lives in this module).
PAUSE_IN_WRITE_ENV = "LOCAKD_TEST_PAUSE_IN_WRITE"
PAUSE_MARKER_ENV = "LOCAKD_TEST_PAUSE_MARKER"

# mkstemp/mkdtemp names: prefix ".<name>.", 8 characters of [a-z0-9_], suffix ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
_OLD_NAME = re.compile(r"^\.(?P<target>.+)\.old$")


def _maybe_pause(name: str) -> None:
    spec, marker = os.environ.get(PAUSE_IN_WRITE_ENV), os.environ.get(PAUSE_MARKER_ENV)
    if not spec or not marker:
        return
    target, _, count = spec.rpartition(":")
    if target != name:
        return
    counter = Path(f"{marker}.writes")
    with counter.open("a") as handle:
        handle.write(f"{name}\n")
    if len(counter.read_text().splitlines()) != int(count):
        return
    Path(marker).write_text(name)
    time.sleep(3600)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            _maybe_pause(path.name)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda handle: handle.write(text), mode="w")


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config (a config dataclass) as YAML, atomically."""
    atomic_write_text(path, config_yaml(config))


def atomic_write_dir(target: str | Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(folder)`` on a fresh temporary folder next to ``target``, then swap it in.

    The old ``target`` (if any) is renamed to ``.<name>.old`` first and deleted only after the new
    folder is in place; :func:`clean_stale_files` restores it if a kill falls between the renames.
    A folder that several processes fill together (a sharded model) uses the two halves of this,
    :func:`temp_dir_for` and :func:`swap_in_dir`, with the temporary name shared between them.
    """
    tmp = temp_dir_for(target)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_dir(tmp, target)


def temp_dir_for(target: str | Path) -> Path:
    """A fresh temporary folder ``.<name>.<random>.tmp`` next to ``target`` (what :func:`clean_stale_files` removes)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:  # an earlier swap was interrupted between its two renames
            old.rename(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def swap_in_dir(tmp: str | Path, target: str | Path) -> None:
    """Replace ``target`` by the filled temporary folder ``tmp`` (from :func:`temp_dir_for`) with two renames."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(f".{target.name}.old")
    try:
        _maybe_pause(target.name)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)


def clean_stale_files(folder: str | Path) -> list[str]:
    """Remove what a killed :func:`atomic_write` / :func:`atomic_write_dir` left in ``folder``.

    Temporary files and folders (``.<name>.<random>.tmp``) are deleted; ``.<name>.old`` is deleted when
    ``<name>`` exists and renamed back to ``<name>`` when it does not. Returns the names handled.
    Only names of that exact form are touched, so nothing else in the folder is at risk.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled = []
    for entry in sorted(folder.iterdir()):
        if _TEMP_NAME.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            handled.append(entry.name)
            continue
        old = _OLD_NAME.match(entry.name)
        if old and entry.is_dir():
            target = folder / old.group("target")
            if target.exists():
                shutil.rmtree(entry)
            else:
                entry.rename(target)
            handled.append(entry.name)
    return handled


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


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
