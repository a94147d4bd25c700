"""End-to-end runs on tiny MNIST-1D: outputs, every method, exact resume, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from image_helpers import tiny_config

from locakd.config import from_dict, to_dict
from locakd.distiller import METHODS
from locakd.engine.io import load_checkpoint
from locakd.engine.logging import read_metrics
from locakd.engine.run import SUMMARY_KEYS
from locakd.errors import CheckpointError, ConfigError, DataError, LocakdError, NonFiniteLossError
from locakd.image.config import ImageExperimentConfig
from locakd.image.trainer import CHECKPOINT_FORMAT, distill, train_teacher

VOLATILE = {"time", "epoch_time_s", "wall_time_s", "run_dir"}


def _records(run_dir):
    return [
        {k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_teacher_run_writes_everything(teacher_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.pt", "last.pt"):
        assert (teacher_run / name).is_file(), name
    summary = _summary(teacher_run)
    assert set(SUMMARY_KEYS) <= set(summary)  # the keys every pipeline writes
    assert summary["command"] == "train-teacher" and summary["teacher_top1"] is None
    assert summary["misinstruction_rate"] is None
    assert summary["best_top1"] >= summary["last_top1"] and summary["last_epoch"] == 3
    ckpt = load_checkpoint(teacher_run / "last.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["epoch"] == 3
    for key in ("model", "optimizer", "scheduler", "scaler", "best_top1", "rng", "config"):
        assert key in ckpt
    best = load_checkpoint(teacher_run / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["best_top1"] == summary["best_top1"]
    records = [r for r in read_metrics(teacher_run / "metrics.jsonl") if r["tag"] == "epoch"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"lr", "train_loss", "train_top1", "test_top1", "test_top5"} <= set(r) for r in records)
    # the resolved config round-trips
    saved = from_dict(ImageExperimentConfig, yaml.safe_load((teacher_run / "config.yaml").read_text()))
    assert saved.student.name == "mnist1d_cnn_16" and saved.run.epochs == 3


def test_kd_loca_distill_end_to_end(tmp_path, mnist_root, teacher_run):
    out = tmp_path / "kdloca"
    cfg = tiny_config(
        mnist_root,
        out,
        teacher="mnist1d_cnn_16",
        checkpoint=teacher_run,
        method="kd+loca",
        data={"mnist1d_noise_std": 0.5},
        run={"tensorboard": True},
    )
    summary = distill(cfg)
    assert summary == {**_summary(out), "wall_time_s": summary["wall_time_s"]}
    assert summary["teacher_top1"] == pytest.approx(
        _summary(teacher_run)["best_top1"]
    )  # the run folder means best.pt
    assert 0.0 <= summary["misinstruction_rate"] <= 1.0
    assert summary["method"] == "kd+loca" and summary["teacher"] == "mnist1d_cnn_16"
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["tag"] == "epoch"]
    assert len(records) == 2
    assert all(
        {"train_kd", "misinstruction_rate", "kd_factor", "test_top1", "best_top1"} <= set(r) for r in records
    )
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("best.pt", "last.pt", "config.yaml"):
        assert (out / name).is_file()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(tmp_path, mnist_root, teacher_run, method):
    extra = {"warmup_epochs": 2} if method.startswith("dkd") else {}
    cfg = tiny_config(
        mnist_root,
        tmp_path / "run",
        teacher="mnist1d_cnn_16",
        checkpoint=teacher_run,
        epochs=1,
        method={"name": method, **extra},
    )
    summary = distill(cfg)
    assert summary["method"] == method
    assert summary["last_top1"] is not None and summary["misinstruction_rate"] is not None


def test_bfloat16_autocast_on_cpu(tmp_path, mnist_root, teacher_run):
    cfg = tiny_config(
        mnist_root,
        tmp_path / "bf16",
        teacher="mnist1d_cnn_16",
        checkpoint=teacher_run,
        epochs=1,
        method="dkd+loca",
        run={"precision": "bfloat16"},
    )
    summary = distill(cfg)
    assert summary["last_top1"] is not None


def _resume_cfg(mnist_root, out, epochs):
    return tiny_config(
        mnist_root,
        out,
        student="mnist1d_mlp_32",
        epochs=epochs,
        method="ce",
        data={"mnist1d_noise_std": 0.3},
        optim={"milestones": [2], "nesterov": True},
    )


class _Stop(Exception):
    pass


def test_resume_gives_the_same_weights_and_metrics(tmp_path, mnist_root, teacher_run):
    def cfg(out, epochs):
        return tiny_config(
            mnist_root,
            out,
            teacher="mnist1d_cnn_16",
            checkpoint=teacher_run,
            method="kd+loca",
            epochs=epochs,
            data={"mnist1d_noise_std": 0.3},
            optim={"milestones": [2]},
        )

    straight = tmp_path / "straight"
    distill(cfg(straight, 3))
    # (a) stopped after epoch 1 (a run of 1 epoch), then resumed to 3 epochs
    extended = tmp_path / "extended"
    distill(cfg(extended, 1))
    distill(cfg(extended, 3), resume=True)

    # (b) interrupted by an exception after epoch 2, then resumed
    def stop_after_two(done, metrics):
        if done == 2:
            raise _Stop

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Stop):
        distill(cfg(interrupted, 3), callbacks=[stop_after_two])
    assert not (interrupted / "summary.json").exists()
    distill(cfg(interrupted, 3), resume=True)

    ref = load_checkpoint(straight / "last.pt")
    for other in (extended, interrupted):
        ckpt = load_checkpoint(other / "last.pt")
        for key, value in ref["model"].items():
            assert torch.equal(value, ckpt["model"][key]), (other.name, key)
        for pid, state in ref["optimizer"]["state"].items():
            assert torch.equal(state["momentum_buffer"], ckpt["optimizer"]["state"][pid]["momentum_buffer"])
        assert ckpt["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"] == 3
        assert _records(other) == _records(straight), other.name
        a, b = _summary(straight), _summary(other)
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {
            k: v for k, v in b.items() if k not in VOLATILE
        }


def test_resume_of_a_teacher_run_matches_too(tmp_path, mnist_root):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_teacher(_resume_cfg(mnist_root, straight, 2))
    train_teacher(_resume_cfg(mnist_root, resumed, 1))
    train_teacher(_resume_cfg(mnist_root, resumed, 2), resume=True)
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight) == _records(resumed)


def test_resume_and_overwrite_guards(tmp_path, mnist_root):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="cannot resume: .*last.pt does not exist"):
        train_teacher(_resume_cfg(mnist_root, out, 1), resume=True)
    train_teacher(_resume_cfg(mnist_root, out, 1))
    with pytest.raises(ConfigError, match="already holds a run .*--resume"):
        train_teacher(_resume_cfg(mnist_root, out, 1))
    changed = _resume_cfg(mnist_root, out, 2)
    changed.optim.lr = 0.1
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.05 in the checkpoint, 0.1 now"):
        train_teacher(changed, resume=True)


# ------------------------------------------------------------------ clear errors (API level)


def test_missing_cifar_directory_is_a_data_error(tmp_path):
    cfg = from_dict(
        ImageExperimentConfig,
        {
            "data": {"name": "cifar100", "root": str(tmp_path / "no-such-dir")},
            "student": {"name": "resnet20"},
            "method": {"name": "ce"},
            "run": {"device": "cpu", "out_dir": str(tmp_path / "run")},
        },
    )
    with pytest.raises(DataError, match="CIFAR-100 not found: .*no-such-dir.*download"):
        train_teacher(cfg)


def test_wrong_architecture_teacher_names_file_and_key(tmp_path, mnist_root, teacher_run):
    cfg = tiny_config(
        mnist_root, tmp_path / "r", teacher="mnist1d_cnn_8", checkpoint=teacher_run, method="kd"
    )
    with pytest.raises(CheckpointError) as info:
        distill(cfg)
    message = str(info.value)
    assert "best.pt" in message and "teacher.checkpoint" in message and "mnist1d_cnn_8" in message
    assert "trained as 'mnist1d_cnn_16'" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_teacher_checkpoint(tmp_path, mnist_root, teacher_run, damage):
    bad = tmp_path / "teacher.pt"
    raw = (teacher_run / "best.pt").read_bytes()
    bad.write_bytes(
        {"truncated": raw[: len(raw) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage]
    )
    cfg = tiny_config(mnist_root, tmp_path / "r", teacher="mnist1d_cnn_16", checkpoint=bad, method="kd")
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} could not be read"):
        distill(cfg)


def test_missing_teacher_checkpoint(tmp_path, mnist_root):
    cfg = tiny_config(
        mnist_root, tmp_path / "r", teacher="mnist1d_cnn_16", checkpoint=tmp_path / "nope.pt", method="kd"
    )
    with pytest.raises(CheckpointError, match="teacher checkpoint not found: .*nope.pt .*teacher.checkpoint"):
        distill(cfg)
    (tmp_path / "empty_run").mkdir()
    cfg.teacher.checkpoint = str(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="holds no best.pt or last.pt"):
        distill(cfg)


def test_corrupt_last_checkpoint_on_resume(tmp_path, mnist_root):
    out = tmp_path / "run"
    train_teacher(_resume_cfg(mnist_root, out, 1))
    (out / "last.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="could not be read"):
        train_teacher(_resume_cfg(mnist_root, out, 2), resume=True)


def test_model_that_does_not_fit_the_data(tmp_path, mnist_root):
    cfg = tiny_config(mnist_root, tmp_path / "r", student="resnet8")
    with pytest.raises(
        ConfigError, match="student.name='resnet8' cannot take mnist1d inputs of shape \\(40,\\)"
    ):
        train_teacher(cfg)


def test_sync_batchnorm_off_cuda_is_a_config_error_naming_the_key(tmp_path, mnist_root):
    cfg = tiny_config(mnist_root, tmp_path / "r", student="mnist1d_cnn_8", run={"sync_batchnorm": True})
    with pytest.raises(ConfigError, match="config key 'run.sync_batchnorm' needs CUDA devices"):
        train_teacher(cfg)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_non_finite_loss_names_the_term_and_the_step(tmp_path, mnist_root):
    cfg = tiny_config(mnist_root, tmp_path / "r", optim={"lr": 1e30, "milestones": [2]})
    with pytest.raises(NonFiniteLossError, match=r"term 'ce' became (nan|inf) at step 2 of epoch 1") as info:
        train_teacher(cfg)
    assert isinstance(info.value, LocakdError) and not (tmp_path / "r" / "last.pt").exists()


def test_float16_on_cpu_is_refused(tmp_path, mnist_root):
    cfg = tiny_config(mnist_root, tmp_path / "r", run={"precision": "float16"})
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        train_teacher(cfg)


def test_teacher_checkpoint_from_another_tool(tmp_path, mnist_root, teacher_run):
    """A bare state dict or {"state_dict": ...} with DDP's "module." prefix loads as a teacher too."""
    sd = load_checkpoint(teacher_run / "best.pt")["model"]
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240}, path)
    cfg = tiny_config(
        mnist_root, tmp_path / "r", teacher="mnist1d_cnn_16", checkpoint=path, method="kd", epochs=1
    )
    assert distill(cfg)["teacher_top1"] == pytest.approx(_summary(teacher_run)["best_top1"])
    shutil.rmtree(tmp_path / "r")
    torch.save(sd, path)
    assert distill(cfg)["teacher_top1"] == pytest.approx(_summary(teacher_run)["best_top1"])
    assert to_dict(cfg)["teacher"]["checkpoint"] == str(path)


