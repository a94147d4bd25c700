"""Hinton KD and KD+LoCa: ``T^2 * KL(target || softmax(z_s / T))`` with the true KL."""

from __future__ import annotations

import torch

from .._validation import check_labels, check_logits, check_same_shape, check_temperature, compute_dtype
from ..errors import InputError
from .targets import resolve_transform, standardize_logits, teacher_log_target

REDUCTIONS = ("mean", "sum", "none")


def floor_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Replace -inf (masked entries) by a huge finite negative number.

    ``exp`` of the floor is exactly 0, so values are unchanged, but differences and
    mixtures of two masked entries stay finite and their gradients are 0, not NaN.
    """
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min / 4)


def kl_rows(log_target: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
    """Per-row KL(target || student) from log-probabilities, 0 * log 0 taken as 0.

    Entries that are -inf in the target (zero mass) contribute nothing, also where
    the student masks them too.
    """
    log_target = floor_log_probs(log_target)
    return (log_target.exp() * (log_target - floor_log_probs(log_student))).sum(dim=-1)


def reduce_rows(
    per_row: torch.Tensor,
    valid: torch.Tensor | None,
    reduction: str,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid rows (or sum / ``normalizer``), sum, or per-row values (0 on ignored rows)."""
    if valid is not None:
        per_row = torch.where(valid, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise InputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is None:
        count = per_row.numel() if valid is None else valid.sum()
        normalizer = torch.clamp(torch.as_tensor(count, device=per_row.device, dtype=per_row.dtype), min=1)
    elif not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise InputError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


def validate_pair(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> None:
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape(student_logits, teacher_logits)
    if labels is not None:
        check_labels(labels, teacher_logits, ignore_index)


def tempered_log_probs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    **target_options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(log_student, log_target, row_weight)`` at ``temperature``, both in float32.

    ``target_options`` go to :func:`teacher_log_target` (transform, loca_alpha, ...);
    ``standardize`` applies to the student as well. Shared by KD and DKD.
    """
    log_target, row_weight = teacher_log_target(teacher_logits, labels, temperature, **target_options)
    student = student_logits.to(compute_dtype(student_logits))
    if target_options.get("standardize"):
        student = standardize_logits(student)
    return torch.log_softmax(student / temperature, dim=-1), log_target, row_weight


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    labels: torch.Tensor | None = None,
    loca_alpha: float | None = None,
    ignore_index: int = -100,
    *,
    target_transform: str | None = None,
    smoothing: float = 0.1,
    standardize: bool = False,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Knowledge-distillation loss, optionally with a LoCa-calibrated teacher (KD+LoCa).

    ``T^2 * KL(target || softmax(student_logits / T))``, the true KL (so a perfect
    match gives 0), averaged over valid rows. With ``labels`` and ``loca_alpha`` the
    target is ``loca_calibrate(teacher_logits, labels, loca_alpha, T)``.

    Args:
        student_logits, teacher_logits: ``[..., C]`` logits of the same shape, any float dtype.
        temperature: the softmax temperature T (> 0).
        labels: ``[...]`` class indices; rows equal to ``ignore_index`` are skipped. Needed by
            LoCa and the other target transforms.
        loca_alpha: LoCa strength in (0, 1); ``None`` gives plain KD.
        target_transform: ``"none" | "loca" | "ka_shift" | "ka_smooth" | "skip"`` (see
            :mod:`locakd.losses.targets`); defaults to ``"loca"`` when ``loca_alpha`` is set.
        smoothing: epsilon of the ``ka_smooth`` baseline.
        standardize: z-score both logit vectors before the temperature (logit standardisation).
        calibrate_correct, calibrate_before_temperature: LoCa ablations (see ``loca_calibrate``).
        reduction: ``"mean"`` (over valid rows, or the sum divided by ``normalizer``), ``"sum"``
            or ``"none"`` (per-row losses, 0 on ignored rows).
        normalizer: divide the summed loss by this instead of the local number of valid rows
            (e.g. the valid-row count of a whole accumulated, all-rank batch).
        validate: check the inputs (shapes, dtypes, label range, NaN) first.
    """
    transform = resolve_transform(target_transform, loca_alpha)
    if validate:
        validate_pair(student_logits, teacher_logits, labels, ignore_index)
        temperature = check_temperature(temperature)
    log_student, log_target, row_weight = tempered_log_probs(
        student_logits,
        teacher_logits,
        labels,
        temperature,
        transform=transform,
        loca_alpha=loca_alpha,
        smoothing=smoothing,
        ignore_index=ignore_index,
        standardize=standardize,
        calibrate_correct=calibrate_correct,
        calibrate_before_temperature=calibrate_before_temperature,
    )
    per_row = kl_rows(log_target, log_student) * (temperature**2)
    if row_weight is not None:
        per_row = per_row * row_weight
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(per_row, valid, reduction, normalizer)
