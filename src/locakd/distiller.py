"""A student plus a frozen teacher, returning ``(student_logits, {loss name: loss})`` for a batch.

Usable in any training loop::

    from locakd.distiller import Distiller

    distiller = Distiller(student, teacher, "kd+loca", temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    distiller.train()                      # the teacher stays in eval mode
    for epoch in range(epochs):
        for images, labels in loader:
            logits, losses = distiller(images, labels, epoch=epoch)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()                # gradients reach the student only
            optimizer.step()

Methods (the loss math is in :mod:`locakd.losses`; here it is only dispatched):

    ``ce``         ce_weight * CE(z_s, y)                           (no teacher needed)
    ``kd``         ce_weight * CE + kd_weight * T^2 KL(softmax(z_t/T) || softmax(z_s/T))
    ``kd+loca``    the same with the LoCa-calibrated teacher target
    ``ka_shift``, ``ka_smooth``, ``skip``: KD with the Knowledge-Adjustment / skip targets
    ``dkd``        ce_weight * CE + kd_weight * T^2 (dkd_alpha TCKD + dkd_beta NCKD)
    ``dkd+loca``   DKD with the LoCa-calibrated teacher's binary target

The KD term is multiplied by ``min((epoch + 1) / warmup_epochs, 1)`` when
``warmup_epochs > 0`` and an ``epoch`` (0-based) is passed (DKD's linear warm-up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .losses import TRANSFORMS, dkd_loss, kd_loss
from .teachers import FrozenTeacher

__all__ = [
    "DKD_METHODS",
    "KD_METHODS",
    "LOCA_METHODS",
    "METHODS",
    "DistillOutput",
    "Distiller",
    "MethodName",
]

# Every method name comes from the target-transform registry (losses/targets.py): each
# transform names its KD method and, for some, a DKD method. "ce" needs no teacher.
_KD_TRANSFORMS: dict[str, str] = {entry.kd_method: name for name, entry in TRANSFORMS.items()}
_DKD_TRANSFORMS: dict[str, str] = {
    entry.dkd_method: name for name, entry in TRANSFORMS.items() if entry.dkd_method is not None
}
KD_METHODS: tuple[str, ...] = tuple(_KD_TRANSFORMS)
DKD_METHODS: tuple[str, ...] = tuple(_DKD_TRANSFORMS)
METHODS: tuple[str, ...] = ("ce", *KD_METHODS, *DKD_METHODS)
LOCA_METHODS: tuple[str, ...] = tuple(
    method for method, name in {**_KD_TRANSFORMS, **_DKD_TRANSFORMS}.items() if TRANSFORMS[name].loca
)
MethodName = Literal[METHODS]  # type: ignore[valid-type]  # built from the registry; get_args works


@dataclass
class DistillOutput:
    """Everything one distillation forward produces."""

    student_logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    teacher_logits: torch.Tensor | None

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


class Distiller(nn.Module):
    """Student + frozen teacher + one distillation method.

    The teacher (if any) is wrapped in a :class:`~locakd.teachers.FrozenTeacher`: it has
    ``requires_grad=False``, runs under ``torch.no_grad`` and is kept in eval mode whatever
    ``.train()`` is called with. The student may be wrapped
    (e.g. in ``DistributedDataParallel``); :attr:`student` is whatever was passed.

    Args:
        student: the network being trained; ``student(x)`` returns logits ``[N, C]``.
        teacher: the frozen network (``None`` only for method ``ce``).
        method: one of :data:`METHODS`.
        temperature, ce_weight, kd_weight, loca_alpha, dkd_alpha, dkd_beta, warmup_epochs,
        standardize, smoothing, calibrate_correct, calibrate_before_temperature: as in
            :class:`locakd.training.image_config.MethodConfig`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        method: str = "kd+loca",
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        loca_alpha: float = 0.9,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        warmup_epochs: int = 0,
        standardize: bool = False,
        smoothing: float = 0.1,
        calibrate_correct: bool = False,
        calibrate_before_temperature: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
        if teacher is None and method != "ce":
            raise ConfigError(f"method {method!r} needs a teacher model")
        loca_kd = [m for m, name in _KD_TRANSFORMS.items() if TRANSFORMS[name].loca]
        if (calibrate_correct or calibrate_before_temperature) and method not in loca_kd:
            raise ConfigError(
                f"calibrate_correct / calibrate_before_temperature apply to method {' / '.join(loca_kd)} only"
            )
        self.student = student
        self.teacher = FrozenTeacher(teacher) if teacher is not None else None
        self.method = method
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.loca_alpha = float(loca_alpha)
        self.dkd_alpha = float(dkd_alpha)
        self.dkd_beta = float(dkd_beta)
        self.warmup_epochs = int(warmup_epochs)
        self.standardize = bool(standardize)
        self.smoothing = float(smoothing)
        self.calibrate_correct = bool(calibrate_correct)
        self.calibrate_before_temperature = bool(calibrate_before_temperature)

    @classmethod
    def from_config(cls, student: nn.Module, teacher: nn.Module | None, method: Any) -> Distiller:
        """Build from a :class:`~locakd.training.image_config.MethodConfig` (or any object/dict with its fields)."""
        values = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else dict(method)
        name = values.pop("name")
        return cls(student, teacher, name, **values)

    def student_parameters(self):
        """The parameters to optimise (the teacher's are frozen)."""
        return self.student.parameters()

    def kd_factor(self, epoch: float | None) -> float:
        """Warm-up multiplier of the KD term at (0-based) ``epoch``; 1 when no warm-up or no epoch."""
        if self.warmup_epochs <= 0 or epoch is None:
            return 1.0
        return min((float(epoch) + 1.0) / self.warmup_epochs, 1.0)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None if self.teacher is None else self.teacher(images)

    def compute(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: float | None = None
    ) -> DistillOutput:
        """Student and teacher forward plus the method's loss terms (float32 loss math)."""
        student_logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        losses = {"ce": self.ce_weight * F.cross_entropy(student_logits.float(), labels)}
        if self.method == "ce":
            return DistillOutput(student_logits, losses, teacher_logits)
        factor = self.kd_weight * self.kd_factor(epoch)
        if self.method in _DKD_TRANSFORMS:
            transform = _DKD_TRANSFORMS[self.method]
            kd = dkd_loss(
                student_logits,
                teacher_logits,
                labels,
                alpha=self.dkd_alpha,
                beta=self.dkd_beta,
                temperature=self.temperature,
                loca_alpha=self.loca_alpha if TRANSFORMS[transform].loca else None,
                target_transform=transform,
                smoothing=self.smoothing,
                standardize=self.standardize,
                validate=False,
            )
        else:
            transform = _KD_TRANSFORMS[self.method]
            kd = kd_loss(
                student_logits,
                teacher_logits,
                self.temperature,
                labels,
                loca_alpha=self.loca_alpha if TRANSFORMS[transform].loca else None,
                target_transform=transform,
                smoothing=self.smoothing,
                standardize=self.standardize,
                calibrate_correct=self.calibrate_correct,
                calibrate_before_temperature=self.calibrate_before_temperature,
                validate=False,
            )
        losses["kd"] = factor * kd
        return DistillOutput(student_logits, losses, teacher_logits)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: float | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(student_logits, {"ce": ..., "kd": ...})``; sum the dict to get the training loss."""
        out = self.compute(images, labels, epoch)
        return out.student_logits, out.losses

    def extra_repr(self) -> str:
        return f"method={self.method!r}, temperature={self.temperature}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}"
