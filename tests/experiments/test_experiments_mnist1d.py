"""The MNIST-1D setting: method families from the Distiller, config overrides, run digests."""

import pytest

from locakd.distiller import DKD_METHODS, KD_METHODS, LOCA_METHODS, METHODS
from locakd.errors import ConfigError
from locakd.experiments.mnist1d import (
    DEFAULT_SETTING,
    DKD_FAMILY,
    KD_FAMILY,
    QUICK_SETTING,
    Mnist1dSetting,
    mnist1d_models,
    model_name,
    short_model,
    uncalibrated_method,
)
from locakd.training.image_config import load_image_config


def test_families_are_the_distillers():
    assert KD_FAMILY == KD_METHODS and DKD_FAMILY == DKD_METHODS
    # CE plus the two families are every method, each once.
    assert sorted(["ce", *KD_FAMILY, *DKD_FAMILY]) == sorted(METHODS)


def test_uncalibrated_method_stays_in_the_family():
    for method in METHODS:
        base = uncalibrated_method(method)
        assert base in METHODS and base not in LOCA_METHODS
        if method in LOCA_METHODS:
            assert base != method
            assert (base in KD_FAMILY) == (method in KD_FAMILY)
        else:
            assert base == method


@pytest.mark.parametrize("method", METHODS)
def test_student_overrides_make_a_valid_config_for_every_method(method, tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ov = DEFAULT_SETTING.student_overrides(
        "mlp_128", method, seed=3, teacher="cnn_8", teacher_checkpoint=ckpt, loca_alpha=0.8
    )
    cfg = load_image_config(None, ov)
    assert cfg.method.name == method and cfg.run.seed == 3
    assert cfg.student.name == "mnist1d_mlp_128"
    if method == "ce":
        assert cfg.method.ce_weight == 1.0
        return
    assert cfg.teacher.name == "mnist1d_cnn_8" and cfg.teacher.checkpoint == str(ckpt)
    assert cfg.method.temperature == DEFAULT_SETTING.temperature
    assert ("method.loca_alpha=0.8" in ov) == (method in LOCA_METHODS)
    if method in DKD_FAMILY:
        assert cfg.method.dkd_beta == DEFAULT_SETTING.dkd_beta
        assert cfg.method.warmup_epochs == DEFAULT_SETTING.dkd_warmup
    else:
        assert cfg.method.ce_weight == DEFAULT_SETTING.ce_weight
        assert cfg.method.kd_weight == DEFAULT_SETTING.kd_weight


def test_student_overrides_reject_bad_requests():
    with pytest.raises(ConfigError, match="unknown method"):
        DEFAULT_SETTING.student_overrides("mlp_128", "nope", seed=0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        DEFAULT_SETTING.student_overrides("mlp_128", "kd", seed=0)


def test_run_digests_change_only_with_what_a_run_depends_on():
    hotter = DEFAULT_SETTING.replace(temperature=8.0)
    # A teacher and a CE student do not depend on the KD temperature: their runs are shared.
    assert hotter.run_digest(None) == DEFAULT_SETTING.run_digest(None)
    assert hotter.run_digest("ce") == DEFAULT_SETTING.run_digest("ce")
    for method in [*KD_FAMILY, *DKD_FAMILY]:
        assert hotter.run_digest(method) != DEFAULT_SETTING.run_digest(method), method
    beta = DEFAULT_SETTING.replace(dkd_beta=8.0)
    for method in METHODS:
        assert (beta.run_digest(method) != DEFAULT_SETTING.run_digest(method)) == (method in DKD_FAMILY)
    noisier = DEFAULT_SETTING.replace(noise_std=0.5)
    assert noisier.run_digest(None) != DEFAULT_SETTING.run_digest(None)
    assert noisier.digest() != DEFAULT_SETTING.digest()


def test_specs_wire_a_student_to_its_teacher(tmp_path):
    teacher = QUICK_SETTING.teacher_spec("t", tmp_path / "t", "cnn_8")
    student = QUICK_SETTING.student_spec(
        "s", tmp_path / "s", "mlp_32", "dkd+loca", 1, teacher_spec=teacher, teacher="cnn_8"
    )
    assert student.after == "t" and student.meta["loca_alpha"] == QUICK_SETTING.loca_alpha
    assert f"teacher.checkpoint={tmp_path / 't' / 'last.pt'}" in student.overrides
    ce = QUICK_SETTING.student_spec("c", tmp_path / "c", "mlp_32", "ce", 1, teacher_spec=teacher)
    assert ce.after is None and not any(o.startswith("teacher.") for o in ce.overrides)


def test_settings_and_model_names():
    assert QUICK_SETTING.samples < DEFAULT_SETTING.samples and QUICK_SETTING.epochs < DEFAULT_SETTING.epochs
    assert DEFAULT_SETTING == Mnist1dSetting()
    assert model_name("cnn_8") == model_name("mnist1d_cnn_8") == "mnist1d_cnn_8"
    assert short_model("mnist1d_cnn_8") == short_model("cnn_8") == "cnn_8"
    models = mnist1d_models()
    assert models.index("cnn_8") < models.index("cnn_16") < models.index("cnn_64") < models.index("mlp_32")
    assert f"MNIST-1D {DEFAULT_SETTING.samples} samples" in DEFAULT_SETTING.describe()
