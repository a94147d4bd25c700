"""The MNIST-1D suite program (benchmarks/mnist1d/suite.py): planning, resumability, its scripts.

The suite is not part of the package, so it is imported by path.
"""

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from locakd.distiller import LOCA_METHODS, METHODS
from locakd.experiments.mnist1d import Mnist1dSetting

SUITE_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "mnist1d"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


suite = _load("mnist1d_suite_under_test", SUITE_DIR / "suite.py")
build_parser, build_plan, run_suite = suite.build_parser, suite.build_plan, suite.run_suite

TINY = Mnist1dSetting(samples=200, epochs=2, teacher_epochs=2, dkd_warmup=1)


def test_suite_help_explains_every_option():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings


def test_variants_and_comparisons_follow_the_distiller():
    # Every Distiller method is benchmarked, in the Distiller's order; LoCa methods once per alpha.
    assert list(dict.fromkeys(v.method for v in suite.VARIANTS)) == list(METHODS)
    for v in suite.VARIANTS:
        assert (v.alpha is not None) == (v.method in LOCA_METHODS), v
    # With today's methods that is the documented comparison (BENCHMARKS_mnist1d.md: 4 pairs x 7).
    assert suite.COMPARISONS == (
        ("kd+loca@0.9", "kd"),
        ("kd+loca@0.95", "kd"),
        ("dkd+loca@0.9", "dkd"),
        ("kd", "ce"),
        ("dkd", "ce"),
        ("kd+loca@0.9", "ka_shift"),
        ("kd+loca@0.9", "skip"),
    )
    names = {v.name for v in suite.VARIANTS}
    assert all(a in names and b in names for a, b in suite.COMPARISONS)


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

    # --report-only: reads the same runs back, trains nothing.
    third = run_suite(plan2, workers=1, progress=False, train=False)
    assert third["runs_by_status"] == {"skipped": 7} and third["report_only"]
    assert json.loads(json.dumps(third["pairs"])) == json.loads(json.dumps(first["pairs"]))


def test_documented_entry_point_runs_from_the_repository_root():
    """``python benchmarks/mnist1d/run_suite.py`` (the command in BENCHMARKS_mnist1d.md) finds the suite."""
    root = SUITE_DIR.parents[1]
    done = subprocess.run(
        [sys.executable, "benchmarks/mnist1d/run_suite.py", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--report-only" in done.stdout and "weak_teacher" in done.stdout


def test_make_report_finds_the_suite_and_names_a_missing_run_folder(tmp_path):
    report = _load("mnist1d_make_report_under_test", SUITE_DIR / "make_report.py")
    with pytest.raises(FileNotFoundError, match="tables.md"):
        report.main(["--suite", str(tmp_path / "no_suite"), "--demo", str(tmp_path / "no_demo")])


@pytest.mark.parametrize("program", ["suite.py", "make_report.py", "run_suite.py"])
def test_programs_use_only_public_names_of_locakd(program):
    for node in ast.walk(ast.parse((SUITE_DIR / program).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "locakd":
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert not alias.name.startswith("_"), (node.module, alias.name)
                assert alias.name in getattr(module, "__all__", [alias.name]), (node.module, alias.name)
