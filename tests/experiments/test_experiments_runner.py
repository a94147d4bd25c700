"""The job runner: reuse of finished runs, its safety checks, dependencies, worker processes."""

import pytest
import yaml

from locakd.errors import ConfigError
from locakd.experiments.mnist1d import Mnist1dSetting
from locakd.experiments.runner import RunResult, RunSpec, default_workers, finished_results, run_specs
from locakd.image.config import ImageExperimentConfig

TINY = Mnist1dSetting(samples=200, epochs=2, teacher_epochs=2, dkd_warmup=1)


def _tiny_teacher(tmp_path, **overrides):
    s = TINY.replace(**overrides)
    return s.teacher_spec("teacher", tmp_path / "teacher", "cnn_8")


def test_finished_run_with_other_config_is_an_error(tmp_path):
    results = run_specs([_tiny_teacher(tmp_path)], progress=False)
    assert results["teacher"].status == "ran"
    assert run_specs([_tiny_teacher(tmp_path)], progress=False)["teacher"].status == "skipped"
    with pytest.raises(ConfigError, match="different experiment"):
        run_specs([_tiny_teacher(tmp_path, teacher_epochs=3)], progress=False)
    # Reading finished runs back without training applies the same check.
    read = finished_results([_tiny_teacher(tmp_path)])
    assert read["teacher"].status == "skipped"
    assert read["teacher"].summary == results["teacher"].summary
    with pytest.raises(ConfigError, match="different experiment"):
        finished_results([_tiny_teacher(tmp_path, teacher_epochs=3)])
    # A run written before a key existed (here: optim.nesterov at its default) is still the same experiment.
    saved_path = tmp_path / "teacher" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    assert saved["optim"].pop("nesterov") is ImageExperimentConfig().optim.nesterov
    saved_path.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert finished_results([_tiny_teacher(tmp_path)])["teacher"].status == "skipped"


def test_failed_dependency_fails_its_dependents_without_running(tmp_path):
    overrides = (*TINY.teacher_overrides("cnn_8"), "student.name=no_such_model")
    bad = RunSpec("teacher", "train-teacher", str(tmp_path / "t"), overrides)
    student = TINY.student_spec("s", tmp_path / "s", "mlp_32", "kd", 0, teacher_spec=bad, teacher="cnn_8")
    ok = TINY.student_spec("c", tmp_path / "c", "mlp_32", "ce", 0)
    results = run_specs([bad, student, ok], progress=False)
    assert results["teacher"].status == "failed" and "no_such_model" in results["teacher"].error
    assert results["s"].status == "failed" and "dependency" in results["s"].error
    assert not (tmp_path / "s").exists()
    assert results["c"].status == "ran"
    # Only finished runs are read back; a failed run has no metrics.
    assert set(finished_results([bad, student, ok])) == {"c"}
    assert results["teacher"].metric("best_top1") is None
    assert results["c"].metric("best_top1") == results["c"].summary["best_top1"]


def test_run_result_metric():
    res = RunResult("k", "ran", {"best_top1": 71, "teacher": None}, 1.0)
    assert res.metric("best_top1") == 71.0 and isinstance(res.metric("best_top1"), float)
    assert res.metric("teacher") is None and res.metric("absent") is None
    assert RunResult("k", "failed", None, 0.0, error="boom").metric("best_top1") is None


def test_bad_specs_are_rejected_before_any_work(tmp_path):
    t = _tiny_teacher(tmp_path)
    with pytest.raises(ConfigError, match="duplicate run keys"):
        run_specs([t, t], progress=False)
    with pytest.raises(ConfigError, match="unknown run"):
        run_specs([RunSpec("s", "distill", str(tmp_path / "s"), t.overrides, after="nope")], progress=False)
    with pytest.raises(ConfigError, match="mode must be one of"):
        RunSpec("x", "train", str(tmp_path / "x"))
    assert not (tmp_path / "teacher").exists()


def test_default_workers_is_bounded():
    assert default_workers(1) == 1
    assert 1 <= default_workers() <= 2
    assert default_workers(0) == 1


@pytest.mark.slow
def test_worker_processes_run_and_report(tmp_path):
    """The default path of the demo and the suite: spawned workers, a teacher gating its student."""
    teacher = _tiny_teacher(tmp_path)
    student = TINY.student_spec(
        "s", tmp_path / "s", "mlp_32", "kd+loca", 0, teacher_spec=teacher, teacher="cnn_8"
    )
    seen = []
    results = run_specs([teacher, student], workers=2, progress=False, on_result=lambda r: seen.append(r.key))
    assert seen == ["teacher", "s"]
    assert results["s"].status == "ran" and results["s"].summary["teacher"] == "mnist1d_cnn_8"
    log = (tmp_path / "s" / "train.log").read_text()
    assert log.count("epoch") >= 2  # the trainer's console lines went to the run's log
