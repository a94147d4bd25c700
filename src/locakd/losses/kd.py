"""Hinton KD and KD+LoCa: ``T^2 * KL(target || softmax(z_s / T))`` with the true KL."""

from __future__ import annotations

import torch

from .._validation import check_alpha, check_logits, check_temperature
from ..errors import InputError
from ._common import check_normalizer, check_reduction, validate_pair
from ._fused import RowsPlan, fused_rows
from .targets import resolve_transform, standardize_logits, teacher_log_target
from .token import REGISTRY, DivergenceOptions

_FORWARD_KL = REGISTRY["forward_kl"]


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
        validate: check shapes, dtypes and the label range first (metadata and the [N] labels
            only); NaN/+inf in the logits is detected from the loss rows the kernel computes
            anyway, then diagnosed precisely, so the check adds no pass over the logits.

    The loss and its gradient are computed together in the forward pass (see
    :mod:`locakd.losses._fused`); the backward only scales the stored gradient, so a second
    backward through the same graph raises.
    """
    entry = resolve_transform(target_transform, loca_alpha)
    check_reduction(reduction)
    if validate:
        validate_pair(student_logits, teacher_logits, labels, ignore_index, finite=False)
        temperature = check_temperature(temperature)
    if reduction == "mean":
        check_normalizer(normalizer)
    if entry.needs_labels and labels is None:
        raise InputError(f"target_transform {entry.name!r} needs labels")
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.detach().reshape(-1, classes)
    flat_labels = None if labels is None else labels.reshape(-1)
    if standardize:
        student = standardize_logits(student)
        teacher = standardize_logits(teacher)
    row_weight = None
    if entry.fused and not (calibrate_correct or calibrate_before_temperature):
        # plain or LoCa target: built block by block inside the kernel from the teacher logits
        alpha = check_alpha(0.9 if loca_alpha is None else loca_alpha, "loca_alpha") if entry.loca else None
        plan_target, loca = "logits", alpha
    else:  # a baseline transform or a LoCa ablation: the log-target first, then the same kernel
        if validate:  # a replaced target row could hide a NaN teacher row: check the teacher itself
            check_logits("teacher_logits", teacher_logits)
        teacher, row_weight = teacher_log_target(  # teacher is already standardised above when asked
            teacher, flat_labels, temperature, transform=entry, loca_alpha=loca_alpha, smoothing=smoothing,
            ignore_index=ignore_index, calibrate_correct=calibrate_correct,
            calibrate_before_temperature=calibrate_before_temperature,
        )
        plan_target, loca = "log_probs", None
    plan = RowsPlan(
        divergence=_FORWARD_KL,
        options=DivergenceOptions(),
        temperature=temperature,
        loca_alpha=loca,
        ignore_index=ignore_index,
        target=plan_target,
        per_row=reduction == "none",
        validate=validate,
    )
    scale, divide_by = temperature**2, None
    if reduction == "mean":
        if normalizer is None:
            count = student.shape[0] if flat_labels is None else int((flat_labels != ignore_index).sum())
            scale /= max(count, 1)
        elif isinstance(normalizer, torch.Tensor):
            divide_by = normalizer  # a tensor stays a tensor (no host sync): divided by autograd
        else:
            scale /= float(normalizer)
    checked = (("student_logits", student_logits), ("teacher_logits", teacher_logits))
    result = fused_rows(student, teacher, flat_labels, plan, scale=scale, row_coef=row_weight, checked=checked)
    if reduction == "none":
        return result.reshape(student_logits.shape[:-1])
    return result if divide_by is None else result / divide_by