# ------------------------------------------------------------------ CIFAR code path (fake data)


def _fake_cifar100(root, n_train=64, n_test=32):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        obj = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return root


def test_cifar_pipeline_with_batchnorm_and_augmentation(tmp_path):
    """uint8 CIFAR images, crop + flip on the fly, a BatchNorm ResNet: teacher, distill, exact resume."""
    root = _fake_cifar100(tmp_path / "cifar")

    def cfg(out, **sections):
        data = {
            "data": {"name": "cifar100", "root": str(root), "batch_size": 16, "eval_batch_size": 32},
            "student": {"name": "resnet8"},
            "method": {"name": "ce", "ce_weight": 1.0},
            "optim": {"milestones": [1]},
            "run": {
                "epochs": 2,
                "device": "cpu",
                "out_dir": str(out),
                "progress": False,
                "tensorboard": False,
            },
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return from_dict(ImageExperimentConfig, data)

    summary = train_teacher(cfg(tmp_path / "teacher", run={"epochs": 1}))
    assert summary["last_epoch"] == 1
    kd = {
        "method": {"name": "kd+loca", "ce_weight": 0.1},
        "teacher": {"name": "resnet8", "checkpoint": str(tmp_path / "teacher")},
    }
    straight = distill(cfg(tmp_path / "a", **kd))
    distill(cfg(tmp_path / "b", run={"epochs": 1}, **kd))
    resumed = distill(cfg(tmp_path / "b", **kd), resume=True)
    a, b = (
        load_checkpoint(tmp_path / "a" / "last.pt")["model"],
        load_checkpoint(tmp_path / "b" / "last.pt")["model"],
    )
    assert any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["misinstruction_rate"] == resumed["misinstruction_rate"]
    assert _records(tmp_path / "a") == _records(tmp_path / "b")
