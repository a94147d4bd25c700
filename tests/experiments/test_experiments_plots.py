"""The demo's and the suite's charts are written as PNG files."""

import pytest

pytest.importorskip("matplotlib")

from locakd.experiments.plots import accuracy_bar_chart, alpha_sweep_plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_accuracy_bar_chart(tmp_path):
    path = accuracy_bar_chart(
        tmp_path / "sub" / "bars.png",
        ["ce", "kd", "kd+loca"],
        [(70.0, 1.0), (73.0, 1.5), (74.5, 0.4)],
        [(69.4, 1.2), (72.8, 1.5), (74.3, 0.7)],
        title="t",
        teacher_acc=74.2,
        n_seeds=3,
    )
    assert path.read_bytes()[:8] == PNG
    only_best = accuracy_bar_chart(tmp_path / "best.png", ["ce"], [(70.0, 0.0)])
    assert only_best.read_bytes()[:8] == PNG


def test_alpha_sweep_plot(tmp_path):
    path = alpha_sweep_plot(
        tmp_path / "sweep.png", [0.5, 0.9], [(72.0, 1.0), (73.0, 0.5)], kd=(72.5, 0.8), ce=(70.0, 1.0)
    )
    assert path.read_bytes()[:8] == PNG
    bare = alpha_sweep_plot(tmp_path / "bare.png", [0.9], [(73.0, 0.5)])
    assert bare.read_bytes()[:8] == PNG
