#!/usr/bin/env python
"""Overhead of LoCa: forward+backward wall time of KD+LoCa relative to plain KD (and DKD+LoCa vs DKD).

Both variants get the same inputs (labels are passed to plain KD too, so only the
calibration differs) and are timed side by side in one process: after a warm-up,
each repetition runs every method once, in an order that alternates between
repetitions, and the report gives the median of the repetitions. The teacher is
realistic: a chosen fraction of rows is mis-instructed (teacher top-1 != label),
the others are predicted correctly.

Example::

    python benchmarks/bench_overhead.py                      # [8192, 100] and [4096, 32000]
    python benchmarks/bench_overhead.py --shapes 1024x1000 --reps 50 --json out.json
    python benchmarks/bench_overhead.py --breakdown          # where LoCa's extra time goes

The target is a ratio <= 1.15 (LoCa adds at most 15 % to the loss's forward+backward);
PASS/FAIL is printed per shape and method, and the exit status is 0 unless --strict.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import locakd
from locakd import dkd_loss, kd_loss


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, classes = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x32000, got {text!r}") from exc
    if rows < 1 or classes < 2:
        raise argparse.ArgumentTypeError(f"need rows >= 1 and classes >= 2, got {text!r}")
    return rows, classes


def make_inputs(rows: int, classes: int, mis_rate: float, seed: int):
    """Student logits (leaf, requires grad), teacher logits and labels with ~mis_rate mis-instructed rows."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, classes, generator=gen) * 2.0
    labels = torch.randint(0, classes, (rows,), generator=gen)
    top_value, top_index = teacher.max(dim=-1)
    mis = torch.rand(rows, generator=gen) < mis_rate
    # a mis-instructed row keeps its label below the top logit; a correct row gets the top logit + margin
    label_value = torch.where(
        mis,
        top_value - 0.5 - torch.rand(rows, generator=gen),
        top_value + 0.5 + torch.rand(rows, generator=gen),
    )
    labels = torch.where(mis & (labels == top_index), (labels + 1) % classes, labels)
    teacher.scatter_(1, labels.unsqueeze(1), label_value.unsqueeze(1))
    student = (torch.randn(rows, classes, generator=gen) * 2.0).requires_grad_(True)
    return student, teacher, labels


def methods(args):
    t, alpha, validate = args.temperature, args.alpha, not args.no_validate
    out = {}
    if "kd" in args.methods:
        out["KD"] = lambda s, te, y: kd_loss(s, te, t, y, validate=validate)
        out["KD+LoCa"] = lambda s, te, y: kd_loss(s, te, t, y, loca_alpha=alpha, validate=validate)
    if "dkd" in args.methods:
        out["DKD"] = lambda s, te, y: dkd_loss(s, te, y, temperature=t, validate=validate)
        out["DKD+LoCa"] = lambda s, te, y: dkd_loss(
            s, te, y, temperature=t, loca_alpha=alpha, validate=validate
        )
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = time.perf_counter


def time_once(fn, student, teacher, labels) -> float:
    student.grad = None
    start = CLOCK()
    loss = fn(student, teacher, labels)
    loss.backward()
    return CLOCK() - start


def bench_shape(shape, args):
    rows, classes = shape
    student, teacher, labels = make_inputs(rows, classes, args.mis_rate, args.seed)
    mis_rows, valid_rows = locakd.misinstruction_rate(teacher, labels)
    fns = methods(args)
    names = list(fns)
    for _ in range(args.warmup):
        for name in names:
            time_once(fns[name], student, teacher, labels)
    times = {name: [] for name in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]  # interleaved, alternating order
        for name in order:
            times[name].append(time_once(fns[name], student, teacher, labels))
    result = {"shape": [rows, classes], "mis_rate": mis_rows / valid_rows, "methods": {}}
    for name in names:
        result["methods"][name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "times_ms": [1e3 * x for x in times[name]],
        }
    for base in ("KD", "DKD"):
        if base in times:
            loca = f"{base}+LoCa"
            ratio = result["methods"][loca]["median_ms"] / result["methods"][base]["median_ms"]
            paired = statistics.median(a / b for a, b in zip(times[loca], times[base], strict=True))
            result["methods"][loca]["ratio"] = ratio
            result["methods"][loca]["paired_ratio"] = paired
            result["methods"][loca]["min_ratio"] = min(times[loca]) / min(times[base])
            result["methods"][loca]["pass"] = ratio <= args.threshold
    return result


