"""Teacher target distributions: plain, LoCa-calibrated, and the baselines LoCa is compared with.

Each transform maps teacher logits (and labels) to the *log* of the distribution
the student is trained to match, plus an optional per-row weight (the "skip"
baseline zeroes mis-instructed rows). Everything runs without autograd: no
gradient ever reaches the teacher.

The transforms live in one registry, :data:`TRANSFORMS` (name -> :class:`TargetTransform`);
each entry also names the :class:`~locakd.distiller.Distiller` methods that use it, so a
new transform is added here (plus its tests) and nowhere else:

    ``none``       softmax(z_t / T)                                                 (kd, dkd)
    ``loca``       LoCa calibration of softmax(z_t / T) (:mod:`locakd.calibration`) (kd+loca, dkd+loca)
    ``ka_shift``   Knowledge Adjustment (Wen et al. 2019), probability shift:
                   on mis-instructed rows swap p_gt and the top probability p_k     (ka_shift)
    ``ka_smooth``  Knowledge Adjustment, label-smoothed replacement: mis-instructed rows
                   become (1 - eps) * one_hot(gt) + eps / C, C the classes whose logit is
                   not masked (-inf)                                                (ka_smooth)
    ``skip``       mis-instructed rows get weight 0 in the distillation term         (skip)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validation import check_alpha, check_unit_interval, compute_dtype
from ..calibration import loca_log_target, misinstruction_rows
from ..errors import InputError


@dataclass(frozen=True)
class TargetOptions:
    """The knobs a transform may read (each one reads only its own)."""

    temperature: float = 1.0
    ignore_index: int = -100
    loca_alpha: float | None = None
    smoothing: float = 0.1
    calibrate_correct: bool = False
    calibrate_before_temperature: bool = False


# (teacher logits in the compute dtype, labels or None, options) -> (log target, row weight or None)
TransformFunction = Callable[
    [torch.Tensor, "torch.Tensor | None", TargetOptions], "tuple[torch.Tensor, torch.Tensor | None]"
]


@dataclass(frozen=True)
class TargetTransform:
    """One teacher-target transform and the Distiller methods built on it."""

    name: str
    function: TransformFunction
    kd_method: str  # Distiller method: Hinton KD with this target
    dkd_method: str | None  # Distiller method: DKD with this target (None: not offered as a method)
    needs_labels: bool
    summary: str
    loca: bool = False  # the target is LoCa-calibrated (with loca_alpha)
    fused: bool = False  # the fused kernels build it from teacher logits block by block (no [N, C] target)

    def __call__(self, logits, labels, options):
        return self.function(logits, labels, options)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): z-score each row of logits.

    Keeps autograd (it is applied to the student too). Math in float32.
    """
    logits = logits.to(compute_dtype(logits))
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


# --------------------------------------------------------------------------- the transforms
def _plain(logits, labels, options):
    return torch.log_softmax(logits / options.temperature, dim=-1), None


def _loca(logits, labels, options):
    alpha = check_alpha(0.9 if options.loca_alpha is None else options.loca_alpha, "loca_alpha")
    target = loca_log_target(
        logits, labels, alpha, options.temperature, options.ignore_index,
        options.calibrate_correct, options.calibrate_before_temperature,
    )
    return target.log_probs, None


def _misinstructed(logits, labels, options):
    """(plain log target, mis-instruction mask [..., 1], safe labels [..., 1])."""
    rows = misinstruction_rows(logits, labels, options.ignore_index)
    log_target = torch.log_softmax(logits / options.temperature, dim=-1)
    return log_target, rows.mask.unsqueeze(-1), rows.safe_labels.unsqueeze(-1)


def _ka_shift(logits, labels, options):
    log_target, mis, safe = _misinstructed(logits, labels, options)
    top_index = logits.argmax(dim=-1, keepdim=True)
    log_gt = log_target.gather(-1, safe)
    log_top = log_target.gather(-1, top_index)
    swapped = log_target.scatter(-1, safe, log_top).scatter(-1, top_index, log_gt)
    return torch.where(mis, swapped, log_target), None


