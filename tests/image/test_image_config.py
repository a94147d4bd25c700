"""ImageExperimentConfig: defaults = the CIFAR recipe, strict keys, cross-checks, the schedule."""

from __future__ import annotations

import dataclasses

import pytest

from locakd.config import describe, load_config
from locakd.distiller import METHODS
from locakd.errors import ConfigError
from locakd.image.config import ImageExperimentConfig, load_image_config
from locakd.image.trainer import build_lr_lambda


def test_defaults_are_the_cifar_kd_recipe():
    cfg = ImageExperimentConfig()
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.augment) == ("cifar100", 64, True)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd",
        0.05,
        0.9,
        5e-4,
    )
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.gamma) == ("multistep", [150, 180, 210], 0.1)
    assert cfg.run.epochs == 240
    m = cfg.method
    assert (m.name, m.temperature, m.ce_weight, m.kd_weight, m.loca_alpha) == ("kd+loca", 4.0, 0.1, 0.9, 0.9)
    assert (m.dkd_alpha, m.dkd_beta) == (1.0, 8.0)


def test_method_names_match_the_distiller():
    assert set(METHODS) == {"ce", "kd", "kd+loca", "dkd", "dkd+loca", "ka_shift", "ka_smooth", "skip"}
    for name in METHODS:
        load_image_config(None, [f"method.name={name}"])


def test_every_key_has_help():
    lines = describe(ImageExperimentConfig)
    assert all("  # " in line for line in lines), [line for line in lines if "  # " not in line]
    cfg = ImageExperimentConfig()
    n_keys = sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(cfg))
    assert len(lines) == n_keys


def test_unknown_keys_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  milestone: [1]\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim.milestone' \(did you mean 'optim.milestones'\?\)"
    ):
        load_image_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'metod'"):
        load_image_config(None, ["metod.name=kd"])
    with pytest.raises(ConfigError, match="'method.name'"):
        load_image_config(None, ["method.name=kd+lcoa"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.loca_alpha=1.0", "method.loca_alpha"),
        ("method.temperature=0", "method.temperature"),
        ("method.name=dkd method.calibrate_correct=true", "kd\\+loca ablation"),
        ("optim.milestones=[180,150]", "optim.milestones"),
        ("run.epochs=0", "run.epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.nesterov=true optim.name=adamw", "optim.nesterov"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_image_config(None, override.split())


def test_mode_checks():
    cfg = load_config(ImageExperimentConfig, None, ["method.name=ce"])
    cfg.check_for("train-teacher")
    cfg.check_for("distill")  # ce without a teacher is the student baseline
    with pytest.raises(ConfigError, match="method.name=ce"):
        load_image_config(None, ["method.name=kd"]).check_for("train-teacher")
    with pytest.raises(ConfigError, match="teacher.name"):
        load_image_config(None, ["method.name=kd"]).check_for("distill")
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        load_image_config(None, ["teacher.name=resnet56"]).check_for("distill")
    with pytest.raises(ConfigError, match="leave teacher"):
        load_image_config(None, ["method.name=ce", "teacher.name=resnet56"]).check_for("train-teacher")


def test_default_output_dir():
    cfg = load_image_config(
        None, ["teacher.name=resnet56", "teacher.checkpoint=x", "student.name=resnet20", "run.seed=3"]
    )
    assert cfg.output_dir().as_posix() == "runs/cifar100/resnet56_resnet20/kd+loca/seed3"
    cfg = load_image_config(None, ["student.name=resnet56", "method.name=ce"])
    assert cfg.output_dir().as_posix() == "runs/cifar100/resnet56/ce/seed0"
    assert load_image_config(None, ["run.out_dir=/x/y"]).output_dir().as_posix() == "/x/y"


def test_lr_schedules():
    cfg = ImageExperimentConfig()
    f = build_lr_lambda(cfg)
    assert [f(e) for e in (0, 149, 150, 179, 180, 210, 239)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001, 0.001]
    )
    cfg = load_image_config(
        None, ["optim.schedule=cosine", "run.epochs=10", "optim.lr=0.1", "optim.min_lr=0.01"]
    )
    f = build_lr_lambda(cfg)
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(5) == pytest.approx(0.55)
    assert build_lr_lambda(load_image_config(None, ["optim.schedule=constant"]))(100) == 1.0
