"""run.engine=hf checkpoints: staged and renamed into place, and --resume only from a complete checkpoint-N/
(an interrupted save's folders removed; none complete: a CheckpointError naming what is missing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from locakd.config import from_dict
from locakd.engine.io import PAUSE_IN_WRITE_ENV, PAUSE_MARKER_ENV
from locakd.errors import CheckpointError
from locakd.lm.config import LMExperimentConfig
from locakd.lm.trainer import train_lm

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TIMEOUT_S = 240
RUN = {"engine": "hf", "save_every": 2}  # max_steps 4 (the fixture's config): checkpoints at steps 2 and 4


def _config(hf_env, out_dir: Path) -> LMExperimentConfig:
    return from_dict(LMExperimentConfig, hf_env.config(out_dir, run=RUN))


def _assert_same_final_weights(full: Path, resumed: Path) -> None:
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same data position, RNG and optimizer state: bitwise


@pytest.fixture(scope="module")
def full_run(hf_env, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("hf_checkpoints") / "full"
    train_lm(_config(hf_env, out))
    return out


def _stopped_run(hf_env, out: Path) -> LMExperimentConfig:
    config = _config(hf_env, out)
    train_lm(config, stop_after_steps=2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-"))) == \
        ["checkpoint-2"]  # the staging folder is gone, the checkpoint in place
    return config


def test_a_checkpoint_is_staged_whole_and_renamed_into_place(hf_env, tmp_path, monkeypatch):
    import locakd.lm.hf_run as hf_run

    swaps = []
    real_swap = hf_run.swap_in_dir

    def recording_swap(tmp, target):
        tmp, target = Path(tmp), Path(target)
        swaps.append((tmp.parent.name, target.name, target.exists(), sorted(p.name for p in tmp.iterdir())))
        real_swap(tmp, target)

    monkeypatch.setattr(hf_run, "swap_in_dir", recording_swap)
    out = tmp_path / "run"
    train_lm(_config(hf_env, out))
    checkpoints = [swap for swap in swaps if swap[1].startswith("checkpoint-")]  # best/ and final/ swap too
    assert [name for _, name, _, _ in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for staging, name, existed, files in checkpoints:
        assert staging.startswith(f".{name}.") and staging.endswith(".tmp") and not existed
        # trainer_state.json (the Trainer's last file) and locakd's state are in before the folder is visible
        assert {"trainer_state.json", "locakd_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
                "rng_state.pth"} <= set(files)
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-4" in names and "checkpoint-2" not in names  # one kept (save_total_limit=1)
    assert not [n for n in names if n.endswith(".tmp") or n.endswith(".old")]
    assert hf_run.checkpoint_missing(out / "checkpoint-4") == []


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_removes_a_half_written_newer_checkpoint_and_continues_bitwise(hf_env, tmp_path, full_run, capsys,
                                                                             damage):
    """As a non-atomic save (an older locakd) killed inside checkpoint-3/ leaves it: every file but
    trainer_state.json, or that one cut short. With damage=missing the complete checkpoint-2/ also lacks
    locakd_state.json (killed after the Trainer's save, before locakd's): still resumed, as before."""
    out = tmp_path / "cut"
    config = _stopped_run(hf_env, out)
    newer = out / "checkpoint-3"
    shutil.copytree(out / "checkpoint-2", newer)
    state = newer / "trainer_state.json"
    if damage == "missing":
        state.unlink()
        (out / "checkpoint-2" / "locakd_state.json").unlink()
    else:
        text = state.read_text()
        state.write_text(text[: len(text) // 2])
    older = out / "checkpoint-1"  # a rotation killed while deleting the older checkpoint
    shutil.copytree(out / "checkpoint-2", older)
    (older / "optimizer.pt").unlink()
    staged = out / ".checkpoint-3.k1ll3d_0.tmp"  # a staged save killed before its rename
    shutil.copytree(out / "checkpoint-2", staged / "checkpoint-3")
    capsys.readouterr()

    resumed = train_lm(config, resume=True)
    err = capsys.readouterr().err
    assert resumed["status"] == "finished" and resumed["step"] == 4
    assert "resumed from " + str(out / "checkpoint-2") in err
    assert f"removed what interrupted checkpoint saves left in {out}: checkpoint-3, checkpoint-1 (incomplete)" in err
    assert ("has no locakd_state.json" in err) == (damage == "missing")
    assert not newer.exists() and not older.exists() and not staged.exists()
    assert sorted(p.name for p in out.iterdir() if "checkpoint-" in p.name) == ["checkpoint-4"]
    _assert_same_final_weights(full_run, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["tag"] == "train"] == [1, 2, 3, 4]


def test_no_complete_checkpoint_is_a_checkpoint_error_naming_what_is_missing(hf_env, tmp_path):
    from locakd.lm.hf_run import _TrainerRun, checkpoint_missing

    out = tmp_path / "cut"
    config = _stopped_run(hf_env, out)
    checkpoint = out / "checkpoint-2"
    for name in ("optimizer.pt", "rng_state.pth", "model.safetensors"):
        shutil.copy(checkpoint / name, tmp_path / name)
        (checkpoint / name).unlink()
        assert checkpoint_missing(checkpoint) == [{"optimizer.pt": "optimizer.pt", "rng_state.pth": "rng_state.pth",
                                                   "model.safetensors": "the model weights (model.safetensors)"}[name]]
        shutil.copy(tmp_path / name, checkpoint / name)
    assert checkpoint_missing(checkpoint) == []
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # cut short by a kill

    def open_run():
        return _TrainerRun(config, out_dir=out, command="lm-distill", checkpoint_format="-", position_key="step",
                           resume=True)

    message = rf"cannot resume: no complete Trainer checkpoint in {out} \({checkpoint} lacks a complete " \
              r"trainer_state.json \(it is not valid JSON: truncated\)\)"
    with pytest.raises(CheckpointError, match=message):
        open_run()
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2 lacks trainer_state.json \(the Trainer writes it last\)"):
        train_lm(config, resume=True)
    assert checkpoint.is_dir()  # nothing is removed when there is nothing to resume from


@pytest.mark.slow
def test_kill_9_inside_a_checkpoint_save_then_resume_gives_the_uninterrupted_run(hf_env, tmp_path, full_run):
    """A real ``locakd lm-distill`` process killed with SIGKILL while checkpoint-4/ is staged (all its files
    written, not yet renamed into place; the engine.io pause hook): checkpoint-2/ stays the checkpoint, and
    --resume ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "cut"
    cfg = hf_env.write_config(tmp_path / "cut.yaml", out, run=RUN)
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), PAUSE_IN_WRITE_ENV: "checkpoint-4:1",
           PAUSE_MARKER_ENV: str(marker)}
    process = subprocess.Popen([sys.executable, "-m", "locakd.cli.main", "lm-distill", str(cfg)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    paused = marker.exists()
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert paused, err.decode()[-3000:]
    staged = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-4.")]
    assert len(staged) == 1 and not (out / "checkpoint-4").exists() and (out / "checkpoint-2").is_dir()
    resumed = train_lm(from_dict(LMExperimentConfig, hf_env.config(out, run=RUN)), resume=True)
    assert resumed["status"] == "finished" and resumed["step"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    _assert_same_final_weights(full_run, out)
