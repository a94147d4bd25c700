"""``locakd show-config image|lm``: every config key of a pipeline with its default and meaning."""

from __future__ import annotations

import argparse

# kind -> (module, class name, title)
KINDS = {
    "image": ("locakd.image.config", "ImageExperimentConfig", "image experiment config (train-teacher, distill)"),
    "lm": ("locakd.lm.config", "LMExperimentConfig", "LM experiment config (lm-sft, lm-distill)"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show-config",
        help="print every config key with its default and meaning",
        description="Print the reference of a config kind: every key, its default and what it does.",
    )
    parser.add_argument(
        "kind",
        choices=sorted(KINDS),
        help="config kind: image (train-teacher, distill) or lm (lm-sft, lm-distill)",
    )
    parser.add_argument("--yaml", action="store_true", help="print the defaults as a YAML file instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    from ..config import commented_yaml, describe

    module, name, title = KINDS[args.kind]
    config_class = getattr(importlib.import_module(module), name)
    if args.yaml:
        print(commented_yaml(config_class))
    else:
        print(f"# locakd {title}: KEY = default  # meaning")
        print("\n".join(describe(config_class)))
    return 0
