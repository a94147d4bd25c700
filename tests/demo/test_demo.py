"""``locakd demo`` end to end in a tiny configuration, and its reuse of finished runs."""

import json

from locakd.cli.main import build_parser, main
from locakd.demo import DEMO_METHODS, DEMO_TEACHER

TINY = ["--quick", "--seeds", "1", "--workers", "1", "--samples", "200", "--epochs", "2", "--no-progress"]


def test_demo_help_explains_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["demo"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings


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
