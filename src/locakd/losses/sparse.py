"""Token-level divergences against a *sparse* (top-k) teacher, e.g. an offline teacher cache.

A top-k teacher keeps, per response token, the k largest teacher log-probabilities
``topk_logprobs [..., k]`` (at the loss temperature, largest first) with their token ids
``topk_ids``, the label token's own log-probability ``label_logprob [...]`` (known even
when the label is outside the top k) and, optionally, the log of the remaining mass
``tail_logprob [...]``. That is a distribution over *buckets*::

    the k stored tokens | the label (when it is not among them) | the tail (every other token)

and the student's distribution is read on the same buckets: its probabilities of the stored
tokens and of the label, and its total mass on all other tokens. Every divergence of
:data:`locakd.DIVERGENCES` is then the divergence between the two bucket distributions.

Why the tail bucket (and not a renormalised top-k):

* both sides stay proper distributions, so a perfect student gives 0 and every divergence
  keeps its meaning (reverse KL, JSD and the skew divergences need the student's tail mass);
* the result is *exact* whenever the teacher's distribution inside the tail is proportional
  to the student's there (data-processing equality of f-divergences); in particular forward
  KL, JSD, the skew divergences and total variation equal the dense loss when the teacher
  has no mass outside the stored tokens, and every divergence is a lower bound of the dense
  one otherwise (what the cache cannot know, it does not invent);
* LoCa stays exact: it scales every non-target probability by one factor s, so the stored
  entries *and* the tail move by log s (:func:`locakd.loca_calibrate_sparse`).

The stored entries, the label and the tail are renormalised to sum to one before anything
else (a quantised cache sums to one only up to its quantisation).

Gradients are computed in closed form in the forward pass, block by block
(``chunk_size`` rows), so the float32 ``[tokens, V]`` intermediates exist for one block
at a time and nothing is recomputed in the backward. With ``q`` the student's tempered
softmax, ``l_b`` its bucket log-probabilities and ``g_b = dL/dl_b`` (a small autograd
over the ``k + 2`` buckets of the divergence from the registry)::

    dL/du_i = g_b(i) * q_i / Q_b(i) - q_i * sum_b g_b,      u = z / T
"""

from __future__ import annotations

import math

import torch

from .._validation import check_logits, check_temperature, check_unit_interval, compute_dtype
from ..calibration import loca_calibrate_sparse
from ..errors import InputError
from .token import DIVERGENCES, divergence_rows

__all__ = [
    "sparse_misinstruction_mask",
    "sparse_misinstruction_rate",
    "sparse_teacher_buckets",
    "sparse_token_distill_loss",
]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_sparse_teacher(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprob: torch.Tensor,
    tail_logprob: torch.Tensor | None,
    vocab_size: int | None,
    ignore_index: int,
) -> None:
    check_logits("topk_logprobs", topk_logprobs, min_classes=1)
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise InputError(f"topk_ids must be an integer tensor of token ids, got {getattr(topk_ids, 'dtype', topk_ids)}")
    if tuple(topk_ids.shape) != tuple(topk_logprobs.shape):
        raise InputError(
            f"topk_ids shape {tuple(topk_ids.shape)} does not match topk_logprobs shape {tuple(topk_logprobs.shape)}"
        )
    lead = tuple(topk_logprobs.shape[:-1])
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', labels)}")
    for name, tensor in (("labels", labels), ("label_logprob", label_logprob), ("tail_logprob", tail_logprob)):
        if tensor is not None and tuple(tensor.shape) != lead:
            raise InputError(f"{name} shape {tuple(tensor.shape)} must be the top-k teacher's leading shape {lead}")
    for name, tensor in (("label_logprob", label_logprob), ("tail_logprob", tail_logprob)):
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if bool((torch.isnan(tensor) | (tensor == math.inf)).any()):
            raise InputError(f"{name} contains NaN or +inf")
    valid = labels != ignore_index
    if not bool(valid.any()):
        return
    ids = topk_ids[valid]
    if vocab_size is not None:
        used = labels[valid]
        low, high = int(torch.minimum(ids.min(), used.min())), int(torch.maximum(ids.max(), used.max()))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise InputError(
                f"token id {bad} (in topk_ids or labels) is out of range for the student's {vocab_size} "
                "logits (a cache from another vocabulary?)"
            )
    if ids.shape[-1] > 1:
        if bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise InputError("topk_ids repeats a token id within a row; each stored token must appear once")
        values = topk_logprobs[valid]
        if bool((values[..., 1:] > values[..., :-1]).any()):
            raise InputError("topk_logprobs must be sorted, largest first, in every row (as torch.topk returns them)")


