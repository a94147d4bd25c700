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
from typing import NamedTuple

import torch

from ._validation import check_alpha, check_labels, check_logits, check_temperature, compute_dtype
from .errors import InputError

__all__ = [
    "CalibrationTerms",
    "LocaTarget",
    "MisinstructedRows",
    "apply_log_calibration",
    "calibration_terms",
    "loca_calibrate",
    "loca_calibrate_sparse",
    "loca_log_calibrate",
    "loca_log_target",
    "misinstruction_mask",
    "misinstruction_rate",
    "misinstruction_rows",
    "scale_terms",
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
        return misinstruction_rows(teacher_logits.detach(), labels, ignore_index).mask


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


class MisinstructedRows(NamedTuple):
    """What :func:`misinstruction_rows` finds, per row (shape ``labels.shape``)."""

    mask: torch.Tensor  # True where the teacher's top class is not the (valid) label
    top_logit: torch.Tensor  # the largest logit of the row
    label_logit: torch.Tensor  # the label's logit (of class 0 on ignored rows)
    safe_labels: torch.Tensor  # the labels with ignored rows mapped to 0 (safe to gather with)


def misinstruction_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> MisinstructedRows:
    """The mis-instruction mask with the row quantities it is computed from (no validation).

    Works on the raw (untempered) logits, so ties are exact and the answer does not depend on
    any temperature. ``misinstruction_mask`` is its checked, public front; the losses use this
    to reuse the top and label logits.
    """
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    top_logit = logits.amax(dim=-1)  # amax: much faster than max-with-indices on the CPU
    label_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return MisinstructedRows(valid & (label_logit < top_logit), top_logit, label_logit, safe_labels)


def scale_terms(
    log_p_gt: torch.Tensor,
    log_p_top: torch.Tensor,
    changed: torch.Tensor,
    alpha: float,
    *,
    log_nontarget_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The calibration formula on per-row quantities: ``(log s, log p_loca_gt, log(1 - p_gt))``.

    ``log_p_gt`` is the teacher's log-probability of the label, ``log_p_top`` that of its top
    non-target class (p_k) and ``changed`` the rows to calibrate; rows not changed get
    ``log s = 0`` and keep ``log p_gt``. ``log_nontarget_mass`` (log(1 - p_gt)) may be passed
    when known exactly; otherwise it is ``log1p(-p_gt)``, accurate on mis-instructed rows, where
    p_gt < 1/2. Every LoCa in the package (dense, sparse top-k, the fused loss kernels) goes
    through this one function.
    """
    if log_nontarget_mass is None:
        log_nontarget_mass = torch.log1p(-log_p_gt.exp().clamp(max=0.5))
    log_m = log_nontarget_mass
    log_denominator = torch.logaddexp(log_m, log_p_top)  # log(1 - p_gt + p_k)
    log_scale = math.log(alpha) - log_denominator
    # p_loca_gt = 1 - s(1 - p_gt) = ((1 - alpha)(1 - p_gt) + p_k) / (1 - p_gt + p_k): no cancellation.
    log_new_gt = torch.logaddexp(math.log1p(-alpha) + log_m, log_p_top) - log_denominator
    zero = torch.zeros((), dtype=log_scale.dtype, device=log_scale.device)
    return torch.where(changed, log_scale, zero), torch.where(changed, log_new_gt, log_p_gt), log_m


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

    log_m = None
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
    log_scale, log_new_gt, log_m = scale_terms(log_p_gt, log_p_k, changed, alpha, log_nontarget_mass=log_m)
    return CalibrationTerms(
        log_scale=log_scale,
        log_target_prob=log_new_gt,
        changed=changed,
        log_nontarget_mass=log_m,
        safe_labels=safe_labels,
    )


def apply_log_calibration(log_p: torch.Tensor, terms: CalibrationTerms) -> torch.Tensor:
    """Calibrate the normalised log-probs ``log_p`` in place: + log s on every entry, then the
    new label entry. Returns ``log_p``."""
    log_p.add_(terms.log_scale.unsqueeze(-1))  # + 0 on unchanged rows: bit-exact
    log_p.scatter_(-1, terms.safe_labels.unsqueeze(-1), terms.log_target_prob.unsqueeze(-1))
    return log_p


class LocaTarget(NamedTuple):
    """A calibrated teacher: its log-probabilities and the rows the calibration changed."""

    log_probs: torch.Tensor
    changed: torch.Tensor


def loca_log_target(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
) -> LocaTarget:
    """Calibrated teacher log-probabilities and the changed-row mask, for the losses.

    The unchecked core of :func:`loca_log_calibrate`: no validation (the caller has checked
    the inputs, or chose not to) and no autograd; the result is float32 (float64 input stays
    float64). Arguments as in :func:`loca_calibrate`.
    """
    with torch.no_grad():
        logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
        calib_temperature = 1.0 if calibrate_before_temperature else temperature
        log_p = torch.log_softmax(logits / calib_temperature, dim=-1)
        if calibrate_correct:
            terms = calibration_terms(log_p, labels, alpha, ignore_index=ignore_index, calibrate_correct=True)
        else:
            # The mask comes from the raw logits (T-invariant, exact ties); p_k from log_p.amax,
            # which stays exact where (z_k - z_gt) / T would lose digits for huge logits.
            changed = misinstruction_rows(logits, labels, ignore_index).mask
            terms = calibration_terms(log_p, labels, alpha, ignore_index=ignore_index, changed=changed)
        calibrated = apply_log_calibration(log_p, terms)
        if calib_temperature == temperature:
            return LocaTarget(calibrated, terms.changed)
        # Ablation: temper after calibrating, p_loca^(1/T) renormalised; unchanged rows stay softmax(z/T).
        tempered = torch.log_softmax(calibrated / temperature, dim=-1)
        plain = torch.log_softmax(logits / temperature, dim=-1)
        return LocaTarget(torch.where(terms.changed.unsqueeze(-1), tempered, plain), terms.changed)


# The former private names, kept for one release for scripts outside the package that import
# them (benchmarks/bench_overhead.py); the package itself uses only the public names above.
_mis_rows = misinstruction_rows
_apply_log = apply_log_calibration
_loca_log = loca_log_target


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
    return loca_log_target(
        teacher_logits, labels, alpha, temperature, ignore_index,
        calibrate_correct, calibrate_before_temperature,
    ).log_probs


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
        log_target, changed = loca_log_target(
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
        log_p_k = log_top[..., 0]  # the teacher's top class: p_k on a mis-instructed row
        changed = (labels != ignore_index) & (log_p_gt < log_p_k)
        log_scale, new_label, _ = scale_terms(log_p_gt, log_p_k, changed, alpha)
        is_label = topk_indices == labels.unsqueeze(-1)
        calibrated = torch.where(is_label, new_label.unsqueeze(-1), log_top + log_scale.unsqueeze(-1))
        return calibrated, new_label, log_scale
