"""Atomic writes, the kill-inside-a-write test hook, and the cleanup of what a killed write leaves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from locakd.engine.io import (
    PAUSE_IN_WRITE_ENV,
    PAUSE_MARKER_ENV,
    atomic_write_dir,
    atomic_write_text,
    clean_stale_files,
    load_checkpoint,
    save_checkpoint,
)
from locakd.errors import CheckpointError

KILLED_WRITER = """
import sys
from locakd.engine.io import save_checkpoint
import torch
save_checkpoint({"step": 1}, sys.argv[1])
save_checkpoint({"step": 2, "x": torch.arange(1000)}, sys.argv[1])
"""


def _kill_inside_write(tmp_path, target, script, extra_args=()):
    """Run ``script`` with the pause hook on the 2nd write of ``target``; kill -9 it inside that write."""
    marker = tmp_path / "paused"
    env = {**os.environ, PAUSE_IN_WRITE_ENV: f"{target.name}:2", PAUSE_MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), *extra_args], env=env)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the writer ended before pausing"
        assert time.monotonic() < deadline, "the writer never paused"
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def test_kill_inside_a_checkpoint_write_keeps_the_old_file_and_leaves_a_temp_file(tmp_path):
    target = tmp_path / "last.pt"
    _kill_inside_write(tmp_path, target, KILLED_WRITER)
    assert load_checkpoint(target) == {"step": 1}  # the previous checkpoint is intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    (tmp_path / "notes.tmp").write_text("the user's")  # not ours: never touched
    (tmp_path / ".hidden").write_text("the user's")
    assert clean_stale_files(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.pt", "notes.tmp", "paused", "paused.writes"]
    assert clean_stale_files(tmp_path) == []


def test_an_error_inside_a_write_removes_the_temp_file(tmp_path):
    def fail(handle):
        handle.write("partial")
        raise RuntimeError("disk full")

    atomic_write_text(tmp_path / "a.txt", "old")
    from locakd.engine.io import atomic_write

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail, mode="w")
    assert (tmp_path / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_folder_swap_and_recovery_after_a_kill_between_the_renames(tmp_path):
    target = tmp_path / "best"

    def fill(text):
        return lambda folder: (folder / "model.txt").write_text(text)

    atomic_write_dir(target, fill("v1"))
    atomic_write_dir(target, fill("v2"))
    assert (target / "model.txt").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["best"]
    # a kill after "best -> .best.old" and before ".best.<tmp> -> best": best/ is gone for the moment
    target.rename(tmp_path / ".best.old")
    (tmp_path / ".best.abcd1234.tmp").mkdir()
    assert sorted(clean_stale_files(tmp_path)) == [".best.abcd1234.tmp", ".best.old"]
    assert (target / "model.txt").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["best"]
    # .old next to a complete best/: the old one goes
    (tmp_path / ".best.old").mkdir()
    assert clean_stale_files(tmp_path) == [".best.old"] and sorted(os.listdir(tmp_path)) == ["best"]
    # the next swap also repairs an interrupted one by itself
    target.rename(tmp_path / ".best.old")
    atomic_write_dir(target, fill("v3"))
    assert (target / "model.txt").read_text() == "v3" and sorted(os.listdir(tmp_path)) == ["best"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt could not be read"):
        load_checkpoint(tmp_path / "bad.pt")
    save_checkpoint([1, 2], tmp_path / "list.pt")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        load_checkpoint(tmp_path / "list.pt")
    save_checkpoint({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["w"], torch.ones(2))