def _label_in_topk(topk_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label is stored, its slot among the k entries; 0 where it is not stored)."""
    hit = topk_ids == labels.unsqueeze(-1)
    return hit.any(dim=-1), hit.to(torch.int8).argmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# Teacher buckets (and LoCa on them)
# --------------------------------------------------------------------------------------------------


def sparse_teacher_buckets(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprob: torch.Tensor,
    tail_logprob: torch.Tensor | None = None,
    *,
    loca_alpha: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's bucket log-probabilities ``[..., k + 2]`` and the label-slot mask ``[...]``.

    Buckets: the k stored tokens, the label when it is not stored (``-inf`` when it is), the
    tail. Renormalised to sum to one, then LoCa-calibrated when ``loca_alpha`` is given
    (exact: stored entries and tail move by log s, the label gets p_loca_gt). Returns
    ``(log_buckets, label_outside)`` in float32 (float64 for float64 input); rows whose label
    is ``ignore_index`` are returned as they come (meaningless, never used). Inputs are assumed
    validated (see :func:`sparse_token_distill_loss`).
    """
    with torch.no_grad():
        dtype = compute_dtype(topk_logprobs)
        top = topk_logprobs.detach().to(dtype)
        label_lp = label_logprob.detach().to(dtype)
        stored, slot = _label_in_topk(topk_ids, labels)
        # When the label is stored, its own value is the stored one (a cache keeps both; they agree).
        label_lp = torch.where(stored, top.gather(-1, slot.unsqueeze(-1)).squeeze(-1), label_lp)
        neg_inf = torch.full_like(label_lp, -math.inf)
        label_slot = torch.where(stored, neg_inf, label_lp)
        if tail_logprob is None:
            # 1 - (stored mass), clamped: exact only for float32-accurate inputs; a cache passes its own.
            stored_mass = torch.logaddexp(top.logsumexp(dim=-1), label_slot)
            tail = torch.log1p(-stored_mass.exp().clamp(max=1.0))
        else:
            tail = tail_logprob.detach().to(dtype)
        buckets = torch.cat([top, label_slot.unsqueeze(-1), tail.unsqueeze(-1)], dim=-1)
        norm = buckets.logsumexp(dim=-1, keepdim=True)
        buckets = buckets - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        if loca_alpha is None:
            return buckets, ~stored
        k = top.shape[-1]
        top_n, label_n, tail_n = buckets[..., :k], buckets[..., k], buckets[..., k + 1]
        label_value = torch.where(stored, top_n.gather(-1, slot.unsqueeze(-1)).squeeze(-1), label_n)
        calibrated, new_label, log_scale = loca_calibrate_sparse(
            top_n, topk_ids, label_value, labels, loca_alpha, ignore_index
        )
        label_out = torch.where(stored, neg_inf, new_label)
        return torch.cat(
            [calibrated, label_out.unsqueeze(-1), (tail_n + log_scale).unsqueeze(-1)], dim=-1
        ), ~stored


# --------------------------------------------------------------------------------------------------
# The loss (closed-form gradient, block by block)
# --------------------------------------------------------------------------------------------------


