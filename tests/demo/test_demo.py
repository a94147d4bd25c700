"""``locakd demo`` end to end in a tiny configuration, and its reuse of finished runs."""

import json

from locakd.cli.main import build_parser, main
from locakd.demo import DEMO_METHODS, DEMO_SETTING, DEMO_TEACHER, QUICK_SETTING, DemoOptions
from locakd.distiller import LOCA_METHODS, METHODS
from locakd.experiments.mnist1d import uncalibrated_method

TINY = ["--quick", "--seeds", "1", "--workers", "1", "--samples", "200", "--epochs", "2", "--no-progress"]


def test_demo_help_explains_every_option(capsys):
    for action in _demo_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings


def _demo_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["demo"]


def test_demo_methods_and_help_follow_the_distiller():
    # CE, then every LoCa method right after the method it calibrates.
    assert DEMO_METHODS[0] == "ce" and len(set(DEMO_METHODS)) == len(DEMO_METHODS)
    assert set(DEMO_METHODS) <= set(METHODS)
    for loca in LOCA_METHODS:
        i = DEMO_METHODS.index(loca)
        assert DEMO_METHODS[i - 1] == uncalibrated_method(loca)
    methods_help = next(a.help for a in _demo_parser()._actions if a.dest == "methods")
    for method in METHODS:
        assert method in methods_help, method


def test_demo_options_resolve_the_setting():
    assert DemoOptions().setting() == DEMO_SETTING and DemoOptions(quick=True).setting() == QUICK_SETTING
    assert DemoOptions().n_seeds() == 3 and DemoOptions(quick=True).n_seeds() == 2
    assert DemoOptions(workers=1).n_workers() == 1 and 1 <= DemoOptions().n_workers() <= 2
    short = DemoOptions(epochs=4).setting()
    # --epochs sets the teacher's epochs too; a DKD warm-up longer than training is shortened.
    assert short.epochs == short.teacher_epochs == 4 and short.dkd_warmup == 1
    assert DemoOptions(epochs=6, teacher_epochs=9).setting().teacher_epochs == 9


def test_demo_tiny_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for method in DEMO_METHODS:
        assert method in printed
    assert f"teacher {DEMO_TEACHER}" in printed and "mis-instructs" in printed

    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(DEMO_METHODS)
    for method, m in results["methods"].items():
        assert m["n"] == 1, method
        run = m["runs"][0]
        assert 0.0 <= run["best_top1"] <= 100.0 and 0.0 <= run["last_top1"] <= 100.0
        assert run["best_top1"] >= run["last_top1"]
    assert results["teacher"]["test_top1_last"] is not None
    assert 0.0 <= results["teacher"]["misinstruction_rate_train_stream"] <= 1.0
    assert results["runs_total"] == 1 + len(DEMO_METHODS) and results["runs_reused"] == 0
    assert results["runs_failed"] == {}
    png = out / results["chart"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same out dir, same settings: the teacher (and every finished run) is reused, numbers identical.
    teacher_ckpt = next((out / "runs").rglob(f"teacher_{DEMO_TEACHER}/last.pt"))
    mtime = teacher_ckpt.stat().st_mtime_ns
    assert main(["demo", "--out", str(out), *TINY]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs_reused"] == again["runs_total"]
    assert teacher_ckpt.stat().st_mtime_ns == mtime
    assert (
        again["methods"]["kd+loca"]["runs"][0]["best_top1"]
        == results["methods"]["kd+loca"]["runs"][0]["best_top1"]
    )


def test_demo_rejects_bad_options(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "kd,nope", "--no-progress"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--teacher", "resnet20", "--no-progress"]) == 2
    assert "not an MNIST-1D model" in capsys.readouterr().err
