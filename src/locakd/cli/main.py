"""The ``locakd`` command: one sub-command per job, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import LocakdError

# Each module defines ``register(subparsers)`` adding its sub-command(s) with a
# ``func(args) -> int`` default.
COMMAND_MODULES = [
    "locakd.cli.info",
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LocakdError as err:
        print(f"locakd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"locakd {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
