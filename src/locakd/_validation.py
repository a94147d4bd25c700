"""Argument checks shared by the calibration and the losses.

Each check raises :class:`locakd.errors.InputError` with a message that names the
argument and what is wrong with it, so bad input fails early and readably instead
of producing NaN or an index error from deep inside torch.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the softmax/KL math runs in: float32, or float64 when the input already is."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_logits(name: str, logits: torch.Tensor, *, check_finite: bool = True, min_classes: int = 2) -> None:
    """Type, dtype and shape from the metadata; with ``check_finite`` also a pass for NaN/+inf
    (-inf is a legitimate mask value). The losses check finiteness from values they compute
    anyway and call this with ``check_finite=True`` only to name the culprit."""
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < min_classes:
        raise InputError(
            f"{name} must have shape [..., C] with C >= {min_classes} classes, got {tuple(logits.shape)}"
        )
    if check_finite:
        # -inf is a legitimate mask value; NaN and +inf make every softmax undefined.
        # One fast pass in the common all-finite case, the precise count only on failure.
        if not bool(torch.isfinite(logits).all()):
            bad = torch.isnan(logits) | (logits == math.inf)
            if bool(bad.any()):
                raise InputError(f"{name} contains {int(bad.sum())} NaN or +inf value(s)")


def check_labels(
    labels: torch.Tensor, logits: torch.Tensor, ignore_index: int, *, logits_name: str = "teacher_logits"
) -> None:
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise InputError(
            f"labels shape {tuple(labels.shape)} does not match {logits_name} shape "
            f"{tuple(logits.shape)} (expected labels of shape {tuple(logits.shape[:-1])})"
        )
    num_classes = logits.shape[-1]
    if labels.numel() == 0:
        return
    # min and max of the [N] labels with ignored rows mapped to 0: one pass, one host sync
    used = torch.where(labels != ignore_index, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    low, high = torch.aminmax(used)
    low, high = torch.stack([low, high]).tolist()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InputError(
            f"label {bad} is out of range for {num_classes} classes "
            f"(valid labels are 0..{num_classes - 1}, or ignore_index={ignore_index})"
        )


def check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (
                " (the class/vocabulary dimension differs: crop both to the shared vocabulary "
                "explicitly, e.g. the LM pipeline's crop_vocab option)"
            )
        raise InputError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"teacher_logits shape {tuple(teacher_logits.shape)}{hint}"
        )


def check_alpha(alpha: float, name: str = "alpha") -> float:
    alpha = _as_float(alpha, name)
    if not 0.0 < alpha < 1.0:
        raise InputError(f"{name} must lie strictly between 0 and 1, got {alpha}")
    return alpha


def check_temperature(temperature: float) -> float:
    temperature = _as_float(temperature, "temperature")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise InputError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_unit_interval(value: float, name: str, *, closed: bool = True) -> float:
    value = _as_float(value, name)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise InputError(f"{name} must lie in {interval}, got {value}")
    return value


def _as_float(value: float, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InputError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise InputError(f"{name} must be a number, got NaN")
    return value
