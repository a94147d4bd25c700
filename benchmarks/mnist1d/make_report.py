"""Fill ``BENCHMARKS_template.md`` with the generated tables and timings -> ``BENCHMARKS_mnist1d.md``.

    .venv/bin/python benchmarks/mnist1d/make_report.py [--suite bench_out/mnist1d] [--demo runs/demo]

Every table is copied verbatim from the suite's ``tables.md``; timings come from the
``results.json`` files; the demo table is re-rendered from the demo's ``results.json``.
The charts are copied to ``docs/img/``. Nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _section(text: str, start: str, end: str | None) -> str:
    i = text.index(start)
    j = text.index(end, i + len(start)) if end else len(text)
    return text[i:j].strip()


def _without_heading(block: str) -> str:
    return "\n".join(block.splitlines()[1:]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--suite", default="bench_out/mnist1d", help="output folder of run_suite.py (full run)"
    )
    parser.add_argument("--demo", default="runs/demo", help="output folder of a fresh `locakd demo` run")
    parser.add_argument("--out", default="BENCHMARKS_mnist1d.md", help="the markdown file to write")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from suite import MAIN_SETTING, PAIRS

    from locakd.demo import format_report
    from locakd.experiments.mnist1d import KD_FAMILY

    suite, demo = ROOT / args.suite, ROOT / args.demo
    tables = (suite / "tables.md").read_text()
    results = json.loads((suite / "results.json").read_text())
    timing = results.get("training_call") or results
    demo_results = json.loads((demo / "results.json").read_text())
    if demo_results.get("runs_reused"):
        print(
            "note: the demo results reuse earlier runs; its timing is not that of a fresh run",
            file=sys.stderr,
        )

    s = MAIN_SETTING
    setting = "\n".join(
        [
            f"* data: {s.samples} samples ({int(s.samples * s.train_split)} train / "
            f"{s.samples - int(s.samples * s.train_split)} test), generator seed {s.data_seed}, "
            f"input noise std {s.noise_std:g} on training inputs;",
            f"* training: {s.epochs} epochs (teachers {s.teacher_epochs}), AdamW lr {s.lr:g}, cosine to 0, "
            f"weight decay {s.weight_decay:g}, batch {s.batch_size};",
            f"* KD family ({', '.join(KD_FAMILY)}): T = {s.temperature:g}, CE weight "
            f"{s.ce_weight:g}, KD weight {s.kd_weight:g}; LoCa alpha {s.loca_alpha:g} (0.95 too); "
            f"ka_smooth epsilon {s.smoothing:g};",
            f"* DKD family: CE 1, DKD 1, TCKD weight {s.dkd_alpha:g}, NCKD weight beta {s.dkd_beta:g}, "
            f"T = {s.temperature:g}, linear warm-up over {s.dkd_warmup} epochs;",
            "* teachers: `last.pt` of a CE run (seed 0) in the same setting.",
        ]
    )
    pairs = "\n".join(f"| {name} | {p.teacher} -> {p.student} | {p.about} |" for name, p in PAIRS.items())
    cpu_min, wall_min = timing["cpu_time_s"] / 60, timing["wall_time_s"] / 60
    d = demo_results
    load0 = d["machine"].get("load_average") or [float("nan")] * 3
    load1 = d.get("load_average_end") or [float("nan")] * 3
    demo_timing = (
        f"wall time {d['wall_time_s']:.0f} s, CPU time {d['cpu_time_s']:.0f} s "
        f"(load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end); on two idle cores about "
        f"CPU/2 + worker start-up ≈ {d['cpu_time_s'] / 2 + 10:.0f} s (estimate)."
    )
    demo_table = format_report(d, None)
    demo_table = re.sub(r"\nwall time .*", "", demo_table)  # timing is reported above

    fills = {
        "{{SUITE_WALL}}": f"{wall_min:.1f}",
        "{{SUITE_CPU}}": f"{cpu_min:.1f}",
        "{{SUITE_IDEAL}}": f"{cpu_min / 2:.0f}",
        "{{DEMO_TIMING}}": demo_timing,
        "{{SETTING}}": setting,
        "{{PAIRS}}": pairs,
        "{{MAIN}}": _section(tables, "### Teachers", "### Paired differences"),
        "{{PAIRED}}": _without_heading(_section(tables, "### Paired differences", "### LoCa alpha sweep")),
        "{{SWEEP}}": _without_heading(_section(tables, "### LoCa alpha sweep", "### KD-regime grid")),
        "{{GRID}}": _section(tables, "### KD-regime grid", None),
        "{{DEMO_TABLE}}": demo_table,
    }
    text = (HERE / "BENCHMARKS_template.md").read_text()
    for key, value in fills.items():
        if key not in text:
            raise SystemExit(f"placeholder {key} missing from the template")
        text = text.replace(key, value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise SystemExit(f"unfilled placeholders: {left}")
    (ROOT / args.out).write_text(text)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(suite / "alpha_sweep.png", img / "mnist1d_alpha_sweep.png")
    shutil.copyfile(demo / d["chart"], img / "mnist1d_demo.png")
    print(f"wrote {ROOT / args.out}; copied the alpha sweep and demo charts to {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
