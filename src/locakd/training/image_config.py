"""Moved to :mod:`locakd.image.config`; this module keeps the old import path working for one release."""

from ..image.config import (
    DataConfig,
    ImageExperimentConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    load_image_config,
)

__all__ = [
    "DataConfig",
    "ImageExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TeacherConfig",
    "load_image_config",
]
