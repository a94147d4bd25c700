"""Decoupled KD (Zhao et al., CVPR 2022) and DKD+LoCa.

KD splits into TCKD (KL of the binary target-vs-rest distributions) and NCKD (KL
of the distributions over the non-target classes, each renormalised):

    KD = TCKD + (1 - p_gt) * NCKD          DKD = a * TCKD + b * NCKD

LoCa keeps the non-target ratios, so NCKD is unchanged and only the teacher's
binary distribution moves to ``[1 - s(1 - p_gt), s(1 - p_gt)]``. Here both parts are
computed exactly in log space from any teacher target (plain, LoCa or a baseline),
instead of mdistiller's ``-1000 * gt_mask`` approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_logits, check_temperature
from ..errors import InputError
from ._common import floor_log_probs, reduce_rows, tempered_log_probs, validate_pair
from .targets import resolve_transform


@dataclass(frozen=True)
class KDDecomposition:
    """Per-row TCKD, NCKD and the teacher's non-target mass ``1 - p_gt`` (of the target used)."""

    tckd: torch.Tensor
    nckd: torch.Tensor
    teacher_nontarget_mass: torch.Tensor


def _binary_and_rest(log_probs: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p_gt, log(1 - p_gt), non-target log-probs with the label entry at -inf)."""
    log_gt = log_probs.gather(-1, index).squeeze(-1)
    nontarget = log_probs.scatter(-1, index, -math.inf)
    log_rest = torch.logsumexp(nontarget, dim=-1)
    return log_gt, log_rest, nontarget


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b), 0 where a == 0 (also where b == 0 too)."""
    log_a = floor_log_probs(log_a)
    return log_a.exp() * (log_a - floor_log_probs(log_b))


def decompose_kd(
    log_student: torch.Tensor, log_target: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> KDDecomposition:
    """TCKD and NCKD per row from student and target log-probabilities (same temperature)."""
    safe = torch.where(labels != ignore_index, labels, torch.zeros_like(labels)).unsqueeze(-1)
    s_gt, s_rest, s_nontarget = _binary_and_rest(log_student, safe)
    t_gt, t_rest, t_nontarget = _binary_and_rest(log_target, safe)
    tckd = _xlogy_diff(t_gt, s_gt) + _xlogy_diff(t_rest, s_rest)
    # Non-target distributions, renormalised; the label entry is -inf in both (contributes 0).
    # A teacher row with zero non-target mass (one-hot target) has no non-target
    # distribution: its entries are set to -inf so that NCKD, and its gradient, are 0 there.
    has_rest = torch.isfinite(t_rest).unsqueeze(-1)
    t_cond = torch.where(has_rest, t_nontarget - t_rest.unsqueeze(-1), -math.inf)
    s_cond = s_nontarget - s_rest.unsqueeze(-1)
    nckd = _xlogy_diff(t_cond, s_cond).sum(dim=-1)
    return KDDecomposition(tckd=tckd, nckd=nckd, teacher_nontarget_mass=t_rest.exp())


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    loca_alpha: float | None = None,
    ignore_index: int = -100,
    *,
    target_transform: str | None = None,
    smoothing: float = 0.1,
    standardize: bool = False,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Decoupled KD: ``T^2 * (alpha * TCKD + beta * NCKD)``, mean over valid rows.

    With ``loca_alpha`` the teacher target is LoCa-calibrated first (DKD+LoCa): only
    the binary target/non-target part changes. ``alpha`` and ``beta`` are DKD's
    weights (not LoCa's alpha); the warm-up ramp of the recipe belongs to the trainer.
    Other arguments as in :func:`locakd.kd_loss`.
    """
    transform = resolve_transform(target_transform, loca_alpha)
    if validate:
        if labels is None:
            raise InputError("dkd_loss needs labels (DKD splits the target class from the rest)")
        validate_pair(student_logits, teacher_logits, labels, ignore_index, finite=False)
        if not transform.fused:
            # a baseline replaces mis-instructed target rows, which could hide a NaN teacher row
            check_logits("teacher_logits", teacher_logits)
        temperature = check_temperature(temperature)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise InputError(f"DKD weight {name} must be a finite number >= 0, got {value!r}")
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
    )
    parts = decompose_kd(log_student, log_target, labels, ignore_index)
    per_row = (alpha * parts.tckd + beta * parts.nckd) * (temperature**2)
    if validate and not bool(torch.isfinite(per_row).all()):
        # NaN/+inf input shows in the rows (ignored ones included): only now look for the culprit
        validate_pair(student_logits, teacher_logits, labels, ignore_index)
    if row_weight is not None:
        per_row = per_row * row_weight
    return reduce_rows(per_row, labels != ignore_index, reduction, normalizer)
