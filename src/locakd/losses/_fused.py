"""Row-block kernels: the loss of each block of rows and its gradient in one pass.

Every divergence here has a closed-form gradient with respect to the student logits: with
u = z / T, q = softmax(u) and g = dL/dq, ``dL/du = q * (g - <q, g>)`` (forward KL reduces to
``q - p``). So the forward pass computes, block of rows by block of rows, the rows' losses
*and* their gradient, stores the gradient (in the input dtype) and the backward pass only
scales it by ``grad_output``: nothing is recomputed, and the float32 intermediates exist for
one block at a time (the block is sized to stay in the CPU cache).

The fast path assumes finite logits. A row whose fast result is not finite (a -inf masked
class, or an exp that underflowed in a mixture) is recomputed by the log-space formula of
its registry entry with autograd, which handles masks exactly; when ``validate`` is on, such
a row first triggers the precise NaN/+inf diagnosis of the inputs. So the checks cost
nothing in the common case.

The divergence-specific block functions live with their registry entries
(:mod:`locakd.losses.token`); this module holds what they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._validation import check_logits, compute_dtype
from ..calibration import loca_log_target, scale_terms
from ..errors import InputError
from ._common import floor_log_probs

# Elements per block on the CPU (1 MiB of float32 per scratch buffer): small enough for the
# buffers of a block to stay in cache, large enough that the per-op Python overhead stays a few
# per cent. On an accelerator the block only has to amortise the kernel launches (64 MiB).
BLOCK_ELEMENTS = 1 << 18
DEVICE_BLOCK_ELEMENTS = 1 << 24


class Scratch:
    """Float scratch buffers ``[rows, V]`` allocated once per call and reused by every block
    (a fresh allocation per block costs page faults that are a large share of the work)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(index)
        if buffer is None:
            buffer = self._buffers[index] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buffer[:rows]


