"""Mean +- std over seeds of finished runs, grouped by experiment.

Each run folder holds ``config.yaml`` (the resolved config) and, once finished,
``summary.json``. Runs are grouped by their whole config except the keys that do
not change the experiment (seed, output folder, device, logging, data location,
teacher checkpoint path), so two variants of one method (say two LoCa alphas) are
never averaged together; when a (pair, method) has several variants, the keys that
tell them apart are shown in the ``variant`` column.

The std is the sample standard deviation (n - 1 in the denominator; 0 for one run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import config_keys, flatten
from ..errors import DataError
from .config import ImageExperimentConfig

__all__ = [
    "GroupSummary",
    "RunRecord",
    "find_runs",
    "format_table",
    "groups_to_json",
    "load_run",
    "mean_std",
    "summarize_runs",
]


def _ignored_keys() -> frozenset[str]:
    """Config keys that do not define the experiment (they may differ between seeds of one group)."""
    return config_keys(ImageExperimentConfig, identity=("run", "none"))


@dataclass
class RunRecord:
    path: str
    config: dict[str, Any]  # flattened dotted keys
    summary: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)


@dataclass
class GroupSummary:
    dataset: str
    teacher: str
    student: str
    method: str
    variant: str
    n: int
    seeds: list[int]
    best_top1_mean: float
    best_top1_std: float
    last_top1_mean: float
    last_top1_std: float
    best_top5_mean: float
    last_top5_mean: float
    teacher_top1_mean: float | None
    misinstruction_rate_mean: float | None
    runs: list[str] = field(default_factory=list)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(finished run folders, unfinished run folders) under ``paths`` (each a run or a parent)."""
    finished: set[Path] = set()
    unfinished: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"run folder not found: {path}")
        if path.is_file():
            path = path.parent
        for cfg in [path / "config.yaml", *path.rglob("config.yaml")]:
            if not cfg.is_file():
                continue
            run = cfg.parent
            (finished if (run / "summary.json").is_file() else unfinished).add(run)
    return sorted(finished), sorted(unfinished)


def load_run(run_dir: str | Path) -> RunRecord:
    import yaml

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise DataError(f"run folder {run_dir}: cannot read summary.json / config.yaml ({err})") from None
    if not isinstance(summary, dict) or "best_top1" not in summary or "last_top1" not in summary:
        raise DataError(f"run folder {run_dir}: summary.json lacks best_top1 / last_top1")
    return RunRecord(str(run_dir), flatten(config), summary)


def _fmt_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def summarize_runs(records: list[RunRecord]) -> list[GroupSummary]:
    """Group ``records`` (see module doc) and compute mean +- std per group."""
    groups: dict[tuple, list[RunRecord]] = {}
    ignored = _ignored_keys()
    for rec in records:
        key = tuple(sorted((k, _fmt_value(v)) for k, v in rec.config.items() if k not in ignored))
        groups.setdefault(key, []).append(rec)

    def ident(rec: RunRecord) -> tuple[str, str, str, str]:
        return (
            str(rec.get("data.name", rec.summary.get("dataset", "?"))),
            str(rec.get("teacher.name", rec.summary.get("teacher", "")) or ""),
            str(rec.get("student.name", rec.summary.get("student", "?"))),
            str(rec.get("method.name", rec.summary.get("method", "?"))),
        )

    # Keys that differ between groups sharing one (dataset, teacher, student, method).
    by_ident: dict[tuple, list[tuple]] = {}
    for key, recs in groups.items():
        by_ident.setdefault(ident(recs[0]), []).append(key)
    out: list[GroupSummary] = []
    for key, recs in groups.items():
        siblings = by_ident[ident(recs[0])]
        variant = ""
        if len(siblings) > 1:
            mine = dict(key)
            sibling_dicts = [dict(other) for other in siblings]
            all_keys = set().union(*sibling_dicts)
            differing = sorted(k for k in all_keys if len({d.get(k) for d in sibling_dicts}) > 1)
            variant = ", ".join(f"{k}={mine.get(k, '-')}" for k in differing)
        best = mean_std(r.summary["best_top1"] for r in recs)
        last = mean_std(r.summary["last_top1"] for r in recs)
        teacher = [r.summary["teacher_top1"] for r in recs if r.summary.get("teacher_top1") is not None]
        mis = [
            r.summary["misinstruction_rate"] for r in recs if r.summary.get("misinstruction_rate") is not None
        ]
        dataset, teacher_name, student, method = ident(recs[0])
        out.append(
            GroupSummary(
                dataset=dataset,
                teacher=teacher_name,
                student=student,
                method=method,
                variant=variant,
                n=len(recs),
                seeds=sorted(int(r.get("run.seed", r.summary.get("seed", 0))) for r in recs),
                best_top1_mean=best[0],
                best_top1_std=best[1],
                last_top1_mean=last[0],
                last_top1_std=last[1],
                best_top5_mean=mean_std(r.summary.get("best_top5", math.nan) for r in recs)[0],
                last_top5_mean=mean_std(r.summary.get("last_top5", math.nan) for r in recs)[0],
                teacher_top1_mean=mean_std(teacher)[0] if teacher else None,
                misinstruction_rate_mean=mean_std(mis)[0] if mis else None,
                runs=sorted(r.path for r in recs),
            )
        )
    method_order = {"ce": 0, "kd": 1, "kd+loca": 2, "dkd": 3, "dkd+loca": 4}
    out.sort(
        key=lambda g: (g.dataset, g.teacher, g.student, method_order.get(g.method, 9), g.method, g.variant)
    )
    return out


def format_table(groups: list[GroupSummary]) -> str:
    """A plain-text table: one row per group."""
    header = [
        "dataset",
        "teacher -> student",
        "method",
        "variant",
        "n",
        "best top-1",
        "last top-1",
        "teacher",
        "mis-instr.",
    ]
    rows = [header]
    for g in groups:
        pair = f"{g.teacher} -> {g.student}" if g.teacher else g.student
        rows.append(
            [
                g.dataset,
                pair,
                g.method,
                g.variant or "-",
                str(g.n),
                f"{g.best_top1_mean:.2f} +- {g.best_top1_std:.2f}",
                f"{g.last_top1_mean:.2f} +- {g.last_top1_std:.2f}",
                "-" if g.teacher_top1_mean is None else f"{g.teacher_top1_mean:.2f}",
                "-" if g.misinstruction_rate_mean is None else f"{100 * g.misinstruction_rate_mean:.2f}%",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def groups_to_json(groups: list[GroupSummary]) -> list[dict[str, Any]]:
    return [asdict(g) for g in groups]
