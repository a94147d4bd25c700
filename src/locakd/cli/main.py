"""The ``locakd`` command: one sub-command per job, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import LocakdError

# Each module defines ``register(subparsers)`` adding its sub-command(s) with a
# ``func(args) -> int`` default.
COMMAND_MODULES = [
    "locakd.cli.info",
    "locakd.cli.image",
    "locakd.cli.lm",
    "locakd.cli.show_config",
    "locakd.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locakd",
        description=(
            "Knowledge distillation with LoCa (Logit Calibration, ECAI 2024): train teachers, "
            "distill students with KD / KD+LoCa / DKD / DKD+LoCa and baselines, for image "
            "classifiers and Hugging Face causal language models."
        ),
        epilog="Run 'locakd COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"locakd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # ``key=value`` overrides may come before or after flags (``CONFIG --resume k=v``):
    # argparse stops filling a positional list at the first flag, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun: record the failing rank's traceback in torchrun's error summary.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LocakdError as err:
        print(f"locakd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `locakd show-config image | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        hint = "; resume with --resume" if hasattr(args, "resume") else "; re-run to continue"
        print(f"locakd {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
