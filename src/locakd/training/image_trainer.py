"""Moved to :mod:`locakd.image.trainer`; this module keeps the old import path working for one release."""

from ..image.trainer import (
    CHECKPOINT_FORMAT,
    EpochCallback,
    build_lr_lambda,
    distill,
    load_teacher,
    resolve_teacher_checkpoint,
    run_image_experiment,
    train_teacher,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "EpochCallback",
    "build_lr_lambda",
    "distill",
    "load_teacher",
    "resolve_teacher_checkpoint",
    "run_image_experiment",
    "train_teacher",
]
