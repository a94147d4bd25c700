"""``locakd train-teacher | distill | summarize``: runs, help text and one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_helpers import write_config

from locakd.cli.main import main
from locakd.config import describe
from locakd.image.config import ImageExperimentConfig


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("locakd ") and ": error: " in lines[0]
    assert needle in lines[0], lines[0]
    return lines[0]


def test_train_distill_summarize(tmp_path, cli_mnist_root, capsys):
    runs = tmp_path / "runs"
    teacher_cfg = write_config(
        tmp_path / "t.yaml", cli_mnist_root, runs / "teacher", student={"name": "mnist1d_cnn_16"}
    )
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["run_dir"] == str(runs / "teacher") and printed["best_top1"] is not None

    student_cfg = write_config(
        tmp_path / "s.yaml",
        cli_mnist_root,
        runs / "kdloca" / "seed0",
        teacher={"name": "mnist1d_cnn_16", "checkpoint": str(runs / "teacher")},
        method={"name": "kd+loca", "ce_weight": 0.1},
    )
    for seed in (0, 1):
        assert (
            main(["distill", str(student_cfg), f"run.seed={seed}", f"run.out_dir={runs}/kdloca/seed{seed}"])
            == 0
        )
    capsys.readouterr()
    assert main(["summarize", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "mnist1d_cnn_16 -> mnist1d_mlp_32" in table and "kd+loca" in table
    assert main(["summarize", str(runs), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    loca = next(g for g in groups if g["method"] == "kd+loca")
    assert loca["n"] == 2 and loca["seeds"] == [0, 1]
    bests = [
        json.loads((runs / "kdloca" / f"seed{s}" / "summary.json").read_text())["best_top1"] for s in (0, 1)
    ]
    assert loca["best_top1_mean"] == pytest.approx(sum(bests) / 2)

    # --resume on a finished run with more epochs continues it
    assert main(["distill", "--resume", str(student_cfg), "run.epochs=2"]) == 0
    assert json.loads((runs / "kdloca" / "seed0" / "summary.json").read_text())["last_epoch"] == 2


def test_unknown_key_is_a_one_line_error(tmp_path, cli_mnist_root, capsys):
    cfg = write_config(tmp_path / "c.yaml", cli_mnist_root, tmp_path / "run")
    assert main(["train-teacher", str(cfg), "optim.lrr=0.1"]) == 2
    _one_line_error(capsys, "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")
    cfg.write_text(cfg.read_text() + "\nextra_section: {a: 1}\n")
    assert main(["train-teacher", str(cfg)]) == 2
    _one_line_error(capsys, "unknown config key 'extra_section'")


def test_missing_data_directory(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "c.yaml",
        tmp_path / "no-cifar-here",
        tmp_path / "run",
        data={"name": "cifar100", "root": str(tmp_path / "no-cifar-here")},
        student={"name": "resnet20"},
    )
    assert main(["train-teacher", str(cfg)]) == 2
    _one_line_error(capsys, "CIFAR-100 not found")


def test_wrong_architecture_teacher(tmp_path, cli_mnist_root, random_teacher, capsys):
    cfg = write_config(
        tmp_path / "c.yaml",
        cli_mnist_root,
        tmp_path / "run",
        teacher={"name": "mnist1d_cnn_64", "checkpoint": str(random_teacher)},
        method={"name": "kd"},
    )
    assert main(["distill", str(cfg)]) == 2
    line = _one_line_error(capsys, "does not fit the configured teacher architecture")
    assert str(random_teacher) in line and "teacher.checkpoint" in line


def test_corrupt_teacher_checkpoint(tmp_path, cli_mnist_root, random_teacher, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(random_teacher.read_bytes()[:200])
    cfg = write_config(
        tmp_path / "c.yaml",
        cli_mnist_root,
        tmp_path / "run",
        teacher={"name": "mnist1d_cnn_16", "checkpoint": str(bad)},
        method={"name": "kd"},
    )
    assert main(["distill", str(cfg)]) == 2
    _one_line_error(capsys, f"checkpoint {bad} could not be read")


def test_resume_without_checkpoint(tmp_path, cli_mnist_root, capsys):
    cfg = write_config(tmp_path / "c.yaml", cli_mnist_root, tmp_path / "run")
    assert main(["train-teacher", str(cfg), "--resume"]) == 2
    _one_line_error(capsys, "cannot resume")


def test_sync_batchnorm_on_the_cpu_is_a_one_line_error(tmp_path, cli_mnist_root, capsys):
    cfg = write_config(tmp_path / "c.yaml", cli_mnist_root, tmp_path / "run", student={"name": "mnist1d_cnn_8"})
    assert main(["train-teacher", str(cfg), "run.sync_batchnorm=true"]) == 2
    _one_line_error(capsys, "config key 'run.sync_batchnorm' needs CUDA devices")


def test_missing_config_file_and_wrong_mode(tmp_path, cli_mnist_root, capsys):
    assert main(["distill", str(tmp_path / "nope.yaml")]) == 2
    _one_line_error(capsys, "config file not found")
    cfg = write_config(tmp_path / "c.yaml", cli_mnist_root, tmp_path / "run", method={"name": "kd"})
    assert main(["train-teacher", str(cfg)]) == 2
    _one_line_error(capsys, "method.name=ce")


def test_help_explains_every_option(capsys):
    for command in ("distill", "train-teacher"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for line in describe(ImageExperimentConfig):
            key = line.split("=")[0].strip()
            assert f"  {key} = " in out, key
        assert "PER PROCESS" in out and "--resume" in out


def test_print_config(tmp_path, cli_mnist_root, capsys):
    cfg = write_config(tmp_path / "c.yaml", cli_mnist_root, tmp_path / "run")
    assert main(["train-teacher", str(cfg), "optim.lr=0.2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.2 and printed["data"]["name"] == "mnist1d"
    assert not (tmp_path / "run").exists()


def test_summarize_without_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["summarize", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "no finished runs")
