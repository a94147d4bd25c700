"""``locakd demo``: the MNIST-1D distillation demo (a teacher, then students of each demo method)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train a teacher on MNIST-1D (generated locally, nothing is downloaded), then distill
students with each method over several seeds, and print mean +- std test accuracy per
method (best and last epoch), the teacher's accuracy and its mis-instruction rate (the
share of training inputs on which the teacher's top class is wrong).

Default regime: 5000 samples (4000 train), Gaussian noise (std 0.3) on training inputs,
cnn_8 teacher (~74% test accuracy, wrong on ~27% of the noisy training stream) -> mlp_128
student, 30 epochs, AdamW lr 0.01 cosine; KD T=4 with CE 0.5 / KD 0.5, LoCa alpha 0.9, DKD
beta 2 (see BENCHMARKS_mnist1d.md for why). About 1-2 minutes on 2 free CPU cores (more
when the machine is busy).

Writes to --out: results.json (all numbers, per run and aggregated, timing, machine),
demo_accuracy.png (bar chart, +-1 std error bars), runs/<setting>/... (one run folder per
training run: config.yaml, metrics.jsonl, train.log, last.pt, summary.json). Finished runs,
the teacher included, are reused when the command is repeated with the same --out and
settings; other settings get their own run folders."""

EPILOG = """\
examples:
  locakd demo                          # the full demo, 3 seeds, into runs/demo
  locakd demo --seeds 5 --out runs/demo5
  locakd demo --quick                  # smoke test (~20 s): tiny data, 3 epochs
  locakd demo --teacher cnn_64                     # a strong teacher (mis-instructs ~6%)
"""


def register(subparsers) -> None:
    from ..demo import (
        DEMO_METHODS,
        DEMO_SEEDS,
        DEMO_SETTING,
        DEMO_STUDENT,
        DEMO_TEACHER,
        QUICK_SEEDS,
        QUICK_SETTING,
    )
    from ..distiller import LOCA_METHODS, METHODS
    from ..experiments.mnist1d import mnist1d_models

    p = subparsers.add_parser(
        "demo",
        help=f"MNIST-1D demo: teacher + {'/'.join(DEMO_METHODS)} students on CPU (a few minutes)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="students per method, seeds 0..N-1; a seed fixes the student's initial weights, data order "
        f"and input noise, identically across methods (default: {DEMO_SEEDS}; {QUICK_SEEDS} with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_SETTING.samples} samples, {QUICK_SETTING.epochs} epochs, {QUICK_SEEDS} seeds; checks that "
        "everything runs, the accuracies mean nothing",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="parallel worker processes, each with one torch thread (default: min(2, available cores)); "
        "1 runs everything in this process",
    )
    p.add_argument(
        "--teacher",
        default=DEMO_TEACHER,
        help=f"teacher model, one of {', '.join(mnist1d_models())} (default: {DEMO_TEACHER})",
    )
    p.add_argument(
        "--student", default=DEMO_STUDENT, help=f"student model, same choices (default: {DEMO_STUDENT})"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEMO_METHODS),
        help=f"comma-separated methods to compare, from {', '.join(METHODS)} (default: {','.join(DEMO_METHODS)})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help=f"training epochs of teacher and students (default: {DEMO_SETTING.epochs}; "
        f"{QUICK_SETTING.epochs} with --quick)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        metavar="N",
        help="teacher epochs if different from --epochs",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="N",
        help=f"MNIST-1D samples in total, {round(100 * DEMO_SETTING.train_split)}%% train / "
        f"{round(100 * (1 - DEMO_SETTING.train_split))}%% test (default: {DEMO_SETTING.samples}; {QUICK_SETTING.samples} with --quick)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=None,
        metavar="STD",
        help="std of the Gaussian noise added to training inputs, teacher and students "
        f"(default: {DEMO_SETTING.noise_std:g}; "
        "0 makes the teacher exact on its training set, so LoCa has nothing to correct)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"LoCa alpha in (0, 1) for {' and '.join(LOCA_METHODS)} (default: {DEMO_SETTING.loca_alpha:g})",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device of every run: cpu (default) | auto | cuda | mps"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the table is still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoOptions, format_report, run_demo

    opts = DemoOptions(
        out_dir=args.out,
        seeds=args.seeds,
        quick=args.quick,
        workers=args.workers,
        teacher=args.teacher,
        student=args.student,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        samples=args.samples,
        noise_std=args.noise,
        loca_alpha=args.alpha,
        device=args.device,
        progress=not args.no_progress,
    )
    report = run_demo(opts)
    print(format_report(report, args.out))
    sys.stdout.flush()
    return 0
