"""Teacher target distributions: plain, LoCa-calibrated, and the baselines LoCa is compared with.

Each transform maps teacher logits (and labels) to the *log* of the distribution
the student is trained to match, plus an optional per-row weight (the "skip"
baseline zeroes mis-instructed rows). Everything runs without autograd: no
gradient ever reaches the teacher.

Transforms:
    ``none``       softmax(z_t / T)
    ``loca``       LoCa calibration of softmax(z_t / T) (see :mod:`locakd.calibration`)
    ``ka_shift``   Knowledge Adjustment (Wen et al. 2019), probability shift:
                   on mis-instructed rows swap p_gt and the top probability p_k
    ``ka_smooth``  Knowledge Adjustment, label-smoothed replacement: mis-instructed rows
                   become (1 - eps) * one_hot(gt) + eps / C
    ``skip``       mis-instructed rows get weight 0 in the distillation term
"""

from __future__ import annotations

import math

import torch

from .._validation import check_alpha, check_unit_interval, compute_dtype
from ..calibration import _loca_log, _mis_rows
from ..errors import InputError

TARGET_TRANSFORMS = ("none", "loca", "ka_shift", "ka_smooth", "skip")


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): z-score each row of logits.

    Keeps autograd (it is applied to the student too). Math in float32.
    """
    logits = logits.to(compute_dtype(logits))
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def resolve_transform(target_transform: str | None, loca_alpha: float | None) -> str:
    """The transform named by the two ways a caller can ask for one (``loca_alpha`` means LoCa)."""
    if target_transform is None:
        return "loca" if loca_alpha is not None else "none"
    if target_transform not in TARGET_TRANSFORMS:
        raise InputError(
            f"unknown target_transform {target_transform!r}; choose one of {', '.join(TARGET_TRANSFORMS)}"
        )
    if target_transform != "loca" and loca_alpha is not None:
        raise InputError(
            f"loca_alpha={loca_alpha} was given with target_transform={target_transform!r}; "
            "LoCa is its own transform: pass target_transform='loca' (or leave it unset)"
        )
    return target_transform


def teacher_log_target(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    *,
    transform: str = "none",
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
    with torch.no_grad():
        logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
        if standardize:
            logits = standardize_logits(logits)
        if transform != "none" and labels is None:
            raise InputError(f"target_transform {transform!r} needs labels")
        if transform == "loca":
            alpha = check_alpha(0.9 if loca_alpha is None else loca_alpha, "loca_alpha")
            log_target, _ = _loca_log(
                logits, labels, alpha, temperature, ignore_index,
                calibrate_correct, calibrate_before_temperature,
            )
            return log_target, None

        log_target = torch.log_softmax(logits / temperature, dim=-1)
        if transform == "none":
            return log_target, None
        mis, _, _ = _mis_rows(logits, labels, ignore_index)
        if transform == "skip":
            return log_target, (~mis).to(log_target.dtype)
        safe = torch.where(labels != ignore_index, labels, torch.zeros_like(labels)).unsqueeze(-1)
        row = mis.unsqueeze(-1)
        if transform == "ka_shift":
            top_index = logits.argmax(dim=-1)
            log_gt = log_target.gather(-1, safe)
            log_top = log_target.gather(-1, top_index.unsqueeze(-1))
            swapped = log_target.scatter(-1, safe, log_top).scatter(-1, top_index.unsqueeze(-1), log_gt)
            return torch.where(row, swapped, log_target), None
        if transform == "ka_smooth":
            eps = check_unit_interval(smoothing, "smoothing")
            num_classes = log_target.shape[-1]
            off = math.log(eps) - math.log(num_classes) if eps > 0 else -math.inf
            on = math.log1p(-eps + eps / num_classes)
            smoothed = torch.full_like(log_target, off).scatter(-1, safe, on)
            return torch.where(row, smoothed, log_target), None
        raise InputError(f"unknown target_transform {transform!r}; choose one of {', '.join(TARGET_TRANSFORMS)}")