def breakdown(shape, args):
    """Time the pieces of the calibration (src/locakd/calibration.py) on the teacher alone.

    Uses the private helpers of locakd.calibration, so it follows their current signatures:
    ``_mis_rows(...)[0]`` is the mask, ``calibration_terms(log_p, labels, alpha, changed=...)``.
    """
    from locakd import _validation
    from locakd.calibration import _apply_log, _loca_log, _mis_rows, calibration_terms

    rows, classes = shape
    _, teacher, labels = make_inputs(rows, classes, args.mis_rate, args.seed)
    t, alpha = args.temperature, args.alpha
    x = teacher / t
    log_p = torch.log_softmax(x, dim=-1)
    changed = _mis_rows(teacher, labels, -100)[0]
    terms = calibration_terms(log_p, labels, alpha, changed=changed)

    pieces = {
        "z / T [also in plain KD]": lambda: teacher / t,
        "log_softmax(z / T) [also in plain KD]": lambda: torch.log_softmax(x, dim=-1),
        "_mis_rows (mask from raw logits)": lambda: _mis_rows(teacher, labels, -100),
        "calibration_terms (per-row scalars)": lambda: calibration_terms(
            log_p, labels, alpha, changed=changed
        ),
        "log_p.clone() [bench only]": lambda: log_p.clone(),
        "_apply_log incl. clone (add_ + scatter_)": lambda: _apply_log(log_p.clone(), terms),
        "_loca_log total (div+log_softmax+LoCa)": lambda: _loca_log(
            teacher, labels, alpha, t, -100, False, False
        ),
        "check_logits, one tensor [both variants]": lambda: _validation.check_logits("t", teacher),
        "check_labels [both variants]": lambda: _validation.check_labels(labels, teacher, -100),
        "alt: torch.isfinite(z).all()": lambda: bool(torch.isfinite(teacher).all()),
        "alt: z.amax() < inf (NaN propagates)": lambda: bool(teacher.amax() < float("inf")),
        "alt: z.max(dim=-1) with indices": lambda: teacher.max(dim=-1),
        "alt: z.amax(dim=-1)": lambda: teacher.amax(dim=-1),
    }
    print(f"\nBreakdown at [{rows}, {classes}] (teacher only; min / median of {args.reps} reps, ms):")
    with torch.no_grad():
        for name, fn in pieces.items():
            for _ in range(args.warmup):
                fn()
            samples = []
            for _ in range(args.reps):
                start = CLOCK()
                fn()
                samples.append(CLOCK() - start)
            print(f"  {name:<45s} {1e3 * min(samples):9.2f} {1e3 * statistics.median(samples):9.2f}")


def profile(shape, args, top: int = 14):
    """torch.profiler table (self CPU time) of each method's forward+backward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows, classes = shape
    student, teacher, labels = make_inputs(rows, classes, args.mis_rate, args.seed)
    reps = max(1, min(args.reps, 10))
    for name, fn in methods(args).items():
        for _ in range(args.warmup):
            time_once(fn, student, teacher, labels)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                time_once(fn, student, teacher, labels)
        print(f"\nProfile of {name} at [{rows}, {classes}] ({reps} reps, fwd+bwd):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints a table of median wall times and ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[(8192, 100), (4096, 32000)],
        metavar="ROWSxCLASSES",
        help="logit shapes [rows, classes] to time",
    )
    parser.add_argument(
        "--reps", type=int, default=21, help="timed repetitions per method (the median is reported)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per method first")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["kd", "dkd"],
        default=["kd", "dkd"],
        help="KD vs KD+LoCa and/or DKD vs DKD+LoCa",
    )
    parser.add_argument(
        "--mis-rate", type=float, default=0.3, help="fraction of rows whose teacher top-1 is not the label"
    )
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T")
    parser.add_argument("--alpha", type=float, default=0.9, help="LoCa alpha")
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="pass validate=False to the losses (skips the NaN/label checks in both variants)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: leave torch's default)",
    )
    parser.add_argument(
        "--threshold", type=float, default=1.15, help="PASS if LoCa/plain median ratio <= this"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any ratio FAILs")
    parser.add_argument("--json", metavar="PATH", help="also write all timings and ratios to this JSON file")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the pieces of the calibration (_loca_log) at each shape",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter (the figure of merit); cpu: time.process_time, CPU time of "
        "this process (with --threads 1 it ignores time lost to other processes on a busy "
        "machine)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top operators (self CPU time) of each method "
        "at each shape, forward+backward",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}, "
        f"{platform.machine()}; T={args.temperature}, alpha={args.alpha}, mis-rate={args.mis_rate}, "
        f"reps={args.reps}, warmup={args.warmup}, validate={not args.no_validate}, clock={args.clock}"
    )
    print(header)
    results = []
    any_fail = False
    print(
        f"\n{'shape':>14s}  {'method':<10s} {'median ms':>10s} {'min ms':>9s} "
        f"{'ratio':>7s} {'paired':>7s} {'min-r':>7s}  verdict"
    )
    for shape in args.shapes:
        result = bench_shape(shape, args)
        results.append(result)
        label = f"[{shape[0]}, {shape[1]}]"
        for name, m in result["methods"].items():
            cols = [f"{m[key]:.3f}" if key in m else "" for key in ("ratio", "paired_ratio", "min_ratio")]
            verdict = ("PASS" if m["pass"] else "FAIL") if "pass" in m else ""
            any_fail |= verdict == "FAIL"
            print(
                f"{label:>14s}  {name:<10s} {m['median_ms']:10.2f} {m['min_ms']:9.2f} "
                f"{cols[0]:>7s} {cols[1]:>7s} {cols[2]:>7s}  {verdict}"
            )
        print(f"{'':>14s}  (measured mis-instruction rate {result['mis_rate']:.3f})")
        sys.stdout.flush()
    print(
        "\nratio = median(LoCa) / median(plain) (PASS/FAIL uses it); paired = median over reps of the per-rep "
        f"ratio; min-r = min(LoCa) / min(plain); target ratio <= {args.threshold}"
    )
    if args.breakdown:
        for shape in args.shapes:
            breakdown(shape, args)
    if args.profile:
        for shape in args.shapes:
            profile(shape, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "config": vars(args) | {"shapes": [list(s) for s in args.shapes]},
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "results": results,
                },
                fh,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 1 if (args.strict and any_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
