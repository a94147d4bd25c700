"""LoCa: logit calibration of a teacher's distribution (Yang, Wu, Yang, ECAI 2024).

For a *mis-instructed* row (the teacher's top class is not the label ``gt``) LoCa
rescales every non-target probability by one factor ``s`` and gives the rest of
the mass to the label::

    p_loca_i  = s * p_i                 (i != gt)
    p_loca_gt = 1 - s * (1 - p_gt)
    s = alpha / (1 - p_gt + p_k)        (p_k: the largest non-target probability)

so the label wins by exactly ``1 - alpha`` while the ratios among the other
classes (the teacher's "dark knowledge") stay untouched. Rows the teacher already
gets right (ties included) are left as they are.

Everything here is written in log space over float32 (float64 inputs stay
float64): ``1 - p_gt`` is taken as the log-sum-exp of the non-target log-probs
where it matters, so logits of +-1e4 or fp16/bf16 inputs produce no NaN or inf.
The cost is O(C) per row and there are no parameters; the teacher is detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_alpha, check_labels, check_logits, check_temperature, compute_dtype
from .errors import InputError

__all__ = [
    "CalibrationTerms",
    "calibration_terms",
    "loca_calibrate",
    "loca_calibrate_sparse",
    "loca_log_calibrate",
    "misinstruction_mask",
    "misinstruction_rate",
]


def misinstruction_mask(
    teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *, validate: bool = True
) -> torch.Tensor:
    """Bool tensor of shape ``labels.shape``: True where the teacher's top class is not the label.

    A tie between the label and another class counts as right. Rows whose label is
    ``ignore_index`` are False. The answer does not depend on any temperature, since
    the argmax of ``softmax(z / T)`` is the argmax of ``z``.
    """
    if validate:
        check_logits("teacher_logits", teacher_logits)
        check_labels(labels, teacher_logits, ignore_index)
    with torch.no_grad():
        logits = teacher_logits.detach()
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        label_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        return valid & (label_logit < logits.amax(dim=-1))


def misinstruction_rate(
    teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[int, int]:
    """``(mis-instructed rows, valid rows)``: sum these over a dataset to get the rate."""
    mask = misinstruction_mask(teacher_logits, labels, ignore_index)
    return int(mask.sum()), int((labels != ignore_index).sum())


@dataclass(frozen=True)
class CalibrationTerms:
    """Per-row quantities of the calibration, all of shape ``labels.shape``.

    ``log_scale`` is log s (0 where the row is left unchanged), ``log_target_prob``
    is log p_loca_gt (the teacher's own log p_gt where unchanged), ``changed`` marks
    the rows that are calibrated and ``log_nontarget_mass`` is log(1 - p_gt) of the
    *uncalibrated* teacher.
    """

    log_scale: torch.Tensor
    log_target_prob: torch.Tensor
    changed: torch.Tensor
    log_nontarget_mass: torch.Tensor
    safe_labels: torch.Tensor


def calibration_terms(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    *,
    ignore_index: int = -100,
    calibrate_correct: bool = False,
    changed: torch.Tensor | None = None,
    log_p_top: torch.Tensor | None = None,
) -> CalibrationTerms:
    """The scale factor and new label probability of every row, from teacher log-probs.

    ``log_probs`` must already be normalised (a log_softmax). ``changed`` and
    ``log_p_top`` may pass the mis-instruction mask (computed on the raw logits) and
    the teacher's largest log-probability (recomputed from ``log_probs`` otherwise). With
    ``calibrate_correct`` every valid row is calibrated to margin ``1 - alpha`` (the
    ablation), using the largest *non-target* probability as p_k.
    """
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    index = safe_labels.unsqueeze(-1)
    log_p_gt = log_probs.gather(-1, index).squeeze(-1)

    if calibrate_correct:
        # p_gt may be ~1 here, so 1 - p_gt must not be formed by subtraction.
        nontarget = log_probs.scatter(-1, index, -math.inf)
        log_p_k = nontarget.amax(dim=-1)
        log_m = torch.logsumexp(nontarget, dim=-1)
        # A row whose non-target mass underflowed to 0 is already one-hot: leave it.
        changed = valid & torch.isfinite(log_m)
    else:
        # On a mis-instructed row the teacher's top class is the largest non-target one.
        log_p_k = log_probs.amax(dim=-1) if log_p_top is None else log_p_top
        if changed is None:
            changed = valid & (log_p_gt < log_p_k)
        # On mis-instructed rows p_gt < 1/2, so log1p(-p_gt) is accurate.
        log_m = torch.log1p(-log_p_gt.exp().clamp(max=0.5))

    log_denominator = torch.logaddexp(log_m, log_p_k)  # log(1 - p_gt + p_k)
    log_scale = math.log(alpha) - log_denominator
    # p_loca_gt = 1 - s(1 - p_gt) = ((1 - alpha)(1 - p_gt) + p_k) / (1 - p_gt + p_k): no cancellation.
    log_new_gt = torch.logaddexp(math.log1p(-alpha) + log_m, log_p_k) - log_denominator

    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    return CalibrationTerms(
        log_scale=torch.where(changed, log_scale, zero),
        log_target_prob=torch.where(changed, log_new_gt, log_p_gt),
        changed=changed,
        log_nontarget_mass=log_m,
        safe_labels=safe_labels,
    )


def _mis_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mis-instruction mask, top logit and label logit, from the raw (untempered) logits."""
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    top_logit = logits.amax(dim=-1)  # amax: much faster than max-with-indices on the CPU
    label_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return valid & (label_logit < top_logit), top_logit, label_logit


def _apply_log(log_p: torch.Tensor, terms: CalibrationTerms) -> torch.Tensor:
    """Calibrate ``log_p`` in place: + log s on every entry, then the new label entry."""
    log_p.add_(terms.log_scale.unsqueeze(-1))  # + 0 on unchanged rows: bit-exact
    log_p.scatter_(-1, terms.safe_labels.unsqueeze(-1), terms.log_target_prob.unsqueeze(-1))
    return log_p


def _loca_log(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int,
    calibrate_correct: bool,
    calibrate_before_temperature: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated log-probs, changed-row mask); no validation, no autograd."""
    logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
    calib_temperature = 1.0 if calibrate_before_temperature else temperature
    log_p = torch.log_softmax(logits / calib_temperature, dim=-1)
    if calibrate_correct:
        terms = calibration_terms(log_p, labels, alpha, ignore_index=ignore_index, calibrate_correct=True)
    else:
        # The mask comes from the raw logits (T-invariant, exact ties); p_k from log_p.amax,
        # which stays exact where (z_k - z_gt) / T would lose digits for huge logits.
        changed, _, _ = _mis_rows(logits, labels, ignore_index)
        terms = calibration_terms(log_p, labels, alpha, ignore_index=ignore_index, changed=changed)
    calibrated = _apply_log(log_p, terms)
    if calib_temperature == temperature:
        return calibrated, terms.changed
    # Ablation: temper after calibrating, p_loca^(1/T) renormalised; unchanged rows stay softmax(z/T).
    tempered = torch.log_softmax(calibrated / temperature, dim=-1)
    plain = torch.log_softmax(logits / temperature, dim=-1)
    return torch.where(terms.changed.unsqueeze(-1), tempered, plain), terms.changed


def _validate(teacher_logits, labels, alpha, temperature, ignore_index) -> tuple[float, float]:
    check_logits("teacher_logits", teacher_logits)
    check_labels(labels, teacher_logits, ignore_index)
    return check_alpha(alpha), check_temperature(temperature)


def loca_log_calibrate(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Log of :func:`loca_calibrate`: the calibrated teacher log-probabilities.

    This is what the losses use: the non-target entries are ``log p_i + log s``,
    exact in log space even where ``p_i`` underflows in linear space. Arguments as
    in :func:`loca_calibrate`.
    """
    if validate:
        alpha, temperature = _validate(teacher_logits, labels, alpha, temperature, ignore_index)
    with torch.no_grad():
        return _loca_log(
            teacher_logits, labels, alpha, temperature, ignore_index,
            calibrate_correct, calibrate_before_temperature,
        )[0]


def loca_calibrate(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """LoCa-calibrated probabilities of ``softmax(teacher_logits / temperature)``.

    Args:
        teacher_logits: ``[..., C]`` logits of any floating dtype (the math runs in float32).
        labels: ``[...]`` integer class indices; ``ignore_index`` marks rows to leave alone.
        alpha: the calibration strength in (0, 1); the label's margin over the
            runner-up becomes exactly ``1 - alpha``. The paper's stable region is [0.9, 1).
        temperature: softmax temperature, applied before calibrating (the default).
        ignore_index: label value of rows that are neither calibrated nor checked.
        calibrate_correct: ablation; also rescale rows the teacher gets right, so every row
            has margin ``1 - alpha`` (p_k is then the largest non-target probability).
        calibrate_before_temperature: ablation; calibrate ``softmax(z)`` and temper afterwards
            (``p_loca ** (1/T)``, renormalised). Identical to the default at T = 1.
        validate: check shapes, dtypes, label range and NaN (one host sync); turn off in hot loops
            whose inputs are already known to be good.

    Returns:
        float32 probabilities (float64 for float64 input) of the logits' shape. Rows that are
        not changed are exactly ``torch.softmax(teacher_logits.float() / temperature, -1)``.
    """
    if validate:
        alpha, temperature = _validate(teacher_logits, labels, alpha, temperature, ignore_index)
    with torch.no_grad():
        log_target, changed = _loca_log(
            teacher_logits, labels, alpha, temperature, ignore_index,
            calibrate_correct, calibrate_before_temperature,
        )
        logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
        plain = torch.softmax(logits / temperature, dim=-1)
        return torch.where(changed.unsqueeze(-1), log_target.exp(), plain)


def loca_calibrate_sparse(
    topk_log_probs: torch.Tensor,
    topk_indices: torch.Tensor,
    label_log_probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.9,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoCa on a cached top-k teacher, exact without the full distribution.

    A top-k cache (offline teacher logits) keeps, per position, the k largest
    *normalised* teacher log-probabilities ``topk_log_probs [..., k]`` (sorted,
    largest first, already at the loss temperature), their ``topk_indices`` and the
    label token's own log-probability ``label_log_probs [...]`` (known even when the
    label is outside the top k). That is all the calibration needs: p_gt, p_k (the
    top entry) and 1 - p_gt.

    Returns ``(calibrated_topk_log_probs, calibrated_label_log_probs, log_scale)``:
    stored entries other than the label move by ``log_scale`` (= log s, 0 on rows
    left unchanged), the label's entry becomes log p_loca_gt, and the unstored
    tail mass scales by s as well (``log_scale`` says by how much).
    """
    check_logits("topk_log_probs", topk_log_probs, min_classes=1)
    if tuple(topk_indices.shape) != tuple(topk_log_probs.shape):
        raise InputError(
            f"topk_indices shape {tuple(topk_indices.shape)} does not match topk_log_probs "
            f"shape {tuple(topk_log_probs.shape)}"
        )
    for name, tensor in (("label_log_probs", label_log_probs), ("labels", labels)):
        if tuple(tensor.shape) != tuple(topk_log_probs.shape[:-1]):
            raise InputError(
                f"{name} shape {tuple(tensor.shape)} must be the top-k cache's leading shape "
                f"{tuple(topk_log_probs.shape[:-1])}"
            )
    alpha = check_alpha(alpha)
    with torch.no_grad():
        dtype = compute_dtype(topk_log_probs)
        log_top = topk_log_probs.to(dtype)
        log_p_gt = label_log_probs.to(dtype)
        valid = labels != ignore_index
        log_p_k = log_top[..., 0]
        changed = valid & (log_p_gt < log_p_k)
        log_m = torch.log1p(-log_p_gt.exp().clamp(max=0.5))
        log_denominator = torch.logaddexp(log_m, log_p_k)
        log_scale = torch.where(changed, math.log(alpha) - log_denominator, torch.zeros_like(log_m))
        log_new_gt = torch.logaddexp(math.log1p(-alpha) + log_m, log_p_k) - log_denominator
        new_label = torch.where(changed, log_new_gt, log_p_gt)
        is_label = topk_indices == labels.unsqueeze(-1)
        calibrated = torch.where(is_label, new_label.unsqueeze(-1), log_top + log_scale.unsqueeze(-1))
        return calibrated, new_label, log_scale
