"""The typed config of one image-classification experiment (train a teacher, or distill a student).

One YAML file = one experiment. Every hyper-parameter is a field below, with its
default and a help string; ``locakd show-config image`` prints them all. The
defaults are the CIFAR-100 KD+LoCa recipe (CRD / mdistiller: SGD 0.05, batch 64,
240 epochs, decay x0.1 at 150/180/210, wd 5e-4, T = 4, CE 0.1, KD 0.9).

Sections:
    data     which dataset, where it lives, batch sizes (``batch_size`` is PER PROCESS)
    student  the network this run trains (for ``train-teacher``: the teacher being trained)
    teacher  the frozen teacher of a distillation run (empty for ``train-teacher``)
    method   the loss: ce | kd | kd+loca | dkd | dkd+loca | ka_shift | ka_smooth | skip
    optim    optimiser and learning-rate schedule (stepped once per epoch)
    run      the keys every pipeline shares (seed, device, precision, output folder, logging,
             DDP timeout; :class:`locakd.config.RunSection`) plus epochs and evaluation
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import RunSection, load_config, option
from ..distiller import DKD_METHODS, KD_METHODS, LOCA_METHODS, MethodName
from ..errors import ConfigError

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


def _help(text: str, *, resume: bool = False, identity: str = "experiment") -> dict[str, object]:
    """Field metadata: help text plus the facts read by :func:`locakd.config.config_keys`."""
    return {"help": text, "resume": resume, "identity": identity}


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class DataConfig:
    name: Literal["cifar100", "cifar10", "imagefolder", "mnist1d"] = field(
        default="cifar100",
        metadata=_help("dataset: cifar100 | cifar10 | imagefolder (ImageNet layout) | mnist1d"),
    )
    root: str = field(
        default="data",
        metadata=_help(
            "data folder: CIFAR archive/extracted folder; imagefolder root with train/ and val/; "
            "mnist1d cache folder ('' = no cache)",
            resume=True,
            identity="none",
        ),
    )
    download: bool = field(
        default=False, metadata=_help("CIFAR only: download the official archive if missing", resume=True, identity="none")
    )
    batch_size: int = field(
        default=64,
        metadata=_help(
            "training batch PER PROCESS; under torchrun the global batch is batch_size x nproc_per_node"
        ),
    )
    eval_batch_size: int = field(default=256, metadata=_help("evaluation batch per process", resume=True, identity="none"))
    augment: bool = field(
        default=True,
        metadata=_help(
            "training augmentation on/off (CIFAR: random crop pad 4 + flip; imagefolder: random-resized "
            "crop + flip; mnist1d: the noise of mnist1d_noise_std)"
        ),
    )
    drop_last: bool = field(default=False, metadata=_help("drop the last incomplete training batch"))
    num_workers: int = field(default=8, metadata=_help("imagefolder only: DataLoader worker processes", resume=True, identity="none"))
    image_size: int = field(default=224, metadata=_help("imagefolder only: crop size"))
    mnist1d_samples: int = field(default=5000, metadata=_help("mnist1d only: total samples (train + test)"))
    mnist1d_train_split: float = field(
        default=0.8, metadata=_help("mnist1d only: fraction used for training")
    )
    mnist1d_seed: int = field(default=42, metadata=_help("mnist1d only: seed of the data generator"))
    mnist1d_noise_std: float = field(
        default=0.0, metadata=_help("mnist1d only: std of Gaussian noise added to training inputs (0 = none)")
    )

    def validate(self) -> None:
        for key in ("batch_size", "eval_batch_size", "image_size", "mnist1d_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'data.{key}' must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {self.num_workers}")
        _positive("data.mnist1d_noise_std", self.mnist1d_noise_std, allow_zero=True)


@dataclass
class ModelConfig:
    name: str = field(
        default="resnet8x4",
        metadata=_help(
            "model trained by this run (see locakd.models.available()); train-teacher trains it alone"
        ),
    )


@dataclass
class TeacherConfig:
    name: str = field(default="", metadata=_help("teacher architecture ('' for train-teacher)"))
    checkpoint: str = field(
        default="",
        metadata=_help(
            "teacher weights: a best.pt / last.pt file or a teacher run folder (its best.pt is used)",
            resume=True,
            identity="none",
        ),
    )


@dataclass
class MethodConfig:
    name: MethodName = field(
        default="kd+loca",
        metadata=_help(
            "loss: ce (labels only) | kd | kd+loca | dkd | dkd+loca | ka_shift | ka_smooth | skip "
            "(the last three: KD with the Knowledge-Adjustment / skip baselines)"
        ),
    )
    temperature: float = field(default=4.0, metadata=_help("softmax temperature T of the KD term"))
    ce_weight: float = field(
        default=0.1,
        metadata=_help("weight of the cross-entropy term (1.0 for DKD and for training teachers)"),
    )
    kd_weight: float = field(
        default=0.9, metadata=_help("weight of the KD / DKD term (DKD recipes use 1.0; ignored by ce)")
    )
    loca_alpha: float = field(
        default=0.9, metadata=_help("LoCa strength in (0, 1); kd+loca and dkd+loca only")
    )
    dkd_alpha: float = field(default=1.0, metadata=_help("DKD weight of TCKD (dkd, dkd+loca)"))
    dkd_beta: float = field(default=8.0, metadata=_help("DKD weight of NCKD (dkd, dkd+loca; per pair)"))
    warmup_epochs: int = field(
        default=0,
        metadata=_help(
            "linear ramp of the KD term over this many epochs: factor min((epoch+1)/warmup, 1) (DKD: 20)"
        ),
    )
    standardize: bool = field(
        default=False, metadata=_help("logit standardisation (z-score both logit vectors before the softmax)")
    )
    smoothing: float = field(default=0.1, metadata=_help("epsilon of the ka_smooth baseline"))
    calibrate_correct: bool = field(
        default=False, metadata=_help("kd+loca ablation: also rescale rows the teacher gets right")
    )
    calibrate_before_temperature: bool = field(
        default=False, metadata=_help("kd+loca ablation: calibrate softmax(z_t), then temper")
    )

    def validate(self) -> None:
        _positive("method.temperature", self.temperature)
        _positive("method.ce_weight", self.ce_weight, allow_zero=True)
        _positive("method.kd_weight", self.kd_weight, allow_zero=True)
        _positive("method.dkd_alpha", self.dkd_alpha, allow_zero=True)
        _positive("method.dkd_beta", self.dkd_beta, allow_zero=True)
        if not 0.0 < self.loca_alpha < 1.0:
            raise ConfigError(f"config key 'method.loca_alpha' must lie in (0, 1), got {self.loca_alpha}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"config key 'method.smoothing' must lie in [0, 1], got {self.smoothing}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"config key 'method.warmup_epochs' must be >= 0, got {self.warmup_epochs}")
        # Flags that would silently do nothing are errors.
        for flag in ("calibrate_correct", "calibrate_before_temperature"):
            if getattr(self, flag) and self.name != "kd+loca":
                raise ConfigError(
                    f"config key 'method.{flag}' is a kd+loca ablation; it has no effect with "
                    f"method.name={self.name!r}"
                )
        if (
            self.name not in KD_METHODS + DKD_METHODS and self.name != "ce"
        ):  # pragma: no cover - Literal guards
            raise ConfigError(f"unknown method {self.name!r}")

    @property
    def uses_loca(self) -> bool:
        return self.name in LOCA_METHODS


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = field(default="sgd", metadata=_help("optimiser: sgd | adamw"))
    lr: float = field(
        default=0.05,
        metadata=_help("initial learning rate (CIFAR: 0.05; 0.01 for ShuffleNet/MobileNet students)"),
    )
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    nesterov: bool = field(default=False, metadata=_help("SGD Nesterov momentum"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas"))
    weight_decay: float = field(default=5e-4, metadata=_help("weight decay (applied to every parameter)"))
    schedule: Literal["multistep", "cosine", "constant"] = field(
        default="multistep", metadata=_help("learning-rate schedule, stepped once per epoch")
    )
    milestones: list[int] = field(
        default_factory=lambda: [150, 180, 210],
        metadata=_help("multistep: epochs at which lr is multiplied by gamma"),
    )
    gamma: float = field(default=0.1, metadata=_help("multistep: decay factor"))
    min_lr: float = field(default=0.0, metadata=_help("cosine: final learning rate"))

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.gamma", self.gamma)
        _positive("optim.min_lr", self.min_lr, allow_zero=True)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"config key 'optim.momentum' must lie in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {self.betas}")
        if sorted(self.milestones) != list(self.milestones) or any(m < 1 for m in self.milestones):
            raise ConfigError(
                f"config key 'optim.milestones' must be increasing epochs >= 1, got {self.milestones}"
            )
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("config key 'optim.nesterov' needs optim.name=sgd and optim.momentum > 0")


@dataclass
class RunConfig(RunSection):
    """The image pipeline's run section: the shared keys (:class:`~locakd.config.RunSection`) plus epochs."""

    out_dir: str = option(
        "",
        "run folder; '' = runs/<data>/<teacher>_<student>/<method>/seed<seed> "
        "(train-teacher: runs/<data>/<model>/ce/seed<seed>)",
        resume=True,
        identity="none",
    )
    epochs: int = option(240, "training epochs (raise it with --resume to extend a run)", resume=True)
    eval_every: int = option(1, "evaluate every N epochs (the last epoch always)", resume=True, identity="run")
    sync_batchnorm: bool = option(
        False, "DDP on GPUs: convert the student's BatchNorm to SyncBatchNorm (CUDA only)"
    )

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1:
            raise ConfigError(f"config key 'run.epochs' must be >= 1, got {self.epochs}")
        if self.eval_every < 1:
            raise ConfigError(f"config key 'run.eval_every' must be >= 1, got {self.eval_every}")


