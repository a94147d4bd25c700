"""Token distillation straight from hidden states and lm-head weights: no ``[tokens, V]`` logits.

``linear_token_distill_loss(h_s, W_s, h_t, W_t, labels, divergence)`` equals
``token_distill_loss(h_s @ W_s.T, h_t @ W_t.T, labels, divergence)`` but works on chunks of token
rows: per chunk it projects both models (float32 accumulation whatever the input dtype),
calibrates the teacher (LoCa), computes the divergence and its gradient with the one-pass
kernel of :mod:`locakd.losses._fused`, and turns the chunk's logit gradient into the gradients
of the hidden states, the weight and the bias right away. Only a few ``[chunk, V]`` float32
buffers ever exist, so the memory no longer grows with tokens x vocabulary.

The lm head may be tied (the weight is the embedding matrix: autograd adds both uses); to
compare a shared vocabulary of two differently padded heads pass ``weight[:V]``. Rows labelled
``ignore_index`` are skipped entirely (no projection, zero gradient).

:func:`linear_distill_objective` is the LM objective's form: the divergence and the student's
cross-entropy of the same chunk pass, with their gradients combined, so an LM step with a
fused head never builds the student logits either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._validation import check_labels, check_logits, check_temperature, check_unit_interval
from ..errors import InputError
from ._common import check_chunk_size, check_normalizer, check_reduction
from ._fused import RowsPlan, run_rows
from .token import DivergenceOptions, get_divergence


class LinearTerms(NamedTuple):
    """What :func:`linear_distill_objective` returns."""

    loss: torch.Tensor  # (kd_weight * divergence_sum + ce_weight * ce_sum) / normalizer, differentiable
    divergence_sum: torch.Tensor  # detached sums over the valid rows, for logging
    ce_sum: torch.Tensor


@dataclass(frozen=True)
class _Head:
    """A hidden-state matrix ``[N, H]`` and its head (weight ``[V, H]``, optional bias ``[V]``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def project(self, rows: torch.Tensor | None, start: int, stop: int, weight32, bias32, out) -> torch.Tensor:
        """float32 logits of rows ``start:stop`` (of ``rows`` when given) into ``out``."""
        h = self.hidden[start:stop] if rows is None else self.hidden.index_select(0, rows[start:stop])
        h = h.to(weight32.dtype)
        if bias32 is None:
            return torch.mm(h, weight32.t(), out=out)
        return torch.addmm(bias32, h, weight32.t(), out=out)


def _as_compute(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in the float dtype the projection accumulates in (no copy when it already is)."""
    return None if tensor is None else tensor.detach().to(dtype)


def _linear_pass(
    student: _Head,
    teacher: _Head,
    labels: torch.Tensor,
    plan: RowsPlan,
    chunk_size: int,
    scale: float,
    ce_scale: float | None,
    with_grad: bool,
):
    """The chunk loop. Returns ``(divergence_sum, ce_sum, grads)`` with ``grads`` the gradients
    of ``scale * divergence_sum + ce_scale * ce_sum`` w.r.t. (hidden, weight, bias) of the student."""
    n = student.hidden.shape[0]
    dtype = torch.float64 if student.hidden.dtype == torch.float64 else torch.float32
    ws, bs = _as_compute(student.weight, dtype), _as_compute(student.bias, dtype)
    wt, bt = _as_compute(teacher.weight, dtype), _as_compute(teacher.bias, dtype)
    width, vocab = ws.shape[0], wt.shape[0]
    valid = labels != plan.ignore_index
    rows = None if bool(valid.all()) else valid.nonzero().squeeze(-1)
    count = n if rows is None else rows.numel()
    device = student.hidden.device
    div_sum = torch.zeros((), dtype=dtype, device=device)
    ce_sum = torch.zeros((), dtype=dtype, device=device)
    grad_h = grad_w = grad_b = None
    if with_grad:
        grad_h = torch.zeros(student.hidden.shape, dtype=student.hidden.dtype, device=device)
        grad_w = torch.zeros_like(ws)
        grad_b = None if bs is None else torch.zeros_like(bs)
    chunk = max(1, min(chunk_size, count))
    kernel_plan = replace(plan, validate=False)  # the chunk's logits are overwritten: diagnose the inputs instead
    zs_buffer = torch.empty(chunk, width, dtype=dtype, device=device)
    zt_buffer = torch.empty(chunk, vocab, dtype=dtype, device=device)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        zs = student.project(rows, start, stop, ws, bs, zs_buffer[: stop - start])
        zt = teacher.project(rows, start, stop, wt, bt, zt_buffer[: stop - start])
        lab = labels[start:stop] if rows is None else labels.index_select(0, rows[start:stop])

        def refetch(index, start=start, stop=stop):
            # the chunk's student logits were overwritten by their gradient: project those rows again
            picked = torch.arange(start, stop, device=device)[index] if rows is None else rows[start:stop][index]
            out_s = torch.empty(index.numel(), width, dtype=dtype, device=device)
            out_t = torch.empty(index.numel(), vocab, dtype=dtype, device=device)
            return student.project(picked, 0, index.numel(), ws, bs, out_s), teacher.project(
                picked, 0, index.numel(), wt, bt, out_t
            )

        # the inputs were checked up front (hidden states and weights are small next to the logits)
        result = run_rows(
            zs, zt, lab, None, scale, kernel_plan,
            with_grad=with_grad, grad_out=zs if with_grad else None, ce_scale=ce_scale, refetch=refetch,
        )
        div_sum += result.losses.sum()
        if result.ce_losses is not None:
            ce_sum += result.ce_losses.sum()
        if with_grad:
            dz = result.grad  # [chunk, width] float32: d(loss)/d(student logits)
            h = student.hidden[start:stop] if rows is None else student.hidden.index_select(0, rows[start:stop])
            gh = torch.mm(dz, ws)
            if rows is None:
                grad_h[start:stop] = gh
            else:
                grad_h.index_copy_(0, rows[start:stop], gh.to(grad_h.dtype))
            grad_w.addmm_(dz.t(), h.to(dtype))
            if grad_b is not None:
                grad_b += dz.sum(dim=0)
    if plan.validate and not bool(torch.isfinite(div_sum + ce_sum)):
        raise InputError(
            "the fused loss is not finite although the hidden states and weights are: the projected "
            "logits overflow float32"
        )
    grads = None
    if with_grad:
        grads = (
            grad_h,
            grad_w.to(student.weight.dtype),
            None if grad_b is None else grad_b.to(student.bias.dtype),
        )
    return div_sum, ce_sum, grads


class _LinearFunction(torch.autograd.Function):
    """Forward: the chunk loop with every gradient; backward: the stored gradients, scaled."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, plan, chunk_size, scale, ce_scale):  # noqa: D401
        div_sum, ce_sum, grads = _linear_pass(
            _Head(hs, ws, bs), _Head(ht, wt, bt), labels, plan, chunk_size, scale, ce_scale, with_grad=True
        )
        ctx.grads = grads
        total = scale * div_sum
        if ce_scale is not None:
            total = total + ce_scale * ce_sum
        ctx.mark_non_differentiable(div_sum, ce_sum)
        return total, div_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_div, _grad_ce):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "the fused linear loss hands its stored gradients over in the first backward pass; "
                "a second backward through the same graph (retain_graph=True) is not supported"
            )
        ctx.grads = None
        if grad_total.device.type != "cpu" or float(grad_total) != 1.0:
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_total.to(grad.dtype))
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def _check_head(name: str, hidden, weight, bias) -> None:
    """Dtype and shape checks, and a finiteness pass: hidden states and weights are O((N + V) H),
    small next to the O(N V H) projection, and unlike logits they have no -inf masks."""
    for part, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        check_logits(f"{name}_{part}", tensor, check_finite=False, min_classes=1)
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{name}_{part} contains {int((~torch.isfinite(tensor)).sum())} NaN or inf value(s)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"{name}_weight must be [V, H] with H = {name}_hidden's last size {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise InputError(f"{name}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _prepare(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence, *,
    loca_alpha, temperature, chunk_size, student_bias, teacher_bias, ignore_index, jsd_beta, skew_lambda,
    validate, vocab_size=None,
):
    entry = get_divergence(divergence)
    if validate:
        _check_head("student", student_hidden, student_weight, student_bias)
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if tuple(student_hidden.shape[:-1]) != tuple(teacher_hidden.shape[:-1]):
            raise InputError(
                f"student_hidden shape {tuple(student_hidden.shape)} and teacher_hidden shape "
                f"{tuple(teacher_hidden.shape)} must agree up to the hidden size"
            )
        shared = teacher_weight.shape[0]
        if vocab_size is None and student_weight.shape[0] != shared:
            raise InputError(
                f"student_weight has {student_weight.shape[0]} vocabulary rows, teacher_weight {shared}: "
                "pass both heads cropped to the shared vocabulary, e.g. weight[:V]"
            )
        if vocab_size is not None and not (0 < shared <= student_weight.shape[0]):
            raise InputError(
                f"the shared vocabulary ({shared} teacher rows) must not exceed the student's "
                f"{student_weight.shape[0]} rows"
            )
        fake_logits = torch.empty((*student_hidden.shape[:-1], shared), device="meta")
        check_labels(labels, fake_logits, ignore_index, logits_name="the logits (hidden @ weight.T)")
        temperature = check_temperature(temperature)
        if loca_alpha is not None:
            loca_alpha = check_unit_interval(loca_alpha, "loca_alpha", closed=False)
        jsd_beta = check_unit_interval(jsd_beta, "jsd_beta", closed=False)
        skew_lambda = check_unit_interval(skew_lambda, "skew_lambda", closed=False)
        check_chunk_size(chunk_size)
        if chunk_size is None:
            raise InputError("chunk_size must be a positive integer (token rows projected at once)")
    plan = RowsPlan(
        divergence=entry,
        options=DivergenceOptions(jsd_beta, skew_lambda),
        temperature=temperature,
        loca_alpha=loca_alpha,
        ignore_index=ignore_index,
        validate=validate,
    )
    hidden_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    hidden_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    return plan, hidden_s, hidden_t, labels.reshape(-1)


