"""The MNIST-1D suite: planning, resumability (second call skips finished runs), the runner's safety checks."""

import json

import pytest

from locakd.benchmarks.mnist1d_suite import build_parser, build_plan, run_suite
from locakd.errors import ConfigError
from locakd.experiments.mnist1d import Mnist1dSetting
from locakd.experiments.runner import RunSpec, run_specs

TINY = Mnist1dSetting(samples=200, epochs=2, teacher_epochs=2, dkd_warmup=1)


def test_suite_help_explains_every_option():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings


def test_default_plan_covers_the_brief():
    plan = build_plan("/nonexistent/out")
    assert len(plan.main) >= 3 and len(plan.seeds) >= 5
    for variants in plan.main.values():
        assert {
            "ce",
            "kd",
            "kd+loca@0.9",
            "kd+loca@0.95",
            "dkd",
            "dkd+loca@0.9",
            "ka_shift",
            "ka_smooth",
            "skip",
        } <= set(variants)
    assert plan.sweep["alphas"] == [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert set(plan.grid["parts"]) == {"regime", "kd_hparams", "epochs", "dkd_beta"}
    # Runs shared between parts are planned once (CE per student; alpha 0.9 / 0.95 of the sweep).
    keys = list(plan.specs)
    assert len(keys) == len(set(keys))
    sweep_pair = plan.sweep["pair"]
    assert plan.sweep["loca"][0.9] == plan.main[sweep_pair]["kd+loca@0.9"]
    assert plan.main["cross_family"]["ce"] == plan.main["weak_teacher"]["ce"]
    # Grid seeds never overlap the comparison seeds.
    assert not set(plan.grid_seeds) & set(plan.seeds)
    # Teachers are scheduled first.
    modes = [s.mode for s in plan.specs.values()]
    assert modes.index("distill") > max(i for i, m in enumerate(modes) if m == "train-teacher")


def test_suite_is_resumable(tmp_path, monkeypatch):
    import locakd.benchmarks.mnist1d_suite as suite

    monkeypatch.setattr(suite, "QUICK_SETTING", TINY)
    kwargs = dict(pairs=["weak_teacher"], seeds=2, variants=["ce", "kd", "kd+loca@0.9"], quick=True)
    plan = build_plan(tmp_path, sweep_pair=None, grid_pair=None, **kwargs)
    assert len(plan.specs) == 1 + 3 * 2
    first = run_suite(plan, workers=1, progress=False)
    assert first["runs_by_status"] == {"ran": 7} and not first["failed"]
    pair = first["pairs"]["weak_teacher"]
    assert {c["a"] + " - " + c["b"] for c in pair["paired"]} == {"kd+loca@0.9 - kd", "kd - ce"}
    assert (tmp_path / "tables.md").read_text().count("weak_teacher") >= 3
    assert (tmp_path / "pair_weak_teacher.png").read_bytes()[:4] == b"\x89PNG"

    # Second call: every run is read back, nothing is trained, the numbers are the same.
    plan2 = build_plan(tmp_path, sweep_pair=None, grid_pair=None, **kwargs)
    second = run_suite(plan2, workers=1, progress=False)
    assert second["runs_by_status"] == {"skipped": 7}
    assert json.loads(json.dumps(second["pairs"])) == json.loads(json.dumps(first["pairs"]))


def _tiny_teacher(tmp_path, **overrides):
    s = TINY.replace(**overrides)
    return s.teacher_spec("teacher", tmp_path / "teacher", "cnn_8")


def test_finished_run_with_other_config_is_an_error(tmp_path):
    results = run_specs([_tiny_teacher(tmp_path)], progress=False)
    assert results["teacher"].status == "ran"
    assert run_specs([_tiny_teacher(tmp_path)], progress=False)["teacher"].status == "skipped"
    with pytest.raises(ConfigError, match="different experiment"):
        run_specs([_tiny_teacher(tmp_path, teacher_epochs=3)], progress=False)


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