def _ka_smooth(logits, labels, options):
    eps = check_unit_interval(options.smoothing, "smoothing")
    log_target, mis, safe = _misinstructed(logits, labels, options)
    # eps is spread over the row's classes; classes masked with -inf logits are not classes
    present = torch.isfinite(logits)
    num_classes = present.sum(dim=-1, keepdim=True).clamp(min=1).to(log_target.dtype)
    # log(eps / C) as a difference: eps / C may underflow to 0 for a tiny eps
    off = math.log(eps) - num_classes.log() if eps > 0 else torch.full_like(num_classes, -math.inf)
    on = torch.log1p(-eps + eps / num_classes)
    smoothed = torch.where(present, off, -math.inf).scatter(-1, safe, on)
    return torch.where(mis, smoothed, log_target), None


def _skip(logits, labels, options):
    log_target, mis, _ = _misinstructed(logits, labels, options)
    return log_target, (~mis.squeeze(-1)).to(log_target.dtype)


TRANSFORMS: dict[str, TargetTransform] = {
    entry.name: entry
    for entry in (
        TargetTransform("none", _plain, "kd", "dkd", False, "softmax(z_t / T)", fused=True),
        TargetTransform(
            "loca", _loca, "kd+loca", "dkd+loca", True, "LoCa-calibrated softmax(z_t / T)", loca=True, fused=True
        ),
        TargetTransform("ka_shift", _ka_shift, "ka_shift", None, True, "swap p_gt and p_top on mis-instructed rows"),
        TargetTransform(
            "ka_smooth", _ka_smooth, "ka_smooth", None, True, "label-smoothed one-hot on mis-instructed rows"
        ),
        TargetTransform("skip", _skip, "skip", None, True, "mis-instructed rows get weight 0"),
    )
}
TARGET_TRANSFORMS: tuple[str, ...] = tuple(TRANSFORMS)  # the names, in registry order


def resolve_transform(target_transform: str | None, loca_alpha: float | None) -> TargetTransform:
    """The transform named by the two ways a caller can ask for one (``loca_alpha`` means LoCa)."""
    if target_transform is None:
        return TRANSFORMS["loca" if loca_alpha is not None else "none"]
    entry = TRANSFORMS.get(target_transform) if isinstance(target_transform, str) else None
    if entry is None:
        raise InputError(
            f"unknown target_transform {target_transform!r}; choose one of {', '.join(TARGET_TRANSFORMS)}"
        )
    if not entry.loca and loca_alpha is not None:
        raise InputError(
            f"loca_alpha={loca_alpha} was given with target_transform={target_transform!r}; "
            "LoCa is its own transform: pass target_transform='loca' (or leave it unset)"
        )
    return entry


def teacher_log_target(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    *,
    transform: str | TargetTransform = "none",
    loca_alpha: float | None = None,
    smoothing: float = 0.1,
    ignore_index: int = -100,
    standardize: bool = False,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_target, row_weight)`` for the teacher; ``row_weight`` is None unless ``skip``.

    Inputs are assumed validated. ``log_target`` has the logits' shape and the
    compute dtype (float32 or float64).
    """
    entry = transform if isinstance(transform, TargetTransform) else resolve_transform(transform, None)
    if entry.needs_labels and labels is None:
        raise InputError(f"target_transform {entry.name!r} needs labels")
    options = TargetOptions(
        temperature=temperature,
        ignore_index=ignore_index,
        loca_alpha=loca_alpha,
        smoothing=smoothing,
        calibrate_correct=calibrate_correct,
        calibrate_before_temperature=calibrate_before_temperature,
    )
    with torch.no_grad():
        logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
        if standardize:
            logits = standardize_logits(logits)
        return entry(logits, labels, options)
