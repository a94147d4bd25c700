"""The MNIST-1D benchmark suite: KD, KD+LoCa, DKD, DKD+LoCa and baselines on several pairs, on CPU.

Run it with ``python benchmarks/mnist1d/run_suite.py --out bench_out/mnist1d`` (``--help`` lists
every option). Nothing is downloaded: MNIST-1D is generated locally, teachers are trained by
the suite and kept in its output folder. Every run is a call of the project's image trainer
(:mod:`locakd.image.trainer`) with a config built by
:class:`~locakd.experiments.mnist1d.Mnist1dSetting`, scheduled by
:func:`~locakd.experiments.runner.run_specs`; this program only plans the runs and aggregates
them. It is not part of the library and uses only public names of ``locakd``.

Parts (all in the regime of :data:`MAIN_SETTING` unless stated):

1. **main**: for every pair in :data:`PAIRS`, every method variant of :data:`VARIANTS` (every
   method of :data:`locakd.distiller.METHODS`, the LoCa ones at one or two alphas) over
   seeds 0..N-1. A seed fixes the student's initial weights, data order and input noise,
   identically for every method, so methods are compared **paired by seed**; the CE runs of
   one student are shared by the pairs that have that student.
2. **sweep**: KD+LoCa for alpha in :data:`SWEEP_ALPHAS` on one pair (the alpha 0.9 / 0.95
   runs of part 1 are reused), plotted against alpha with KD and CE for reference.
3. **grid** (on one pair, seeds 100.. so that it never shares runs with the comparison):
   (a) the data regime -- samples x input noise, CE vs KD; (b) KD temperature x loss
   weights; (c) epochs, CE vs KD; (d) the DKD NCKD weight beta. It documents where
   distillation helps and that the KD setting used in part 1 is a fair one.

Resumable: a run whose folder holds ``summary.json`` is not run again (an interrupted one is
resumed from ``last.pt``), so the command can be repeated or extended (more seeds, more pairs).
Outputs in ``--out``: ``results.json`` (everything), ``tables.md`` (the markdown tables),
``alpha_sweep.png``, ``pair_<name>.png`` per pair, and the run folders under ``runs/`` and
``teachers/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locakd.distiller import LOCA_METHODS, METHODS
from locakd.engine.io import atomic_write_text
from locakd.errors import ConfigError, LocakdError
from locakd.experiments.machine import cpu_seconds, load_average, machine_info
from locakd.experiments.mnist1d import (
    DEFAULT_SETTING,
    KD_FAMILY,
    QUICK_SETTING,
    Mnist1dSetting,
    model_name,
    short_model,
    uncalibrated_method,
)
from locakd.experiments.plots import accuracy_bar_chart, alpha_sweep_plot
from locakd.experiments.runner import RunResult, RunSpec, default_workers, finished_results, run_specs
from locakd.experiments.stats import mean_std, paired_by_seed

__all__ = [
    "MAIN_SETTING",
    "PAIRS",
    "QUICK_SETTING",
    "SWEEP_ALPHAS",
    "VARIANTS",
    "Pair",
    "SuitePlan",
    "Variant",
    "build_plan",
    "main",
    "run_suite",
]


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    about: str


PAIRS: dict[str, Pair] = {
    "same_family": Pair("cnn_64", "cnn_16", "same family: wide CNN teacher -> narrow CNN student"),
    "cross_family": Pair("cnn_64", "mlp_128", "cross family: CNN teacher -> MLP student"),
    "mid_teacher": Pair("cnn_16", "mlp_128", "medium teacher -> MLP student"),
    "weak_teacher": Pair(
        "cnn_8",
        "mlp_128",
        "weak teacher with a high mis-instruction rate -> MLP student (the `locakd demo` pair)",
    ),
}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    alpha: float | None = None


MAIN_SETTING = DEFAULT_SETTING
SWEEP_ALPHAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
GRID_SEED_BASE = 100
# LoCa alphas of the main comparison: the setting's alpha for every LoCa method, and 0.95 too
# for the KD-family one (the neighbour of 0.9 in the sweep, paired on every pair).
MAIN_ALPHAS = {"kd_family": (MAIN_SETTING.loca_alpha, 0.95), "dkd_family": (MAIN_SETTING.loca_alpha,)}
# KD-family baselines that KD+LoCa is compared with head to head on every pair.
HEAD_TO_HEAD = ("ka_shift", "skip")


def _variants() -> tuple[Variant, ...]:
    """Every method of the Distiller, in its order; LoCa methods once per alpha of :data:`MAIN_ALPHAS`."""
    out = []
    for method in METHODS:
        if method not in LOCA_METHODS:
            out.append(Variant(method, method))
            continue
        alphas = MAIN_ALPHAS["kd_family" if method in KD_FAMILY else "dkd_family"]
        out += [Variant(f"{method}@{a:g}", method, a) for a in alphas]
    return tuple(out)


VARIANTS: tuple[Variant, ...] = _variants()


def _comparisons() -> tuple[tuple[str, str], ...]:
    """Paired comparisons reported per pair, ``(a, b)`` meaning "a - b".

    Every LoCa variant against the method it calibrates, those methods against CE, and the
    main KD+LoCa variant against :data:`HEAD_TO_HEAD`.
    """
    loca = [v for v in VARIANTS if v.method in LOCA_METHODS]
    main_kd_loca = next(v.name for v in loca if v.method in KD_FAMILY and v.alpha == MAIN_SETTING.loca_alpha)
    return (
        *((v.name, uncalibrated_method(v.method)) for v in loca),
        *((uncalibrated_method(m), "ce") for m in LOCA_METHODS),
        *((main_kd_loca, baseline) for baseline in HEAD_TO_HEAD if baseline in KD_FAMILY),
    )


COMPARISONS: tuple[tuple[str, str], ...] = _comparisons()


# --------------------------------------------------------------------------- planning


@dataclass
class SuitePlan:
    """All runs of one suite invocation plus what each part needs to aggregate them."""

    out: Path
    setting: Mnist1dSetting
    specs: dict[str, RunSpec]  # key -> spec, in scheduling order (teachers first)
    main: dict[str, dict[str, dict[int, str]]]  # pair -> variant -> seed -> key
    teachers: dict[str, str]  # pair -> teacher key
    sweep: dict[str, Any] | None
    grid: dict[str, Any] | None
    seeds: list[int]
    grid_seeds: list[int]


class _Builder:
    def __init__(self, out: Path, device: str) -> None:
        self.out, self.device = out, device
        self.cache = out / "data_cache"
        self.specs: dict[str, RunSpec] = {}

    def _add(self, spec: RunSpec) -> str:
        old = self.specs.get(spec.key)
        if old is None:
            self.specs[spec.key] = spec
        elif old.overrides != spec.overrides:  # pragma: no cover - a planning bug
            raise ConfigError(f"two different runs got the key {spec.key}")
        return spec.key

    def teacher(self, setting: Mnist1dSetting, model: str) -> RunSpec:
        model = short_model(model_name(model))
        key = f"teachers/{model}/{setting.run_digest(None)}"
        spec = self.specs.get(key) or setting.teacher_spec(
            key, self.out / key, model, cache_dir=self.cache, device=self.device
        )
        self._add(spec)
        return spec

    def student(
        self,
        setting: Mnist1dSetting,
        teacher: str,
        student: str,
        method: str,
        seed: int,
        alpha: float | None = None,
    ) -> str:
        teacher, student = short_model(model_name(teacher)), short_model(model_name(student))
        t_spec = None if method == "ce" else self.teacher(setting, teacher)
        alpha = (setting.loca_alpha if alpha is None else alpha) if method in LOCA_METHODS else None
        name = method.replace("+", "_") + (f"_a{alpha:g}" if alpha is not None else "")
        who = student if method == "ce" else f"{teacher}-{student}"
        key = f"runs/{who}/{name}/{setting.run_digest(method)}/seed{seed}"
        if key in self.specs:
            return key
        spec = setting.student_spec(
            key,
            self.out / key,
            student,
            method,
            seed,
            teacher_spec=t_spec,
            teacher=teacher,
            cache_dir=self.cache,
            device=self.device,
            loca_alpha=alpha,
        )
        return self._add(spec)


def _grid_settings(base: Mnist1dSetting, quick: bool) -> dict[str, Any]:
    """The regime grid (see the module doc); each entry: (label, setting, methods)."""
    if quick:
        samples, noises = (base.samples,), (0.0, base.noise_std)
        temps, weights, epochs, betas = (
            (2.0, 4.0),
            ((0.1, 0.9), (0.5, 0.5)),
            (base.epochs, 2 * base.epochs),
            (2.0, 8.0),
        )
    else:
        samples, noises = (2000, base.samples), (0.0, base.noise_std)
        temps, weights = (1.0, 2.0, 4.0, 8.0), ((0.1, 0.9), (0.5, 0.5))
        epochs, betas = (15, base.epochs, 60), (1.0, 2.0, 8.0)
    return {
        "regime": [
            (f"samples={n}, noise={s:g}", base.replace(samples=n, noise_std=s), ("ce", "kd"))
            for n in samples
            for s in noises
        ],
        "kd_hparams": [
            (
                f"T={t:g}, CE/KD={w[0]:g}/{w[1]:g}",
                base.replace(temperature=t, ce_weight=w[0], kd_weight=w[1]),
                ("kd",),
            )
            for t in temps
            for w in weights
        ],
        "epochs": [(f"epochs={e}", base.replace(epochs=e), ("ce", "kd")) for e in epochs],
        "dkd_beta": [(f"beta={b:g}", base.replace(dkd_beta=b), ("dkd",)) for b in betas],
    }


def build_plan(
    out: str | Path,
    *,
    pairs: Sequence[str] = tuple(PAIRS),
    seeds: int = 5,
    variants: Sequence[str] | None = None,
    quick: bool = False,
    sweep_pair: str | None = "weak_teacher",
    alphas: Sequence[float] = SWEEP_ALPHAS,
    grid_pair: str | None = "cross_family",
    grid_seeds: int = 3,
    device: str = "cpu",
) -> SuitePlan:
    out = Path(out).expanduser()
    setting = QUICK_SETTING if quick else MAIN_SETTING
    for name in [*pairs, *(p for p in (sweep_pair, grid_pair) if p)]:
        if name not in PAIRS:
            raise ConfigError(f"unknown pair {name!r}; choose from {', '.join(PAIRS)}")
    if seeds < 1 or (grid_pair and grid_seeds < 1):
        raise ConfigError("--seeds and --grid-seeds must be >= 1")
    known = {v.name: v for v in VARIANTS}
    if variants is None:
        chosen = list(VARIANTS)
    else:
        chosen = []
        for name in variants:
            matches = [v for v in VARIANTS if v.name == name or v.method == name]
            if not matches:
                raise ConfigError(
                    f"unknown method {name!r}; choose from {', '.join(known)} (or a method name)"
                )
            chosen += [v for v in matches if v not in chosen]
        chosen.sort(key=VARIANTS.index)
    for a in alphas:
        if not 0.0 < a < 1.0:
            raise ConfigError(f"alpha must lie in (0, 1), got {a}")

    b = _Builder(out, device)
    seed_list = list(range(seeds))
    grid_seed_list = [GRID_SEED_BASE + i for i in range(grid_seeds)]
    # Teachers first (they gate everything else), then CE runs (no teacher needed), then the rest.
    teachers = {p: b.teacher(setting, PAIRS[p].teacher).key for p in pairs}
    if sweep_pair:
        b.teacher(setting, PAIRS[sweep_pair].teacher)
    grid_defs = _grid_settings(setting, quick) if grid_pair else None
    if grid_defs:
        for part in grid_defs.values():
            for _, s, _ in part:
                b.teacher(s, PAIRS[grid_pair].teacher)
    main: dict[str, dict[str, dict[int, str]]] = {p: {} for p in pairs}
    for wanted_ce in (True, False):
        for p in pairs:
            pair = PAIRS[p]
            for v in chosen:
                if (v.method == "ce") != wanted_ce:
                    continue
                main[p][v.name] = {
                    s: b.student(setting, pair.teacher, pair.student, v.method, s, v.alpha) for s in seed_list
                }
    sweep = None
    if sweep_pair:
        pair = PAIRS[sweep_pair]
        sweep = {
            "pair": sweep_pair,
            "alphas": list(alphas),
            "loca": {
                a: {s: b.student(setting, pair.teacher, pair.student, "kd+loca", s, a) for s in seed_list}
                for a in alphas
            },
            "kd": {s: b.student(setting, pair.teacher, pair.student, "kd", s) for s in seed_list},
            "ce": {s: b.student(setting, pair.teacher, pair.student, "ce", s) for s in seed_list},
        }
    grid = None
    if grid_defs:
        pair = PAIRS[grid_pair]
        grid = {"pair": grid_pair, "seeds": grid_seed_list, "parts": {}}
        for part, entries in grid_defs.items():
            rows = []
            for label, s, methods in entries:
                row = {
                    "label": label,
                    "setting": s.to_dict(),
                    "teacher": b.teacher(s, pair.teacher).key,
                    "runs": {
                        m: {sd: b.student(s, pair.teacher, pair.student, m, sd) for sd in grid_seed_list}
                        for m in methods
                    },
                }
                # A CE reference (paired by seed) for rows that have none of their own.
                if "ce" not in methods:
                    row["runs"]["ce"] = {
                        sd: b.student(s, pair.teacher, pair.student, "ce", sd) for sd in grid_seed_list
                    }
                rows.append(row)
            grid["parts"][part] = rows
    # Scheduling order: teachers, then CE runs, then everything else in planning order.
    ordered = sorted(
        b.specs.values(),
        key=lambda sp: 0 if sp.mode == "train-teacher" else (1 if sp.meta.get("method") == "ce" else 2),
    )
    return SuitePlan(
        out=out,
        setting=setting,
        specs={sp.key: sp for sp in ordered},
        main=main,
        teachers=teachers,
        sweep=sweep,
        grid=grid,
        seeds=seed_list,
        grid_seeds=grid_seed_list,
    )


# --------------------------------------------------------------------------- aggregation


def _metric(results: dict[str, RunResult], key: str, metric: str) -> float | None:
    r = results.get(key)
    return None if r is None else r.metric(metric)


def _stats(results, keys: dict[int, str], metric: str) -> dict[str, Any]:
    values = {s: _metric(results, k, metric) for s, k in keys.items()}
    ok = {s: v for s, v in values.items() if v is not None}
    m, sd = mean_std(ok.values())
    return {"n": len(ok), "mean": m, "std": sd, "per_seed": ok}


def _paired(results, a: dict[int, str], b: dict[int, str], metric: str) -> dict[str, Any] | None:
    va = {s: _metric(results, k, metric) for s, k in a.items()}
    vb = {s: _metric(results, k, metric) for s, k in b.items()}
    return paired_by_seed(va, vb)


def _teacher_info(results, teacher_key: str, student_runs: list[str]) -> dict[str, Any]:
    mis = [_metric(results, k, "misinstruction_rate") for k in student_runs]
    mis = [m for m in mis if m is not None]
    return {
        "run": teacher_key,
        "test_top1": _metric(results, teacher_key, "last_top1"),
        "misinstruction_rate": mean_std(mis)[0] if mis else None,
        "misinstruction_rate_std": mean_std(mis)[1] if mis else None,
        "wall_time_s": _metric(results, teacher_key, "wall_time_s"),
    }


def aggregate(plan: SuitePlan, results: dict[str, RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": {}}
    for p, variants in plan.main.items():
        pair = PAIRS[p]
        kd_like = [k for v, keys in variants.items() if v != "ce" for k in keys.values()]
        entry: dict[str, Any] = {
            "teacher": pair.teacher,
            "student": pair.student,
            "about": pair.about,
            "teacher_info": _teacher_info(results, plan.teachers[p], kd_like),
            "variants": {
                v: {"best": _stats(results, keys, "best_top1"), "last": _stats(results, keys, "last_top1")}
                for v, keys in variants.items()
            },
            "paired": [],
        }
        for a, b in COMPARISONS:
            if a in variants and b in variants:
                for metric in ("best_top1", "last_top1"):
                    ci = _paired(results, variants[a], variants[b], metric)
                    if ci is not None:
                        entry["paired"].append({"a": a, "b": b, "metric": metric, **ci})
        out["pairs"][p] = entry
    if plan.sweep:
        sw = plan.sweep
        pair = PAIRS[sw["pair"]]
        out["sweep"] = {
            "pair": sw["pair"],
            "teacher": pair.teacher,
            "student": pair.student,
            "alphas": sw["alphas"],
            "loca": {
                str(a): {
                    "best": _stats(results, keys, "best_top1"),
                    "last": _stats(results, keys, "last_top1"),
                    "vs_kd_best": _paired(results, keys, sw["kd"], "best_top1"),
                }
                for a, keys in sw["loca"].items()
            },
            "kd": {
                "best": _stats(results, sw["kd"], "best_top1"),
                "last": _stats(results, sw["kd"], "last_top1"),
            },
            "ce": {
                "best": _stats(results, sw["ce"], "best_top1"),
                "last": _stats(results, sw["ce"], "last_top1"),
            },
        }
    if plan.grid:
        g = plan.grid
        parts: dict[str, Any] = {}
        for part, rows in g["parts"].items():
            agg_rows = []
            for row in rows:
                runs = row["runs"]
                kd_runs = [k for m, keys in runs.items() if m != "ce" for k in keys.values()]
                item: dict[str, Any] = {
                    "label": row["label"],
                    "setting": row["setting"],
                    "teacher_info": _teacher_info(results, row["teacher"], kd_runs),
                    "methods": {
                        m: {
                            "best": _stats(results, keys, "best_top1"),
                            "last": _stats(results, keys, "last_top1"),
                        }
                        for m, keys in runs.items()
                    },
                }
                for m in runs:
                    if m != "ce":
                        item[f"{m}_minus_ce_best"] = _paired(results, runs[m], runs["ce"], "best_top1")
                agg_rows.append(item)
            parts[part] = agg_rows
        out["grid"] = {
            "pair": g["pair"],
            "teacher": PAIRS[g["pair"]].teacher,
            "student": PAIRS[g["pair"]].student,
            "seeds": g["seeds"],
            "parts": parts,
        }
    return out


# --------------------------------------------------------------------------- reporting


def _pm(stats: dict[str, Any]) -> str:
    if not stats or stats["n"] == 0:
        return "-"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def _ci(ci: dict[str, Any] | None) -> str:
    if ci is None:
        return "-"
    if ci["n"] < 2:
        return f"{ci['mean_diff']:+.2f} (n=1)"
    return f"{ci['mean_diff']:+.2f} [{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_tables(agg: dict[str, Any], n_seeds: int) -> str:
    """Markdown tables of everything in ``agg`` (the numbers as computed, nothing edited)."""
    lines: list[str] = []
    pairs = agg.get("pairs", {})
    if pairs:
        lines += [
            "### Teachers",
            "",
            "| pair | teacher -> student | teacher test top-1 | teacher mis-instruction rate (training stream) |",
            "|---|---|---|---|",
        ]
        for p, e in pairs.items():
            t = e["teacher_info"]
            lines.append(
                f"| {p} | {e['teacher']} -> {e['student']} | {_acc(t['test_top1'])} | {_pct(t['misinstruction_rate'])} |"
            )
        lines.append("")
        variants = [v.name for v in VARIANTS if any(v.name in e["variants"] for e in pairs.values())]
        for metric, title in (("best", "best-epoch"), ("last", "last-epoch")):
            lines += [
                f"### Student test top-1 (%), {title}, mean ± std over seeds",
                "",
                "| method | "
                + " | ".join(f"{p} ({e['teacher']} -> {e['student']})" for p, e in pairs.items())
                + " |",
                "|---|" + "---|" * len(pairs),
            ]
            for v in variants:
                cells = [_pm(e["variants"][v][metric]) if v in e["variants"] else "-" for e in pairs.values()]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
            ns = sorted({e["variants"][v][metric]["n"] for e in pairs.values() for v in e["variants"]})
            lines += ["", f"(seeds per cell: {', '.join(map(str, ns))})", ""]
        lines += [
            "### Paired differences (a - b, same seeds), percentage points, 95% t-interval",
            "",
            "| pair | a - b | metric | n | mean diff [95% CI] | a higher in |",
            "|---|---|---|---|---|---|",
        ]
        for p, e in pairs.items():
            for c in e["paired"]:
                lines.append(
                    f"| {p} | {c['a']} - {c['b']} | {c['metric'].replace('_top1', '')} | {c['n']} | {_ci(c)} | {c['wins']}/{c['n']} |"
                )
        lines.append("")
    sw = agg.get("sweep")
    if sw:
        lines += [
            f"### LoCa alpha sweep: {sw['pair']} ({sw['teacher']} -> {sw['student']})",
            "",
            "| alpha | best top-1 | last top-1 | kd+loca - kd (best) [95% CI] |",
            "|---|---|---|---|",
        ]
        for a in sw["alphas"]:
            e = sw["loca"][str(a)]
            lines.append(f"| {a:g} | {_pm(e['best'])} | {_pm(e['last'])} | {_ci(e['vs_kd_best'])} |")
        lines.append(f"| KD (reference) | {_pm(sw['kd']['best'])} | {_pm(sw['kd']['last'])} | |")
        lines.append(f"| CE (reference) | {_pm(sw['ce']['best'])} | {_pm(sw['ce']['last'])} | |")
        lines.append("")
    g = agg.get("grid")
    if g:
        lines += [
            f"### KD-regime grid on {g['pair']} ({g['teacher']} -> {g['student']}), seeds {g['seeds']}",
            "",
        ]
        titles = {
            "regime": "(a) data regime: CE vs KD (KD at the main setting)",
            "kd_hparams": "(b) KD temperature and loss weights",
            "epochs": "(c) training length",
            "dkd_beta": "(d) DKD beta (NCKD weight)",
        }
        for part, rows in g["parts"].items():
            methods = sorted({m for r in rows for m in r["methods"]}, key=lambda m: (m != "ce", m))
            diffs = [m for m in methods if m != "ce"]
            lines += [
                f"#### {titles.get(part, part)}",
                "",
                "| setting | teacher top-1 | mis-instr. | "
                + " | ".join(f"{m} best" for m in methods)
                + " | "
                + " | ".join(f"{m} - ce [95% CI]" for m in diffs)
                + " |",
                "|---|---|---|" + "---|" * (len(methods) + len(diffs)),
            ]
            for r in rows:
                t = r["teacher_info"]
                cells = [_pm(r["methods"][m]["best"]) for m in methods]
                dcells = [_ci(r.get(f"{m}_minus_ce_best")) for m in diffs]
                lines.append(
                    f"| {r['label']} | {_acc(t['test_top1'])} | {_pct(t['misinstruction_rate'])} | "
                    + " | ".join(cells)
                    + " | "
                    + " | ".join(dcells)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def _plots(plan: SuitePlan, agg: dict[str, Any]) -> dict[str, str]:
    made: dict[str, str] = {}
    for p, e in agg.get("pairs", {}).items():
        names = [v for v in e["variants"] if e["variants"][v]["best"]["n"] > 0]
        if not names:
            continue
        path = accuracy_bar_chart(
            plan.out / f"pair_{p}.png",
            names,
            [(e["variants"][v]["best"]["mean"], e["variants"][v]["best"]["std"]) for v in names],
            [(e["variants"][v]["last"]["mean"], e["variants"][v]["last"]["std"]) for v in names],
            title=f"MNIST-1D {p}: {e['teacher']} -> {e['student']}",
            teacher_acc=e["teacher_info"]["test_top1"],
            n_seeds=len(plan.seeds),
        )
        made[f"pair_{p}"] = str(path)
    sw = agg.get("sweep")
    if sw and all(sw["loca"][str(a)]["best"]["n"] > 0 for a in sw["alphas"]):
        kd, ce = sw["kd"]["best"], sw["ce"]["best"]
        path = alpha_sweep_plot(
            plan.out / "alpha_sweep.png",
            sw["alphas"],
            [(sw["loca"][str(a)]["best"]["mean"], sw["loca"][str(a)]["best"]["std"]) for a in sw["alphas"]],
            kd=(kd["mean"], kd["std"]) if kd["n"] else None,
            ce=(ce["mean"], ce["std"]) if ce["n"] else None,
            title=f"MNIST-1D {sw['pair']}: {sw['teacher']} -> {sw['student']}, KD+LoCa vs alpha",
            n_seeds=len(plan.seeds),
        )
        made["alpha_sweep"] = str(path)
    return made


# --------------------------------------------------------------------------- entry points


def run_suite(
    plan: SuitePlan,
    *,
    workers: int = 2,
    progress: bool = True,
    train: bool = True,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``train=False``, only read) every run of ``plan``; write results.json, tables.md, plots."""
    plan.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    t0, cpu0 = time.time(), cpu_seconds()
    specs = list(plan.specs.values())
    if train:
        results = run_specs(specs, workers=workers, progress=progress, desc="mnist1d suite")
    else:
        results = finished_results(specs)
    wall, cpu = time.time() - t0, cpu_seconds() - cpu0
    agg = aggregate(plan, results)
    statuses: dict[str, int] = {}
    for r in results.values():
        statuses[r.status] = statuses.get(r.status, 0) + 1
    missing = len(specs) - len(results)
    train_time = sum(
        float(r.summary.get("wall_time_s") or 0.0) for r in results.values() if r.ok and r.summary
    )
    report = {
        "command": " ".join(["python benchmarks/mnist1d/run_suite.py", *(argv or [])]),
        "setting": plan.setting.to_dict(),
        "setting_description": plan.setting.describe(),
        "pairs": {p: vars(PAIRS[p]) for p in plan.main},
        "seeds": plan.seeds,
        "runs_total": len(specs),
        "runs_by_status": statuses,
        "runs_not_available": missing,
        "failed": {k: r.error for k, r in results.items() if not r.ok},
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "sum_of_run_wall_times_s": train_time,
        "workers": workers,
        "machine": info,
        "load_average_end": load_average(),
        **agg,
    }
    report["report_only"] = not train
    # A --report-only call keeps the timing of the last call that trained (if any).
    timing = report
    previous = plan.out / "results.json"
    if not train and previous.is_file():
        try:
            old = json.loads(previous.read_text())
        except ValueError:
            old = {}
        timing = old.get("training_call") if old.get("report_only") else old
        if timing:
            report["training_call"] = {
                k: timing.get(k)
                for k in (
                    "command",
                    "wall_time_s",
                    "cpu_time_s",
                    "workers",
                    "runs_by_status",
                    "machine",
                    "load_average_end",
                )
            }
        else:
            timing = report
    report["plots"] = _plots(plan, agg)
    tables = format_tables(agg, len(plan.seeds))
    atomic_write_text(plan.out / "results.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    t_machine = timing.get("machine") or info
    load = timing.get("load_average_end")
    header = (
        f"<!-- generated by: {report['command']} -->\n\n"
        f"Setting: {plan.setting.describe()}.\n\n"
        f"Runs: {len(specs)} ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}"
        f"{f', {missing} not available' if missing else ''}). "
        + (f"Timing of the training call `{timing.get('command')}`: " if timing is not report else "")
        + f"wall time {timing['wall_time_s'] / 60:.1f} min, CPU time (all processes) "
        f"{timing['cpu_time_s'] / 60:.1f} min, {timing.get('workers')} worker process(es); machine: "
        f"{t_machine['cpu']}, {t_machine['cores_available']} cores, torch {t_machine['torch']}"
        + (f", load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else "")
        + ".\n\n"
    )
    atomic_write_text(plan.out / "tables.md", header + tables + "\n")
    return report


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    pair_lines = "\n".join(f"  {name:<13} {p.teacher} -> {p.student}: {p.about}" for name, p in PAIRS.items())
    variant_names = ", ".join(v.name for v in VARIANTS)
    parser = argparse.ArgumentParser(
        prog="run_suite.py",
        description=(
            "The MNIST-1D distillation benchmark (no download: data generated locally, teachers trained "
            "and cached here).\n\nDefault regime: " + MAIN_SETTING.describe() + ".\n\n"
            "Parts: (1) every method on every pair over --seeds seeds, with paired (same-seed) differences "
            "and 95%% t-intervals; (2) a LoCa alpha sweep on --sweep-pair; (3) a small grid on --grid-pair "
            "(samples x input noise, KD temperature x loss weights, epochs, DKD beta) showing where KD beats "
            "cross-entropy.\nResumable: runs whose folder holds summary.json are skipped, interrupted ones "
            "resume. Writes OUT/results.json, OUT/tables.md, OUT/alpha_sweep.png, OUT/pair_<name>.png."
        ),
        epilog="pairs:\n" + pair_lines + "\n\nexamples:\n"
        "  python benchmarks/mnist1d/run_suite.py --out bench_out/mnist1d          # everything (~30 min on 2 cores)\n"
        "  python benchmarks/mnist1d/run_suite.py --quick                           # smoke test (~2 min)\n"
        "  python benchmarks/mnist1d/run_suite.py --pairs weak_teacher --methods kd,kd+loca --no-grid --no-sweep\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="bench_out/mnist1d", metavar="DIR", help="output folder (default: bench_out/mnist1d)"
    )
    parser.add_argument(
        "--pairs",
        default=",".join(PAIRS),
        help=f"comma-separated teacher/student pairs to run (default: all: {','.join(PAIRS)})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="seeds 0..N-1 per method and pair; a seed fixes student init, data order and input noise (default: 5; 2 with --quick)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated method variants (default: all: {variant_names}); a bare method name such as kd+loca "
        "selects all its variants",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_SETTING.samples} samples, {QUICK_SETTING.epochs} epochs, 2 seeds, 1 grid seed "
        "and a reduced grid; writes into OUT/quick "
        "(checks that everything runs; the numbers mean nothing)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="parallel worker processes, one torch thread each (default: min(2, available cores); 1 = in this process)",
    )
    parser.add_argument(
        "--sweep-pair", default="weak_teacher", help="pair of the LoCa alpha sweep (default: weak_teacher)"
    )
    parser.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in SWEEP_ALPHAS),
        help=f"comma-separated alphas of the sweep (default: {','.join(f'{a:g}' for a in SWEEP_ALPHAS)})",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the alpha sweep")
    parser.add_argument(
        "--grid-pair", default="cross_family", help="pair of the KD-regime grid (default: cross_family)"
    )
    parser.add_argument(
        "--grid-seeds",
        type=int,
        default=None,
        metavar="N",
        help="seeds per grid cell, 100..100+N-1 (default: 3; 1 with --quick)",
    )
    parser.add_argument("--no-grid", action="store_true", help="skip the KD-regime grid")
    parser.add_argument("--device", default="cpu", help="torch device of every run (default: cpu)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: aggregate the finished runs of this plan and rewrite the outputs",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the overall progress bar (the tables are printed at the end anyway)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out) / "quick" if args.quick else Path(args.out)
    try:
        seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
        grid_seeds = args.grid_seeds if args.grid_seeds is not None else (1 if args.quick else 3)
        alphas = [float(a) for a in _csv(args.alphas)]
        plan = build_plan(
            out,
            pairs=_csv(args.pairs),
            seeds=seeds,
            variants=_csv(args.methods) if args.methods else None,
            quick=args.quick,
            sweep_pair=None if args.no_sweep else args.sweep_pair,
            alphas=alphas,
            grid_pair=None if args.no_grid else args.grid_pair,
            grid_seeds=grid_seeds,
            device=args.device,
        )
        workers = args.workers if args.workers is not None else default_workers()
        print(
            f"MNIST-1D suite: {len(plan.specs)} runs ({len(plan.main)} pairs x {len(plan.seeds)} seeds"
            f"{', alpha sweep' if plan.sweep else ''}{', KD-regime grid' if plan.grid else ''}), "
            f"{workers} worker process(es) -> {out}",
            file=sys.stderr,
            flush=True,
        )
        report = run_suite(
            plan, workers=workers, progress=not args.no_progress, train=not args.report_only, argv=argv
        )
    except (LocakdError, ValueError) as err:
        print(f"run_suite.py: error: {err}", file=sys.stderr)
        return 2
    print((out / "tables.md").read_text())
    n_failed = len(report["failed"])
    print(
        f"wall time {report['wall_time_s'] / 60:.1f} min (CPU {report['cpu_time_s'] / 60:.1f} min); "
        f"{report['runs_total']} runs: {report['runs_by_status']}; outputs in {out}",
        file=sys.stderr,
    )
    if n_failed:
        print(f"{n_failed} runs failed; see results.json 'failed' and each run's train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