@dataclass
class Block:
    """One block of rows, everything in the compute dtype (float32, or float64 for float64 input).

    ``a`` and ``b`` are the student's and teacher's logits / T, each shifted so that its row max
    is 0: ``log q = a - log_ss`` and ``log p = b - log_st`` (``p`` the possibly LoCa-calibrated
    target). ``eb = exp(b)``, so ``p = eb / st``. The buffers are scratch: a block function may
    overwrite them, and :meth:`spare` hands out more.
    """

    a: torch.Tensor
    b: torch.Tensor
    eb: torch.Tensor
    st: torch.Tensor  # [rows, 1]
    log_st: torch.Tensor  # [rows, 1]
    scratch: Scratch

    def spare(self, index: int) -> torch.Tensor:
        """Scratch buffer ``index`` (1, 2, ...) of the block's shape."""
        return self.scratch.get(3 + index, self.a.shape[0])

    def student_exp(self, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(exp(a), ss, log_ss)``; with ``inplace`` the exponential overwrites ``a``, otherwise
        it goes to spare buffer 1."""
        ea = self.a.exp_() if inplace else torch.exp(self.a, out=self.spare(1))
        ss = ea.sum(dim=-1, keepdim=True)
        return ea, ss, ss.log()

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Row dot products ``[rows, 1]`` (the product goes to a scratch buffer, not a new tensor)."""
        return torch.mul(x, y, out=self.scratch.get(3, x.shape[0])).sum(dim=-1, keepdim=True)


def softmax_grad(out: torch.Tensor, ea: torch.Tensor, coef: torch.Tensor, g: torch.Tensor, qg: torch.Tensor) -> None:
    """``out = coef * ea * (g - qg)``: with ``coef`` = weight / (T ss), the softmax gradient
    ``q * (g - <q, g>)`` of ``g = dL/dq`` (``qg`` = <q, g>, ``[rows, 1]``). ``g`` is overwritten."""
    g.sub_(qg).mul_(ea)
    _store(out, g, coef)


def _store(out: torch.Tensor, values: torch.Tensor, coef: torch.Tensor) -> None:
    """``out = values * coef`` (``out`` may be of a lower dtype: rounded once, at the end)."""
    if out.dtype == values.dtype:
        torch.mul(values, coef, out=out)
    else:
        out.copy_(values.mul_(coef))


def store_difference(
    out: torch.Tensor, x: torch.Tensor, x_coef: torch.Tensor, y: torch.Tensor, y_coef: torch.Tensor
) -> None:
    """``out = x * x_coef - y * y_coef`` (row coefficients ``[rows, 1]``), e.g. ``c (q - p)``."""
    if out.dtype == x.dtype:
        torch.mul(x, x_coef, out=out)
        out.addcmul_(y, y_coef, value=-1.0)
    else:
        out.copy_(x.mul_(x_coef).addcmul_(y, y_coef, value=-1.0))


# --------------------------------------------------------------------------- the plan of one call
@dataclass(frozen=True)
class RowsPlan:
    """Everything a fused call needs besides the tensors.

    ``target`` is ``"logits"`` (teacher logits, calibrated here when ``loca_alpha`` is set) or
    ``"log_probs"`` (an already transformed, normalised teacher log-target).
    """

    divergence: Any  # a locakd.losses.token.Divergence
    options: Any  # its DivergenceOptions
    temperature: float = 1.0
    loca_alpha: float | None = None
    ignore_index: int = -100
    target: str = "logits"
    block_rows: int | None = None  # cap on rows per block (chunk_size); None: sized for the cache
    per_row: bool = False  # return per-row losses instead of their sum
    validate: bool = True


def block_rows_for(plan: RowsPlan, vocab: int, device: torch.device) -> int:
    """Rows per block: sized for the device, capped by the caller's ``chunk_size``."""
    elements = BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    rows = max(1, elements // max(vocab, 1))
    return rows if plan.block_rows is None else max(1, min(rows, plan.block_rows))


def _teacher_block(zt: torch.Tensor, labels: torch.Tensor | None, plan: RowsPlan, scratch: Scratch, inv_t: float):
    """``(b, eb, st, log_st)`` of one block, LoCa applied (a new label entry, every other entry x s)."""
    rows = zt.shape[0]
    b, eb = scratch.get(1, rows), scratch.get(2, rows)
    if plan.target == "log_probs":
        b.copy_(zt)
        torch.exp(b, out=eb)
        st = eb.sum(dim=-1, keepdim=True)
        return b, eb, st, st.log()
    mt = zt.amax(dim=-1, keepdim=True)
    _shifted(zt, mt, inv_t, b)
    torch.exp(b, out=eb)
    st = eb.sum(dim=-1, keepdim=True)
    log_st = st.log()
    if plan.loca_alpha is None:
        return b, eb, st, log_st
    # LoCa on the block's rows. The mask compares raw logits (T-invariant, exact ties); the top
    # class has b = 0, so log p_k = -log st and log p_gt = b_gt - log st.
    valid = labels != plan.ignore_index
    index = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    changed = valid.unsqueeze(-1) & (zt.gather(-1, index) < mt)
    b_gt = b.gather(-1, index)
    log_scale, log_new_gt, _ = scale_terms(b_gt - log_st, -log_st, changed, plan.loca_alpha)
    # p' = s p off the label: the same b with the normaliser st / s; the label gets log p'_gt.
    log_st = log_st - log_scale
    new_b_gt = torch.where(changed, log_new_gt + log_st, b_gt)
    b.scatter_(-1, index, new_b_gt)
    eb.scatter_(-1, index, new_b_gt.exp())
    return b, eb, log_st.exp(), log_st


def _shifted(z: torch.Tensor, top: torch.Tensor, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """``out = z / T - max / T`` in the compute dtype, one pass (the upcast of fp16/bf16 included)."""
    return torch.add(top.to(out.dtype) * -inv_t, z, alpha=inv_t, out=out)


# --------------------------------------------------------------------------- the kernel
class RowsResult(NamedTuple):
    losses: torch.Tensor  # [N] divergence per row (0 on ignored rows), unweighted
    grad: torch.Tensor | None  # [N, Vs] gradient of the weighted sum, times grad_scale, or None
    ce_losses: torch.Tensor | None  # [N] cross-entropy per row when asked for, else None
    grad_scale: float = 1.0  # the stored gradient is the true one times this power of two


def float16_prescale(dtype: torch.dtype, size: float) -> float:
    """A power of two that brings a gradient of typical entry ``size`` to ~1 when it is stored in
    float16 (1.0 for other dtypes).

    float16's range is narrow: a mean over thousands of tokens has entries far below its
    smallest normal number, which would be flushed before the backward multiplies in the
    (loss-scaled) ``grad_output``. Stored times this factor, and divided by it in the backward,
    they keep float16's full relative precision. bfloat16 has float32's range and needs none.
    """
    if dtype != torch.float16 or not size > 0 or not math.isfinite(size):
        return 1.0
    return 2.0 ** -math.floor(math.log2(size))


def run_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    row_coef: torch.Tensor | None,
    scale: float,
    plan: RowsPlan,
    *,
    with_grad: bool,
    grad_out: torch.Tensor | None = None,
    checked: tuple[tuple[str, torch.Tensor], ...] | None = None,
    ce_scale: float | None = None,
    refetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RowsResult:
    """Per-row losses ``[N]`` (0 on ignored rows) and, with ``with_grad``, the gradient of
    ``sum(scale * row_coef * loss_rows)`` with respect to ``student`` (``[N, Vs]``, its dtype).

    ``student`` is ``[N, Vs]`` and ``teacher`` ``[N, V]`` with ``V <= Vs``: the divergence
    compares the first ``V`` student logits with the teacher's (a student with a padded
    vocabulary). ``row_coef`` (``[N]`` or None) weighs each row's gradient; the returned losses
    are unweighted. With ``ce_scale`` the cross-entropy of the full student row against its
    label (at T = 1) is computed in the same pass and ``ce_scale * row_coef * dCE/dz`` is added
    to the gradient. ``grad_out`` may pass the buffer to write the gradient into; it may alias
    ``student`` (each block is read before it is written), and then ``refetch(rows)`` must give
    the original ``(student rows, teacher rows)`` for the rows the fallback recomputes.
    ``checked`` names the caller's raw inputs for the NaN/+inf diagnosis (default: ``student``
    and ``teacher`` as student_logits / teacher_logits).
    """
    if checked is None:
        checked = (("student_logits", student), ("teacher_logits", teacher))
    n, width = student.shape
    vocab = teacher.shape[-1]
    dtype = compute_dtype(student)
    inv_t = 1.0 / plan.temperature
    losses = torch.zeros(n, dtype=dtype, device=student.device)
    ce_losses = None if ce_scale is None else torch.zeros(n, dtype=dtype, device=student.device)
    grad = None
    grad_scale = 1.0
    if with_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(student)
        grad_scale = float16_prescale(grad.dtype, scale * inv_t)
        scale, ce_scale = scale * grad_scale, None if ce_scale is None else ce_scale * grad_scale
    valid, rows = None, None
    if labels is not None:
        valid = labels != plan.ignore_index
        rows = valid.nonzero().squeeze(-1) if not bool(valid.all()) else None
    if rows is not None and grad is not None:
        grad[~valid] = 0
    count = n if rows is None else rows.numel()
    step = block_rows_for(plan, width, student.device)
    scratch = Scratch(min(step, max(count, 1)), vocab, dtype, student.device)
    ce_scratch = None if ce_scale is None else Scratch(min(step, max(count, 1)), width, dtype, student.device)
    for start in range(0, count, step):
        stop = min(start + step, count)
        if rows is None:
            index = None
            zs, zt = student[start:stop], teacher[start:stop]
            lab = None if labels is None else labels[start:stop]
            coef = None if row_coef is None else row_coef[start:stop]
        else:
            index = rows[start:stop]
            zs, zt = student.index_select(0, index), teacher.index_select(0, index)
            lab = labels.index_select(0, index)
            coef = None if row_coef is None else row_coef.index_select(0, index)
        zs_div = zs if width == vocab else zs[:, :vocab]
        a = _shifted(zs_div, zs_div.amax(dim=-1, keepdim=True), inv_t, scratch.get(0, stop - start))
        ce = None if ce_scratch is None else _cross_entropy_block(zs, lab, ce_scratch)
        b, eb, st, log_st = _teacher_block(zt, lab, plan, scratch, inv_t)
        block = Block(a=a, b=b, eb=eb, st=st, log_st=log_st, scratch=scratch)
        gcoef = out = None
        if grad is not None:
            gcoef = torch.full((stop - start, 1), scale * inv_t, dtype=dtype, device=student.device)
            if coef is not None:
                gcoef = gcoef * coef.to(dtype).unsqueeze(-1)
            out = grad[start:stop] if index is None else torch.empty_like(zs)
        rows_loss = plan.divergence.block(block, plan.options, gcoef, None if out is None else out[:, :vocab])
        if ce is not None:
            ce_rows, probs, ce_sum = ce
            if out is not None:
                ce_coef = torch.full((stop - start, 1), ce_scale, dtype=dtype, device=student.device)
                if coef is not None:
                    ce_coef = ce_coef * coef.to(dtype).unsqueeze(-1)
                _add_cross_entropy_grad(out, vocab, probs, ce_coef, ce_sum, lab)
            _put(ce_losses, start, stop, index, ce_rows)
        _put(losses, start, stop, index, rows_loss)
        if index is not None and out is not None:
            grad.index_copy_(0, index, out)
    bad = ~torch.isfinite(losses)
    if ce_losses is not None:
        bad |= ~torch.isfinite(ce_losses)
    if bool(bad.any()):
        if plan.validate:
            for name, tensor in checked:
                check_logits(name, tensor)
        fetch = refetch or (lambda index: (student.index_select(0, index), teacher.index_select(0, index)))
        fixed = _FixRows(fetch, labels, row_coef, scale, ce_scale, plan, losses, ce_losses, grad)
        fixed(bad.nonzero().squeeze(-1), step)
    if plan.validate and rows is not None:
        _check_skipped_rows(checked, ~valid)
    return RowsResult(losses, grad, ce_losses, grad_scale)


def _put(target: torch.Tensor, start: int, stop: int, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is None:
        target[start:stop] = values
    else:
        target.index_copy_(0, index, values.to(target.dtype))


def _cross_entropy_block(zs: torch.Tensor, labels: torch.Tensor, scratch: Scratch):
    """``(ce rows, exp(z - max), its row sum)`` of the full student rows at T = 1."""
    x = _shifted(zs, zs.amax(dim=-1, keepdim=True), 1.0, scratch.get(0, zs.shape[0]))
    x_gt = x.gather(-1, labels.unsqueeze(-1))
    probs = x.exp_()
    total = probs.sum(dim=-1, keepdim=True)
    return (total.log() - x_gt).squeeze(-1), probs, total


def _add_cross_entropy_grad(out, vocab, probs, coef, total, labels) -> None:
    """``out += coef * (softmax(z) - one_hot(label))``; columns from ``vocab`` on had no divergence
    gradient, so they are set, not added to."""
    weight = coef / total
    out[:, :vocab].addcmul_(probs[:, :vocab], weight)
    if out.shape[-1] > vocab:
        torch.mul(probs[:, vocab:], weight, out=out[:, vocab:])
    out.scatter_add_(-1, labels.unsqueeze(-1), -coef)


def _check_skipped_rows(checked: tuple[tuple[str, torch.Tensor], ...], ignored: torch.Tensor) -> None:
    """NaN/+inf in rows the loss skips is still bad input: one max per row finds it."""
    for name, tensor in checked:
        top = tensor.detach().amax(dim=-1).reshape(-1)[ignored]
        if bool((top.isnan() | (top == float("inf"))).any()):
            check_logits(name, tensor)


def robust_rows(
    zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, plan: RowsPlan
) -> torch.Tensor:
    """The rows' losses by the registry's log-space formula (masks exact), with autograd on ``zs``."""
    dtype = compute_dtype(zs)
    log_q = torch.log_softmax(zs.to(dtype) / plan.temperature, dim=-1)
    with torch.no_grad():
        if plan.target == "log_probs":
            log_p = zt.to(dtype)
        elif plan.loca_alpha is not None:
            log_p = loca_log_target(zt, labels, plan.loca_alpha, plan.temperature, plan.ignore_index).log_probs
        else:
            log_p = torch.log_softmax(zt.to(dtype) / plan.temperature, dim=-1)
    return plan.divergence.rows(floor_log_probs(log_p), floor_log_probs(log_q), plan.options)


@dataclass
class _FixRows:
    """Recompute by the log-space formulas (with autograd) the rows whose fast result is not finite."""

    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor | None
    row_coef: torch.Tensor | None
    scale: float
    ce_scale: float | None
    plan: RowsPlan
    losses: torch.Tensor
    ce_losses: torch.Tensor | None
    grad: torch.Tensor | None

    def __call__(self, bad: torch.Tensor, step: int) -> None:
        for index in bad.split(step):
            zs, zt = self.fetch(index)
            lab = None if self.labels is None else self.labels.index_select(0, index)
            with torch.enable_grad():
                x = zs.detach().requires_grad_(self.grad is not None)
                rows_loss = robust_rows(x if zs.shape[-1] == zt.shape[-1] else x[:, : zt.shape[-1]], zt, lab, self.plan)
                total = rows_loss * self.scale
                ce_rows = None
                if self.ce_losses is not None:
                    ce_rows = torch.nn.functional.cross_entropy(x.to(rows_loss.dtype), lab, reduction="none")
                    total = total + ce_rows * self.ce_scale
                if self.grad is not None:
                    if self.row_coef is not None:
                        total = total * self.row_coef.index_select(0, index).to(total.dtype)
                    (block_grad,) = torch.autograd.grad(total.sum(), x)
                    self.grad.index_copy_(0, index, block_grad.to(self.grad.dtype))
            self.losses.index_copy_(0, index, rows_loss.detach().to(self.losses.dtype))
            if ce_rows is not None:
                self.ce_losses.index_copy_(0, index, ce_rows.detach().to(self.ce_losses.dtype))
        if self.plan.validate and not bool(torch.isfinite(self.losses[bad]).all()):
            raise InputError(
                f"the loss is not finite on {int((~torch.isfinite(self.losses)).sum())} row(s) although the "
                "logits hold no NaN or +inf: a row whose logits are all -inf (nothing left to predict)?"
            )


class FusedRowsFunction(torch.autograd.Function):
    """Forward: losses and gradient of every row block; backward: the stored gradient, scaled."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_coef, scale, plan, checked):  # noqa: D401
        losses, grad, _, grad_scale = run_rows(
            student, teacher, labels, row_coef, scale, plan, with_grad=True, checked=checked
        )
        ctx.grad, ctx.grad_scale = grad, grad_scale
        ctx.per_row = plan.per_row
        return _combine(losses, scale, row_coef, plan.per_row)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the fused loss hands its stored gradient over in the first backward pass; "
                "a second backward through the same graph (retain_graph=True) is not supported"
            )
        ctx.grad = None  # let autograd own (and free) the buffer
        factor = grad_output if ctx.grad_scale == 1.0 else grad_output.float() / ctx.grad_scale
        if ctx.per_row:
            grad.mul_(factor.unsqueeze(-1))
        elif ctx.grad_scale != 1.0 or grad_output.device.type != "cpu" or float(grad_output) != 1.0:
            grad.mul_(factor)
        return grad, None, None, None, None, None, None


def fused_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    plan: RowsPlan,
    *,
    scale: float = 1.0,
    row_coef: torch.Tensor | None = None,
    checked: tuple[tuple[str, torch.Tensor], ...] | None = None,
) -> torch.Tensor:
    """``sum(scale * row_coef * loss_rows)`` of 2-D ``student``/``teacher`` (with ``plan.per_row``
    the ``[N]`` terms instead of their sum); differentiable with respect to ``student`` only."""
    teacher = teacher.detach()
    if student.requires_grad and torch.is_grad_enabled():
        return FusedRowsFunction.apply(student, teacher, labels, row_coef, scale, plan, checked)
    losses = run_rows(student.detach(), teacher, labels, row_coef, scale, plan, with_grad=False, checked=checked).losses
    return _combine(losses, scale, row_coef, plan.per_row)


def _combine(losses: torch.Tensor, scale: float, row_coef: torch.Tensor | None, per_row: bool) -> torch.Tensor:
    """``scale * row_coef * losses``, per row or summed."""
    weighted = losses * scale if row_coef is None else losses * (scale * row_coef.to(losses.dtype))
    return weighted if per_row else weighted.sum()
