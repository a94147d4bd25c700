"""The run lifecycle: folder guards, config diff on resume, checkpoints, summary keys, non-finite losses."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from locakd.config import RunSection, option
from locakd.engine.io import load_checkpoint
from locakd.engine.run import SUMMARY_KEYS, FiniteWatch, check_finite, open_run
from locakd.errors import CheckpointError, ConfigError, NonFiniteLossError


@dataclass
class _Optim:
    lr: float = option(0.1, "learning rate")
    steps: int = option(4, "steps", resume=True)


@dataclass
class _Config:
    optim: _Optim = field(default_factory=_Optim)
    run: RunSection = field(default_factory=RunSection)


def _config(tmp_path, **optim):
    cfg = _Config(optim=_Optim(**optim))
    cfg.run.out_dir, cfg.run.device, cfg.run.progress, cfg.run.tensorboard = str(tmp_path), "cpu", False, False
    return cfg


def _open(cfg, resume=False, fmt="toy-v1"):
    return open_run(cfg, out_dir=cfg.run.out_dir, command="toy", checkpoint_format=fmt, position_key="step",
                    resume=resume)


def test_lifecycle_guards_resume_and_summary(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(CheckpointError, match="cannot resume: .*last.pt does not exist"):
        with _open(cfg, resume=True):
            pass
    with _open(cfg) as run:
        assert run.position == 0 and not run.resumed
        logger = run.begin()
        logger.log(1, {"loss": 1.0}, tag="train")
        run.save({"step": 1, "weights": torch.ones(2)})
        logger.log(2, {"loss": 2.0}, tag="train")  # killed before the checkpoint of step 2
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["format"] == "toy-v1" and ckpt["step"] == 1 and len(ckpt["rng"]) == 1 and ckpt["world_size"] == 1
    assert ckpt["config"]["optim"]["lr"] == 0.1 and ckpt["wall_time_s"] >= 0
    assert (tmp_path / "config.yaml").is_file()

    with pytest.raises(ConfigError, match="already holds a run .*--resume"):
        with _open(cfg):
            pass
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.1 in the checkpoint, 0.2 now"):
        with _open(_config(tmp_path, lr=0.2), resume=True):
            pass
    with pytest.raises(CheckpointError, match="another locakd version"):
        with _open(cfg, resume=True, fmt="toy-v2"):
            pass

    (tmp_path / ".last.pt.abcd_123.tmp").write_bytes(b"half")  # a killed write
    with _open(_config(tmp_path, steps=9), resume=True) as run:  # optim.steps may change on resume
        assert run.resumed and run.position == 1 and torch.equal(run.checkpoint["weights"], torch.ones(2))
        assert run.restore_rng()
        logger = run.begin()
        assert [r["step"] for r in map(json.loads, logger.metrics_path.read_text().splitlines())] == [1]
        assert not (tmp_path / ".last.pt.abcd_123.tmp").exists()
        summary = run.finish({"method": "toy", "step": 9})
    assert list(summary)[: len(SUMMARY_KEYS) - 2] == list(SUMMARY_KEYS[:-2])
    assert set(SUMMARY_KEYS) <= set(summary) and summary["step"] == 9
    assert summary["command"] == "toy" and summary["status"] == "finished" and summary["device"] == "cpu"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_resume_of_a_run_saved_before_a_key_existed_reports_only_real_changes(tmp_path):
    cfg = _config(tmp_path)
    with _open(cfg) as run:
        run.begin()
        run.save({"step": 1})
    # as an older locakd wrote it: the checkpoint's config has no optim.lr and no run.dist_timeout_s
    state = load_checkpoint(tmp_path / "last.pt")
    del state["config"]["optim"]["lr"], state["config"]["run"]["dist_timeout_s"]
    torch.save(state, tmp_path / "last.pt")
    with _open(cfg, resume=True) as run:  # the missing keys count as their defaults: nothing changed
        assert run.resumed and run.position == 1
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.1 in the checkpoint, 0.3 now\)"):
        with _open(_config(tmp_path, lr=0.3), resume=True):  # a real change of a missing key is still one
            pass
    state["config"]["optim"]["momentum"] = 0.9  # a key this version does not know is a change too
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match=r"optim.momentum: 0.9 in the checkpoint, '<absent>' now"):
        with _open(cfg, resume=True):
            pass


def test_float16_on_the_cpu_fails_before_the_folder_is_touched(tmp_path):
    cfg = _config(tmp_path / "run")
    cfg.run.precision = "float16"
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        with _open(cfg):
            pass
    assert not (tmp_path / "run").exists()


def test_check_finite_names_the_term_and_the_step():
    check_finite("step 3", ce=1.0, kd=0.0)
    with pytest.raises(NonFiniteLossError, match="term 'kd' became nan at step 3") as info:
        check_finite("step 3", ce=1.0, kd=math.nan)
    assert isinstance(info.value, FloatingPointError) and info.value.term == "kd"


def test_finite_watch_reports_the_first_bad_step_without_syncing_each_step():
    watch = FiniteWatch(["ce", "kd"])
    for step in range(5):
        watch.update(step, ce=torch.tensor(1.0), kd=torch.tensor(float("inf") if step >= 3 else 0.5))
    watch.update(5, ce=torch.tensor(float("nan")), kd=torch.tensor(0.0))
    with pytest.raises(NonFiniteLossError, match="term 'kd' became inf at step 3 of epoch 2"):
        watch.check(lambda step: f"step {step} of epoch 2")
    FiniteWatch(["ce"]).check(lambda step: "never")


def test_a_fresh_run_refuses_a_folder_holding_a_trainer_run(tmp_path):
    """run.engine=hf keeps its state in checkpoint-N/ (no last.pt): a fresh own-engine run there would overwrite
    its metrics, so it is refused like a folder holding last.pt; an unrelated folder is not."""
    (tmp_path / "notes").mkdir()
    with _open(_config(tmp_path)) as run:  # an unrelated sub-folder is no run
        assert run.position == 0
    (tmp_path / "last.pt").unlink(missing_ok=True)
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-4/, a run.engine=hf run\).*--resume"):
        with _open(_config(tmp_path)):
            pass