def _block(
    student: torch.Tensor,
    stored_ids: torch.Tensor,
    live: torch.Tensor,
    log_target: torch.Tensor,
    divergence: str,
    temperature: float,
    jsd_beta: float,
    skew_lambda: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed divergence of one block of valid rows and, if asked, d(sum)/d(student logits)."""
    z = student.to(compute_dtype(student))
    log_q = torch.log_softmax(z / temperature, dim=-1)
    neg_inf = torch.tensor(-math.inf, dtype=log_q.dtype, device=log_q.device)
    stored = torch.where(live, log_q.gather(-1, stored_ids), neg_inf)
    others = log_q.scatter(-1, stored_ids, -math.inf)  # the student's tail entries only
    tail = others.logsumexp(dim=-1)
    buckets = torch.cat([stored, tail.unsqueeze(-1)], dim=-1)
    if not need_grad:
        rows = divergence_rows(divergence, buckets, log_target, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
        return rows.sum(), None
    with torch.enable_grad():
        leaf = buckets.detach().requires_grad_(True)
        total = divergence_rows(divergence, leaf, log_target, jsd_beta=jsd_beta, skew_lambda=skew_lambda).sum()
        (g,) = torch.autograd.grad(total, leaf)
    g_sum = g.sum(dim=-1, keepdim=True)
    # Tail entries: g_tail * q_i / Q_tail - q_i * sum(g); q_i / Q_tail in log space (Q_tail may underflow).
    safe_tail = torch.where(torch.isfinite(tail), tail, torch.zeros_like(tail)).unsqueeze(-1)
    grad = others.sub_(safe_tail).exp_().mul_(g[..., -1:])  # reuses the [rows, V] buffer
    grad.sub_(log_q.exp_().mul_(g_sum))
    # Stored entries: g_j - q_j * sum(g). A dead label slot points at entry 0: write entry 0's value again.
    stored_grad = g[..., :-1] - stored.exp() * g_sum
    stored_grad = torch.where(live, stored_grad, stored_grad[..., :1])
    grad.scatter_(-1, stored_ids, stored_grad)
    return total.detach(), grad.div_(temperature)


class _SparseRowsLoss(torch.autograd.Function):
    """Sum of the bucket divergence over valid rows; gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, student, rows, stored_ids, live, log_target, options, chunk_size):  # noqa: D401
        need_grad = ctx.needs_input_grad[0]
        total = student.new_zeros((), dtype=compute_dtype(student))
        grad = torch.zeros_like(student) if need_grad else None
        for start in range(0, rows.shape[0], chunk_size):
            index = rows[start:start + chunk_size]
            block_sum, block_grad = _block(
                student.index_select(0, index), stored_ids[start:start + chunk_size],
                live[start:start + chunk_size], log_target[start:start + chunk_size], *options, need_grad,
            )
            total = total + block_sum
            if need_grad:
                grad.index_copy_(0, index, block_grad.to(grad.dtype))
        ctx.save_for_backward(grad if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def sparse_token_distill_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprob: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    tail_logprob: torch.Tensor | None = None,
    loca_alpha: float | None = None,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Token-level distillation loss against a top-k teacher (tail bucket; LoCa exact).

    Args:
        student_logits: ``[..., V]`` aligned student logits, any float dtype (math in float32).
        topk_ids: ``[..., k]`` the teacher's stored token ids (distinct within a row).
        topk_logprobs: ``[..., k]`` their teacher log-probabilities *at the loss temperature*,
            largest first (an offline cache is captured at that temperature).
        labels: ``[...]`` next-token ids; ``ignore_index`` masks a position (its teacher entries
            are ignored and may hold anything).
        label_logprob: ``[...]`` the label token's teacher log-probability (used when the label
            is not among the stored tokens; the stored value wins when it is).
        divergence: one of :data:`locakd.DIVERGENCES`.
        tail_logprob: ``[...]`` log of the teacher's mass on every token that is neither stored
            nor the label. Pass it when you have it (a cache does): ``None`` derives it as
            ``log(1 - stored mass)``, which loses the tail's precision where it is tiny.
        loca_alpha: LoCa on the sparse teacher (None: plain), via :func:`locakd.loca_calibrate_sparse`.
        temperature: softmax temperature of the student (the teacher is already tempered).
        normalizer: divide the summed loss by this (default: the valid tokens in ``labels``).
        chunk_size: rows per block (None: one block); bounds the float32 ``[rows, V]`` memory.
        jsd_beta, skew_lambda, reduction: as in :func:`locakd.token_distill_loss`.
        validate: check shapes, dtypes, id ranges, sortedness and NaN (a few host syncs).

    Returns:
        The float32 loss (float64 for float64 student logits). The student gradient is exact for
        the bucket divergence and computed in closed form.
    """
    if divergence not in DIVERGENCES:
        raise InputError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if reduction not in ("mean", "sum"):
        raise InputError(f"sparse_token_distill_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    if validate:
        check_logits("student_logits", student_logits)
        if tuple(student_logits.shape[:-1]) != tuple(labels.shape):
            raise InputError(
                f"student_logits shape {tuple(student_logits.shape)} does not match labels shape "
                f"{tuple(labels.shape)} (expected logits of shape {tuple(labels.shape)} + (V,))"
            )
        _check_sparse_teacher(topk_ids, topk_logprobs, labels, label_logprob, tail_logprob,
                              student_logits.shape[-1], ignore_index)
        temperature = check_temperature(temperature)
        if loca_alpha is not None:
            loca_alpha = check_unit_interval(loca_alpha, "loca_alpha", closed=False)
        jsd_beta = check_unit_interval(jsd_beta, "jsd_beta", closed=False)
        skew_lambda = check_unit_interval(skew_lambda, "skew_lambda", closed=False)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    student = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != ignore_index).nonzero().squeeze(-1)
    n = rows.shape[0]
    if n == 0:
        # No valid token: a zero that still backpropagates (a zero gradient).
        total = student[:0].to(compute_dtype(student)).sum()
    else:
        ids = topk_ids.reshape(-1, k).index_select(0, rows).long()
        row_labels = flat_labels.index_select(0, rows)
        tail = None if tail_logprob is None else tail_logprob.reshape(-1).index_select(0, rows)
        log_target, label_outside = sparse_teacher_buckets(
            ids, topk_logprobs.reshape(-1, k).index_select(0, rows), row_labels,
            label_logprob.reshape(-1).index_select(0, rows), tail, loca_alpha=loca_alpha,
            ignore_index=ignore_index,
        )
        log_target = log_target.to(compute_dtype(student))
        # The label slot's student entry: the label id, or (dead slot) a copy of entry 0.
        label_ids = torch.where(label_outside, row_labels, ids[:, 0])
        stored_ids = torch.cat([ids, label_ids.unsqueeze(-1)], dim=-1)
        live = torch.cat([torch.ones_like(ids, dtype=torch.bool), label_outside.unsqueeze(-1)], dim=-1)
        options = (divergence, float(temperature), float(jsd_beta), float(skew_lambda))
        total = _SparseRowsLoss.apply(student, rows, stored_ids, live, log_target, options, chunk_size or n)
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = torch.clamp(torch.as_tensor(float(n), dtype=total.dtype, device=total.device), min=1.0)
    elif not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise InputError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


# --------------------------------------------------------------------------------------------------
# Mis-instruction from a sparse teacher
# --------------------------------------------------------------------------------------------------


def sparse_misinstruction_mask(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprob: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """True where the teacher's top token is not the label: label log-prob < top-1 log-prob.

    The same rule as :func:`locakd.misinstruction_mask` (a tie counts as right), read from a
    top-k teacher: the top-1 is the largest stored value, the label's value is its stored entry
    when it is stored and ``label_logprob`` otherwise. Ignored rows are False.
    """
    with torch.no_grad():
        top = topk_logprobs.detach()
        stored, slot = _label_in_topk(topk_ids, labels)
        label_value = torch.where(stored, top.gather(-1, slot.unsqueeze(-1)).squeeze(-1),
                                  label_logprob.detach().to(top.dtype))
        return (labels != ignore_index) & (label_value < top.amax(dim=-1))


def sparse_misinstruction_rate(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    label_logprob: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[int, int]:
    """``(mis-instructed tokens, valid tokens)`` of a top-k teacher; sum over a dataset for the rate."""
    mask = sparse_misinstruction_mask(topk_ids, topk_logprobs, labels, label_logprob, ignore_index)
    return int(mask.sum()), int((labels != ignore_index).sum())
