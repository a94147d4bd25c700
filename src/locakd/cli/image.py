"""Image-classification commands: ``train-teacher``, ``distill``, ``summarize``.

locakd train-teacher configs/cifar100/teachers/resnet56.yaml
locakd distill configs/cifar100/resnet56_resnet20/kd+loca.yaml run.seed=1
locakd distill configs/cifar100/resnet56_resnet20/kd+loca.yaml run.epochs=300 --resume
torchrun --nproc_per_node 4 -m locakd.cli.main distill CONFIG data.batch_size=16
locakd summarize runs/cifar100
"""

from __future__ import annotations

import argparse
import json
import os
import sys

COMMON_EPILOG = """\
Overrides are KEY=VALUE pairs after CONFIG (values are YAML: optim.milestones=[30,60]),
e.g. run.seed=1 optim.lr=0.01 run.device=cpu. Options (--resume, --print-config) may go
anywhere. Unknown keys are errors.

data.batch_size is PER PROCESS: under `torchrun --nproc_per_node N -m locakd.cli.main ...`
the global batch is N x data.batch_size. Only rank 0 writes files.

Outputs in run.out_dir: config.yaml, metrics.jsonl, tensorboard/, last.pt, best.pt, summary.json.

Config keys (KEY = default  # meaning):
"""


def _key_reference() -> str:
    from ..config import describe
    from ..image.config import ImageExperimentConfig

    return "\n".join(describe(ImageExperimentConfig))


def register(subparsers) -> None:
    epilog = COMMON_EPILOG + _key_reference()
    descriptions = {
        "train-teacher": (
            "Train a network alone with cross-entropy (method.name: ce) -- typically a teacher. "
            "The network is student.name; teacher.* stays empty."
        ),
        "distill": (
            "Distill a frozen teacher (teacher.name + teacher.checkpoint: a best.pt / last.pt or a "
            "teacher run folder) into student.name with method.name: kd | kd+loca | dkd | dkd+loca | "
            "ka_shift | ka_smooth | skip | ce."
        ),
    }
    helps = {
        "train-teacher": "train a network alone with cross-entropy (e.g. a teacher)",
        "distill": "distill a frozen teacher into a student (KD, KD+LoCa, DKD, DKD+LoCa, ...)",
    }
    for mode, description in descriptions.items():
        parser = subparsers.add_parser(
            mode,
            help=helps[mode],
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("config", metavar="CONFIG", help="YAML experiment file (e.g. from configs/)")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        parser.add_argument(
            "--resume", action="store_true", help="continue the run in run.out_dir from its last.pt"
        )
        parser.add_argument(
            "--print-config", action="store_true", help="print the resolved config as YAML and exit"
        )
        parser.set_defaults(func=run_experiment, mode=mode)

    parser = subparsers.add_parser(
        "summarize",
        help="mean +- std over seeds of finished runs",
        description=(
            "Read summary.json + config.yaml of every finished run under the given folders and print "
            "mean +- std (sample std) of best and last test top-1 per dataset / pair / method "
            "(runs whose configs differ in anything but seed, paths and logging are kept apart)."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or folders above them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_summarize)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_experiment(args: argparse.Namespace) -> int:
    import yaml

    from ..config import to_dict
    from ..image.config import load_image_config
    from ..image.trainer import run_image_experiment

    cfg = load_image_config(args.config, args.overrides)
    if args.print_config:
        cfg.check_for(args.mode)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    summary = run_image_experiment(cfg, args.mode, resume=args.resume)
    if _is_main_process():
        keys = (
            "best_top1",
            "best_top5",
            "best_epoch",
            "last_top1",
            "last_top5",
            "teacher_top1",
            "misinstruction_rate",
        )
        print(json.dumps({k: summary.get(k) for k in keys} | {"run_dir": summary["run_dir"]}))
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..image.summarize import find_runs, format_table, groups_to_json, load_run, summarize_runs

    finished, unfinished = find_runs(args.runs)
    for run in unfinished:
        print(f"locakd summarize: skipping unfinished run {run} (no summary.json)", file=sys.stderr)
    if not finished:
        raise DataError(
            f"no finished runs (folders with summary.json and config.yaml) under {', '.join(args.runs)}"
        )
    groups = summarize_runs([load_run(run) for run in finished])
    if args.json:
        print(json.dumps(groups_to_json(groups), indent=2))
    else:
        print(format_table(groups))
    return 0
