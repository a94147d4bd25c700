"""Tiny MNIST-1D experiment configs for the trainer tests (300 samples, tiny models, CPU)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from locakd.config import from_dict
from locakd.image.config import ImageExperimentConfig

SAMPLES = 300  # 240 train / 60 test


def tiny_config(
    root: Path,
    out_dir: Path,
    *,
    student: str = "mnist1d_mlp_32",
    teacher: str = "",
    checkpoint: str | Path = "",
    method: str | dict = "ce",
    epochs: int = 2,
    batch_size: int = 32,
    **sections,
) -> ImageExperimentConfig:
    """A complete tiny experiment.

    ``method`` is a method name or a whole ``method`` section; ``sections`` are extra keys
    per section, e.g. ``optim={"lr": 0.1}``.
    """
    method_section = {"name": method} if isinstance(method, str) else dict(method)
    method_section.setdefault("ce_weight", 1.0 if method_section["name"] == "ce" else 0.1)
    data = {
        "data": {
            "name": "mnist1d",
            "root": str(root),
            "batch_size": batch_size,
            "eval_batch_size": 64,
            "mnist1d_samples": SAMPLES,
        },
        "student": {"name": student},
        "teacher": {"name": teacher, "checkpoint": str(checkpoint)},
        "method": method_section,
        "optim": {"lr": 0.05, "milestones": [2], "weight_decay": 5e-4},
        "run": {
            "epochs": epochs,
            "seed": 0,
            "device": "cpu",
            "out_dir": str(out_dir),
            "progress": False,
            "tensorboard": False,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(ImageExperimentConfig, data)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are faster so, and a busy machine does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