@dataclass
class ImageExperimentConfig:
    """One image-classification experiment: ``locakd train-teacher`` or ``locakd distill``."""

    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher.name or self.teacher.checkpoint)

    def output_dir(self) -> Path:
        """``run.out_dir``, or the default derived from dataset, models, method and seed."""
        if self.run.out_dir:
            return Path(self.run.out_dir).expanduser()
        if self.has_teacher:
            pair = f"{self.teacher.name}_{self.student.name}"
            return Path("runs") / self.data.name / pair / self.method.name / f"seed{self.run.seed}"
        return Path("runs") / self.data.name / self.student.name / self.method.name / f"seed{self.run.seed}"

    def check_for(self, mode: str) -> None:
        """Cross-section checks for ``mode`` ("train-teacher" or "distill")."""
        if mode == "train-teacher":
            if self.method.name != "ce":
                raise ConfigError(
                    f"train-teacher trains with labels only: set method.name=ce (got {self.method.name!r})"
                )
            if self.has_teacher:
                raise ConfigError(
                    "train-teacher trains student.name alone: leave teacher.name and teacher.checkpoint empty"
                )
        elif mode == "distill":
            if self.method.name != "ce" or self.has_teacher:
                if not self.teacher.name:
                    raise ConfigError("distill needs a teacher: set teacher.name (the teacher architecture)")
                if not self.teacher.checkpoint:
                    raise ConfigError(
                        "distill needs the teacher's weights: set teacher.checkpoint "
                        "(a best.pt / last.pt file or a teacher run folder)"
                    )
        else:  # pragma: no cover - programming error
            raise ValueError(mode)


def load_image_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ImageExperimentConfig:
    """Load an :class:`ImageExperimentConfig` from YAML plus ``key=value`` overrides (strict)."""
    return load_config(ImageExperimentConfig, path, overrides)