def _run(hs, ws, bs, ht, wt, bt, labels, plan, chunk_size, scale, ce_scale):
    """The three results, through autograd when a student tensor needs a gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hs, ws, bs)):
        return _LinearFunction.apply(hs, ws, bs, ht.detach(), wt.detach(), teacher_bias_detached(bt), labels,
                                     plan, chunk_size, scale, ce_scale)
    div_sum, ce_sum, _ = _linear_pass(
        _Head(hs.detach(), ws.detach(), None if bs is None else bs.detach()),
        _Head(ht.detach(), wt.detach(), teacher_bias_detached(bt)),
        labels, plan, chunk_size, scale, ce_scale, with_grad=False,
    )
    total = scale * div_sum if ce_scale is None else scale * div_sum + ce_scale * ce_sum
    return total, div_sum, ce_sum


def teacher_bias_detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach()


def _scale(labels, ignore_index, normalizer, reduction):
    """(factor, tensor to divide by or None) turning the sum into the requested reduction."""
    if reduction == "sum":
        return 1.0, None
    check_normalizer(normalizer)
    if normalizer is None:
        return 1.0 / max(int((labels != ignore_index).sum()), 1), None
    if isinstance(normalizer, torch.Tensor):
        return 1.0, normalizer
    return 1.0 / float(normalizer), None


def linear_token_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    loca_alpha: float | None = None,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """:func:`~locakd.token_distill_loss` of ``student_hidden @ student_weight.T (+ bias)`` against
    the teacher's, without materialising either ``[tokens, V]`` logit tensor.

    Args:
        student_hidden, teacher_hidden: ``[..., H_s]`` / ``[..., H_t]`` final hidden states, aligned
            with ``labels`` (shift them like the logits: :func:`~locakd.shift_for_next_token`).
        student_weight, teacher_weight: lm-head weights ``[V, H_s]`` / ``[V, H_t]`` (the same V:
            pass ``weight[:V]`` to compare a shared vocabulary); either may be a tied embedding.
        labels: ``[...]`` next-token ids; ``ignore_index`` rows are skipped.
        divergence, loca_alpha, temperature, normalizer, ignore_index, jsd_beta, skew_lambda,
            reduction, validate: as in :func:`~locakd.token_distill_loss`.
        chunk_size: token rows projected at once; the float32 memory is about
            ``chunk_size * (2 V)`` plus the weight gradient.
        student_bias, teacher_bias: optional ``[V]`` lm-head biases.

    Gradients reach the student's hidden states, weight and bias (accumulated in float32 and
    returned in their dtypes); nothing reaches the teacher. Like the other fused losses the
    gradients are computed in the forward pass, so a second backward through the graph raises.
    """
    check_reduction(reduction, ("mean", "sum"), name="linear_token_distill_loss reduction")
    plan, hs, ht, flat_labels = _prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence,
        loca_alpha=loca_alpha, temperature=temperature, chunk_size=chunk_size, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        validate=validate,
    )
    scale, divide_by = _scale(flat_labels, ignore_index, normalizer, reduction)
    total, _, _ = _run(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, flat_labels,
                       plan, chunk_size, scale, None)
    return total if divide_by is None else total / divide_by


def linear_distill_objective(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    kd_weight: float = 0.5,
    ce_weight: float = 0.5,
    normalizer: float | torch.Tensor | None = None,
    loca_alpha: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    validate: bool = True,
) -> LinearTerms:
    """The LM objective ``(kd_weight * D + ce_weight * CE) / normalizer`` from one chunk pass.

    ``D`` is the divergence summed over the valid rows (the first ``teacher_weight.shape[0]``
    student logits against the teacher's: the student head may be wider, e.g. padded), ``CE``
    the student's cross-entropy over its whole head at T = 1, summed over the same rows;
    ``normalizer`` defaults to the number of valid rows. Both terms' gradients are combined in
    the forward pass. Returns the differentiable loss and the two detached sums.
    """
    plan, hs, ht, flat_labels = _prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence,
        loca_alpha=loca_alpha, temperature=temperature, chunk_size=chunk_size, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        validate=validate, vocab_size=student_weight.shape[0],
    )
    scale, divide_by = _scale(flat_labels, ignore_index, normalizer, "mean")
    total, div_sum, ce_sum = _run(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias,
                                  flat_labels, plan, chunk_size, kd_weight * scale, ce_weight * scale)
    loss = total if divide_by is None else total / divide_by
    return LinearTerms(loss, div_sum.detach(), ce_sum.detach())
