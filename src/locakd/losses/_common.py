"""Helpers shared by the losses: log-space KL rows, reductions, input checks, tempered log-probs.

Everything here is a pure function over tensors; the losses (:mod:`.kd`, :mod:`.dkd`,
:mod:`.token`, :mod:`.linear`) import these instead of keeping their own copies.
"""

from __future__ import annotations

import torch

from .._validation import check_labels, check_logits, check_same_shape, compute_dtype
from ..errors import InputError
from .targets import standardize_logits, teacher_log_target

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


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS, *, name: str = "reduction") -> None:
    if reduction not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {reduction!r}")


def check_normalizer(normalizer: float | torch.Tensor | None) -> None:
    """A number normaliser must be > 0 (a tensor one is the caller's: checking it would sync)."""
    if normalizer is not None and not isinstance(normalizer, torch.Tensor) and not normalizer > 0:
        raise InputError(f"normalizer must be > 0, got {normalizer}")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def reduce_rows(
    per_row: torch.Tensor,
    valid: torch.Tensor | None,
    reduction: str,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid rows (or sum / ``normalizer``), sum, or per-row values (0 on ignored rows)."""
    check_reduction(reduction)
    if valid is not None:
        per_row = torch.where(valid, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    check_normalizer(normalizer)
    if normalizer is None:
        count = per_row.numel() if valid is None else valid.sum()
        normalizer = torch.clamp(torch.as_tensor(count, device=per_row.device, dtype=per_row.dtype), min=1)
    return total / normalizer


def validate_pair(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    *,
    finite: bool = True,
) -> None:
    """Type, shape, dtype and label-range checks of a (student, teacher, labels) triple, all on
    metadata and the [N] labels; with ``finite`` also a NaN/+inf pass over both logits (the fused
    losses leave it out: they detect non-finite input from the loss rows they compute)."""
    check_logits("student_logits", student_logits, check_finite=finite)
    check_logits("teacher_logits", teacher_logits, check_finite=finite)
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

    ``target_options`` go to :func:`~locakd.losses.targets.teacher_log_target` (transform,
    loca_alpha, ...); ``standardize`` applies to the student as well. Shared by KD and DKD.
    """
    log_target, row_weight = teacher_log_target(teacher_logits, labels, temperature, **target_options)
    student = student_logits.to(compute_dtype(student_logits))
    if target_options.get("standardize"):
        student = standardize_logits(student)
    return torch.log_softmax(student / temperature, dim=-1), log_target, row_weight
