"""``locakd calibrate``: show what LoCa does to one probability vector (a quick sanity tool)."""

from __future__ import annotations

import argparse

import torch


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate one probability vector and print the result",
        description=(
            "Print LoCa's calibration of a teacher probability vector for a given label. "
            "Example: locakd calibrate 0.5 0.3 0.15 0.05 --label 1 --alpha 0.9"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("probs", nargs="+", type=float, help="teacher probabilities (renormalised if needed)")
    parser.add_argument("--label", type=int, required=True, help="the ground-truth class index")
    parser.add_argument("--alpha", type=float, default=0.9, help="LoCa strength in (0, 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import loca_calibrate, misinstruction_mask

    probs = torch.tensor(args.probs, dtype=torch.float64)
    logits = (probs / probs.sum()).log().unsqueeze(0)
    label = torch.tensor([args.label])
    calibrated = loca_calibrate(logits, label, args.alpha)[0]
    mis = bool(misinstruction_mask(logits, label)[0])
    print(f"teacher     : {[round(float(p), 6) for p in (probs / probs.sum())]}")
    print(f"mis-instructed: {mis}")
    print(f"calibrated  : {[round(float(p), 6) for p in calibrated]}")
    return 0
