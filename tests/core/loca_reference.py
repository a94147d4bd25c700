"""A plain float64 reference of LoCa and of every loss, written from docs/loca-method.md.

Nothing here imports locakd: the tests compare the library against these functions.
Everything runs in float64 on the exact values of the inputs (``x.double()`` is exact
for float16, bfloat16 and float32), so the only differences left are the library's
float32 rounding.

Two versions of the calibration are given and cross-checked in the tests:

* :func:`calibrate_rows_numpy` is the literal translation of the paper's equations,
  one row at a time in numpy, in linear probability space;
* :func:`loca_log_target` is a vectorised log-space version (needed for large
  vocabularies, for tiny probabilities and for the loss references), differentiable
  nowhere because the teacher never carries a gradient.

The loss references take the student logits as a tensor and keep autograd, so a test
can compare the library's student gradient with the float64 one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE = -100


# --------------------------------------------------------------------------- basics
def log_softmax64(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / T) in float64, written out (max-shifted log-sum-exp)."""
    x = z.double() / temperature
    m = x.amax(dim=-1, keepdim=True)
    return x - m - torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))


def softmax64(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.exp(log_softmax64(z, temperature))


def logsumexp64(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log sum exp along ``dim``; rows that are all -inf give -inf."""
    m = x.amax(dim=dim, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (torch.log(torch.exp(x - m_safe).sum(dim=dim, keepdim=True)) + m_safe).squeeze(dim)


def standardize64(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al. 2024): (z - mean) / (std + eps), std with n - 1."""
    z = z.double()
    n = z.shape[-1]
    mean = z.sum(dim=-1, keepdim=True) / n
    var = ((z - mean) ** 2).sum(dim=-1, keepdim=True) / (n - 1)
    return (z - mean) / (torch.sqrt(var) + eps)


def target_mask(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE) -> torch.Tensor:
    """Bool [..., C], True at the label entry of each valid row (all False on ignored rows)."""
    classes = torch.arange(num_classes)
    return (labels.unsqueeze(-1) == classes) & (labels != ignore_index).unsqueeze(-1)


def mis_mask(teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """True where argmax z != gt; a tie between gt and the top logit counts as right; ignored rows False."""
    z = teacher_logits.double()
    tmask = target_mask(labels, z.shape[-1], ignore_index)
    z_gt = torch.where(tmask, z, torch.full_like(z, -math.inf)).amax(dim=-1)
    return (labels != ignore_index) & (z_gt < z.amax(dim=-1))


# --------------------------------------------------------------------------- calibration
def calibrate_rows_numpy(
    p: np.ndarray, labels: np.ndarray, mis: np.ndarray, alpha: float, calibrate_correct: bool = False
) -> np.ndarray:
    """Paper Eq. 1-6, row by row: p_loca_i = s p_i (i != gt), p_loca_gt = 1 - s (1 - p_gt),
    s = alpha / (1 - p_gt + p_k). ``p`` is [N, C] float64, ``mis`` the mis-instructed rows.
    With ``calibrate_correct`` every valid row is calibrated, p_k = largest non-target prob."""
    p = np.asarray(p, dtype=np.float64)
    out = p.copy()
    for r in range(p.shape[0]):
        gt = int(labels[r])
        if gt == IGNORE:
            continue
        if not (mis[r] or calibrate_correct):
            continue
        row = p[r]
        p_k = max(row[i] for i in range(row.shape[0]) if i != gt)
        rest = sum(row[i] for i in range(row.shape[0]) if i != gt)  # 1 - p_gt, without cancellation
        if calibrate_correct and rest == 0.0:
            continue
        sigma = 1.0 / (rest + p_k)
        s = alpha * sigma
        new = s * row
        new[gt] = 1.0 - s * rest
        out[r] = new
    return out


def loca_terms(teacher_logits, labels, alpha, temperature=1.0, ignore_index=IGNORE, calibrate_correct=False):
    """(log p, log s, log p_loca_gt, changed, log(1 - p_gt), log p_k) of softmax(z / T), float64."""
    z = teacher_logits.double()
    log_p = log_softmax64(z, temperature)
    tmask = target_mask(labels, z.shape[-1], ignore_index)
    valid = labels != ignore_index
    nontarget = torch.where(tmask, torch.full_like(log_p, -math.inf), log_p)
    log_rest = logsumexp64(nontarget)  # log(1 - p_gt)
    log_p_k = nontarget.amax(dim=-1)  # largest non-target = the teacher's top class on mis rows
    if calibrate_correct:
        changed = valid & torch.isfinite(log_rest)
    else:
        changed = mis_mask(z, labels, ignore_index)
    log_s = math.log(alpha) - torch.logaddexp(log_rest, log_p_k)
    # 1 - s(1 - p_gt), with s(1 - p_gt) < alpha < 1
    log_new_gt = torch.log1p(-torch.exp(log_s + log_rest))
    return log_p, log_s, log_new_gt, changed, log_rest, log_p_k


def loca_log_target(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = IGNORE,
    calibrate_correct: bool = False,
    calibrate_before_temperature: bool = False,
) -> torch.Tensor:
    """log p_loca in float64 (vectorised, log space). Unchanged rows: log softmax(z / T)."""
    z = teacher_logits.double()
    calib_t = 1.0 if calibrate_before_temperature else temperature
    log_p, log_s, log_new_gt, changed, _, _ = loca_terms(
        z, labels, alpha, calib_t, ignore_index, calibrate_correct
    )
    tmask = target_mask(labels, z.shape[-1], ignore_index)
    calibrated = torch.where(tmask, log_new_gt.unsqueeze(-1), log_p + log_s.unsqueeze(-1))
    if calibrate_before_temperature:
        # p_loca ** (1 / T), renormalised
        calibrated = log_softmax64(calibrated, temperature)
    plain = log_softmax64(z, temperature)
    return torch.where(changed.unsqueeze(-1), calibrated, plain)


# --------------------------------------------------------------------------- teacher targets
def teacher_target(
    teacher_logits,
    labels,
    temperature,
    transform="none",
    alpha=0.9,
    smoothing=0.1,
    ignore_index=IGNORE,
    standardize=False,
    calibrate_correct=False,
    calibrate_before_temperature=False,
):
    """(log target, row weight or None) for the KD baselines of the method doc, section 5."""
    z = teacher_logits.double()
    if standardize:
        z = standardize64(z)
    if transform == "loca":
        return (
            loca_log_target(
                z, labels, alpha, temperature, ignore_index, calibrate_correct, calibrate_before_temperature
            ),
            None,
        )
    log_p = log_softmax64(z, temperature)
    if transform == "none":
        return log_p, None
    mis = mis_mask(z, labels, ignore_index)
    if transform == "skip":
        return log_p, (~mis).double()
    num_classes = z.shape[-1]
    tmask = target_mask(labels, num_classes, ignore_index)
    if transform == "ka_shift":
        top = z.argmax(dim=-1, keepdim=True)
        top_mask = torch.zeros_like(tmask).scatter(-1, top, True)
        p = log_p.exp()
        p_gt = (p * tmask).sum(-1, keepdim=True)
        p_top = (p * top_mask).sum(-1, keepdim=True)
        swapped = torch.where(tmask, p_top, torch.where(top_mask, p_gt, p))
        return torch.where(mis.unsqueeze(-1), torch.log(swapped), log_p), None
    if transform == "ka_smooth":
        present = torch.isfinite(z)  # classes masked with -inf logits are not classes
        count = present.sum(-1, keepdim=True).double()
        smooth = (1 - smoothing) * tmask.double() + smoothing * present.double() / count
        return torch.where(mis.unsqueeze(-1), torch.log(smooth), log_p), None
    raise ValueError(transform)


# --------------------------------------------------------------------------- divergences
def kl64(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) with 0 log 0 = 0; differentiable in both."""
    p = torch.exp(log_p)
    positive = p > 0
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(positive, log_q, torch.zeros_like(log_q))  # no NaN in the unused branch's gradient
    return torch.where(positive, p * (safe_log_p - safe_log_q), torch.zeros_like(p)).sum(-1)


def _log_mix(log_a, log_b, w):
    """log(w a + (1 - w) b), as a log-sum-exp so that two zero entries give a finite log."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence64(name, log_p, log_q, jsd_beta=0.5, skew_lambda=0.1):
    """Per-row divergence, p = teacher target, q = student (method doc, 'Language models').

    A masked class (log-prob -inf) is given the log-prob -1e300 instead: its probability is still
    exactly 0 in float64, but differences and mixtures of two masked entries stay finite, so the
    float64 gradient has no NaN (its value is 0 there)."""
    log_p, log_q = log_p.clamp(min=-1e300), log_q.clamp(min=-1e300)
    if name == "forward_kl":
        return kl64(log_p, log_q)
    if name == "reverse_kl":
        return kl64(log_q, log_p)
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, jsd_beta)
        return jsd_beta * kl64(log_p, log_m) + (1 - jsd_beta) * kl64(log_q, log_m)
    if name == "skew_forward_kl":
        return kl64(log_p, _log_mix(log_p, log_q, skew_lambda))
    if name == "skew_reverse_kl":
        return kl64(log_q, _log_mix(log_q, log_p, skew_lambda))
    if name == "total_variation":
        return 0.5 * (torch.exp(log_p) - torch.exp(log_q)).abs().sum(-1)
    raise ValueError(name)


def tckd_nckd64(log_p, log_q, labels, ignore_index=IGNORE):
    """(TCKD, NCKD, 1 - p_gt) per row: KL of [p_gt, 1 - p_gt] vs [q_gt, 1 - q_gt], and KL of the
    renormalised non-target distributions p_i / (1 - p_gt) vs q_i / (1 - q_gt)."""
    tmask = target_mask(labels, log_p.shape[-1], ignore_index)
    ninf_p = torch.full_like(log_p, -math.inf)

    def split(lp):
        lgt = torch.where(tmask, lp, torch.full_like(lp, -math.inf)).amax(-1)
        nt = torch.where(tmask, torch.full_like(lp, -math.inf), lp)
        return lgt, logsumexp64(nt), nt

    p_gt, p_rest, p_nt = split(log_p)
    q_gt, q_rest, q_nt = split(log_q)
    tckd = kl64(torch.stack([p_gt, p_rest], -1), torch.stack([q_gt, q_rest], -1))
    cond_p = torch.where(tmask, ninf_p, p_nt - p_rest.unsqueeze(-1))
    cond_q = torch.where(tmask, torch.zeros_like(log_q), q_nt - q_rest.unsqueeze(-1))
    nckd = kl64(cond_p, cond_q)
    return tckd, nckd, torch.exp(p_rest)


# --------------------------------------------------------------------------- losses
def _reduce(per_row, valid, reduction, normalizer):
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    denom = normalizer if normalizer is not None else max(int(valid.sum()), 1)
    return per_row.sum() / denom


def kd_ref(
    student_logits,
    teacher_logits,
    temperature=4.0,
    labels=None,
    transform="none",
    alpha=0.9,
    smoothing=0.1,
    ignore_index=IGNORE,
    standardize=False,
    calibrate_correct=False,
    calibrate_before_temperature=False,
    reduction="mean",
    normalizer=None,
):
    """T^2 KL(target || softmax(z_s / T)) averaged over valid rows (or summed / normalised)."""
    zs = student_logits.double()
    if labels is None:
        labels = torch.zeros(zs.shape[:-1], dtype=torch.long)
        valid = torch.ones(zs.shape[:-1], dtype=torch.bool)
    else:
        valid = labels != ignore_index
    log_t, weight = teacher_target(
        teacher_logits,
        labels,
        temperature,
        transform,
        alpha,
        smoothing,
        ignore_index,
        standardize,
        calibrate_correct,
        calibrate_before_temperature,
    )
    if standardize:
        zs = standardize64(zs)
    per_row = temperature**2 * kl64(log_t, log_softmax64(zs, temperature))
    if weight is not None:
        per_row = per_row * weight
    return _reduce(per_row, valid, reduction, normalizer)


def dkd_ref(
    student_logits,
    teacher_logits,
    labels,
    a=1.0,
    b=8.0,
    temperature=4.0,
    transform="none",
    alpha=0.9,
    smoothing=0.1,
    ignore_index=IGNORE,
    standardize=False,
    reduction="mean",
    normalizer=None,
):
    """T^2 (a TCKD + b NCKD) with the (optionally transformed) teacher target."""
    zs = student_logits.double()
    valid = labels != ignore_index
    log_t, weight = teacher_target(
        teacher_logits, labels, temperature, transform, alpha, smoothing, ignore_index, standardize
    )
    if standardize:
        zs = standardize64(zs)
    tckd, nckd, _ = tckd_nckd64(log_t, log_softmax64(zs, temperature), labels, ignore_index)
    per_row = temperature**2 * (a * tckd + b * nckd)
    if weight is not None:
        per_row = per_row * weight
    return _reduce(per_row, valid, reduction, normalizer)


def token_ref(
    student_logits,
    teacher_logits,
    labels,
    divergence="forward_kl",
    loca_alpha=None,
    temperature=1.0,
    normalizer=None,
    ignore_index=IGNORE,
    jsd_beta=0.5,
    skew_lambda=0.1,
    reduction="mean",
):
    """Sum over valid positions of D(p || q) / normalizer (no T^2)."""
    zs = student_logits.double()
    valid = labels != ignore_index
    if loca_alpha is None:
        log_t = log_softmax64(teacher_logits, temperature)
    else:
        log_t = loca_log_target(teacher_logits, labels, loca_alpha, temperature, ignore_index)
    per_row = divergence64(divergence, log_t, log_softmax64(zs, temperature), jsd_beta, skew_lambda)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "sum":
        return per_row.sum()
    denom = normalizer if normalizer is not None else max(int(valid.sum()), 1)
    return per_row.sum() / denom
