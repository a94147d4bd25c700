"""``summarize``: mean +- std over seeds from fake run folders."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

from locakd.config import to_dict
from locakd.errors import DataError
from locakd.image.config import ImageExperimentConfig
from locakd.image.summarize import find_runs, format_table, load_run, mean_std, summarize_runs


def make_run(
    root, name, *, method="kd", seed=0, best, last, teacher="resnet56", student="resnet20", **config
):
    cfg = ImageExperimentConfig()
    cfg.method.name, cfg.run.seed, cfg.student.name, cfg.teacher.name = method, seed, student, teacher
    cfg.run.out_dir = str(root / name)
    for key, value in config.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    summary = {
        "best_top1": best,
        "last_top1": last,
        "best_top5": best + 20,
        "last_top5": last + 20,
        "teacher_top1": 72.0,
        "misinstruction_rate": 0.05,
        "seed": seed,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_groups_by_method_and_pair_with_sample_std(tmp_path):
    kd = [(70.1, 69.8), (70.5, 70.0), (71.0, 70.9)]
    for seed, (best, last) in enumerate(kd):
        make_run(
            tmp_path,
            f"r56_r20/kd/seed{seed}",
            method="kd",
            seed=seed,
            best=best,
            last=last,
            teacher__checkpoint=f"teachers/seed{seed}",
        )  # a different teacher file is still the same experiment
    make_run(tmp_path, "r56_r20/kdloca/seed0", method="kd+loca", seed=0, best=71.0, last=70.5)
    make_run(tmp_path, "r56_r20/kdloca/seed1", method="kd+loca", seed=1, best=72.0, last=71.5)
    make_run(
        tmp_path,
        "r110_r32/kd/seed0",
        method="kd",
        teacher="resnet110",
        student="resnet32",
        best=73.0,
        last=72.0,
    )
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("{}")

    finished, unfinished = find_runs([tmp_path])
    assert len(finished) == 6 and unfinished == [tmp_path / "unfinished"]
    groups = summarize_runs([load_run(r) for r in finished])
    by = {(g.teacher, g.method): g for g in groups}
    g = by[("resnet56", "kd")]
    assert g.n == 3 and g.seeds == [0, 1, 2]
    assert g.best_top1_mean == pytest.approx(statistics.mean(b for b, _ in kd))
    assert g.best_top1_std == pytest.approx(statistics.stdev(b for b, _ in kd))
    assert g.last_top1_mean == pytest.approx(statistics.mean(v for _, v in kd))
    assert g.last_top1_std == pytest.approx(statistics.stdev(v for _, v in kd))
    assert g.teacher_top1_mean == 72.0 and g.misinstruction_rate_mean == pytest.approx(0.05)
    loca = by[("resnet56", "kd+loca")]
    assert (loca.n, loca.best_top1_mean, loca.last_top1_mean) == (2, 71.5, 71.0)
    assert loca.best_top1_std == pytest.approx(math.sqrt(0.5))
    assert by[("resnet110", "kd")].n == 1 and by[("resnet110", "kd")].best_top1_std == 0.0
    table = format_table(groups)
    assert "resnet56 -> resnet20" in table and "70.53 +- 0.45" in table and "71.50 +- 0.71" in table


def test_variants_are_kept_apart(tmp_path):
    make_run(tmp_path, "a0", method="kd+loca", seed=0, best=70.0, last=70.0, method__loca_alpha=0.9)
    make_run(tmp_path, "a1", method="kd+loca", seed=1, best=72.0, last=72.0, method__loca_alpha=0.9)
    make_run(tmp_path, "b0", method="kd+loca", seed=0, best=60.0, last=60.0, method__loca_alpha=0.5)
    groups = summarize_runs([load_run(r) for r in find_runs([tmp_path])[0]])
    assert sorted((g.variant, g.n, g.best_top1_mean) for g in groups) == [
        ("method.loca_alpha=0.5", 1, 60.0),
        ("method.loca_alpha=0.9", 2, 71.0),
    ]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="run folder not found"):
        find_runs([tmp_path / "missing"])
    run = tmp_path / "bad"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read summary.json"):
        load_run(run)
