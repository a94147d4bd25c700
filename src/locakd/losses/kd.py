"""Hinton KD and KD+LoCa: ``T^2 * KL(target || softmax(z_s / T))`` with the true KL."""

from __future__ import annotations

import torch

from .._validation import check_temperature
from ._common import kl_rows, reduce_rows, tempered_log_probs, validate_pair
from .targets import resolve_transform


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
        target_transform: a name from :data:`~locakd.losses.targets.TARGET_TRANSFORMS` (``none``,
            ``loca``, ``ka_shift``, ``ka_smooth``, ``skip``; see :mod:`locakd.losses.targets`);
            defaults to ``"loca"`` when ``loca_alpha`` is set.
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
