"""Token-level divergences for distilling causal language models, with optional LoCa.

Every response token is a classification over the vocabulary. The functions take
student and teacher logits ``[B, T, V]`` (or ``[N, V]``) and labels ``[B, T]``
*already aligned*: the label at a position is the token the logits at that
position should predict (use :func:`shift_for_next_token` on raw causal-LM outputs).
Positions labelled ``ignore_index`` (prompt, padding) are neither calibrated nor
counted.

Divergences (p = teacher target, optionally LoCa-calibrated; q = student):
    ``forward_kl``        KL(p || q)
    ``reverse_kl``        KL(q || p)
    ``jsd``               beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q
    ``skew_forward_kl``   KL(p || lam p + (1 - lam) q)       (DistiLLM's skew KL)
    ``skew_reverse_kl``   KL(q || lam q + (1 - lam) p)       (DistiLLM's skew reverse KL)
    ``total_variation``   0.5 * sum |p - q|

The summed loss is divided by ``normalizer``: pass the number of valid tokens of the
whole accumulated, all-rank batch so that gradient accumulation and several
processes weigh every token equally (default: the valid tokens of this call).

``chunk_size`` computes the loss over blocks of token rows with a custom autograd
function that recomputes each block in the backward pass, so the float32
``[tokens, V]`` intermediates exist for one block at a time; the values and
gradients equal the one-shot computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .._validation import check_temperature, check_unit_interval, compute_dtype
from ..calibration import loca_log_target
from ..errors import InputError
from ._common import floor_log_probs, kl_rows, validate_pair


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM outputs with their targets: logits at t predict the label at t + 1."""
    return logits[..., :-1, :], labels[..., 1:]


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a and log b."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DivergenceOptions:
    """The mixing weights some divergences read."""

    jsd_beta: float = 0.5
    skew_lambda: float = 0.1


# (log target p, log student q, options) -> per-row divergence; inputs already floored (no -inf)
RowsFunction = Callable[[torch.Tensor, torch.Tensor, DivergenceOptions], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One token-level divergence: its per-row value in log space and its LM method name."""

    name: str
    lm_method: str  # short method name of ``locakd lm-distill`` (``+loca`` is appended for LoCa)
    rows: RowsFunction
    summary: str


def _forward_kl(log_p, log_q, options):
    return kl_rows(log_p, log_q)


def _reverse_kl(log_p, log_q, options):
    return kl_rows(log_q, log_p)


def _jsd(log_p, log_q, options):
    beta = options.jsd_beta
    log_mix = _mixture(log_p, log_q, beta)
    return beta * kl_rows(log_p, log_mix) + (1 - beta) * kl_rows(log_q, log_mix)


def _skew_forward_kl(log_p, log_q, options):
    return kl_rows(log_p, _mixture(log_p, log_q, options.skew_lambda))


def _skew_reverse_kl(log_p, log_q, options):
    return kl_rows(log_q, _mixture(log_q, log_p, options.skew_lambda))


def _total_variation(log_p, log_q, options):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


REGISTRY: dict[str, Divergence] = {
    entry.name: entry
    for entry in (
        Divergence("forward_kl", "kd", _forward_kl, "KL(p || q)"),
        Divergence("reverse_kl", "rkl", _reverse_kl, "KL(q || p)"),
        Divergence("jsd", "jsd", _jsd, "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q"),
        Divergence("skew_forward_kl", "skew-kl", _skew_forward_kl, "KL(p || lam p + (1 - lam) q)"),
        Divergence("skew_reverse_kl", "skew-rkl", _skew_reverse_kl, "KL(q || lam q + (1 - lam) p)"),
        Divergence("total_variation", "tv", _total_variation, "0.5 sum |p - q|"),
    )
}
DIVERGENCES: tuple[str, ...] = tuple(REGISTRY)  # the names, in registry order


def get_divergence(name: str) -> Divergence:
    """The registry entry of ``name`` (InputError listing the choices if unknown)."""
    entry = REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InputError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return entry


def divergence_rows(
    name: str,
    log_student: torch.Tensor,
    log_target: torch.Tensor,
    *,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence between target and student log-probabilities (float32 rows)."""
    entry = get_divergence(name)
    # Entries masked (-inf) in both distributions must give 0, not NaN, in mixtures too.
    return entry.rows(
        floor_log_probs(log_target), floor_log_probs(log_student), DivergenceOptions(jsd_beta, skew_lambda)
    )


def _token_rows_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str,
    loca_alpha: float | None,
    temperature: float,
    ignore_index: int,
    jsd_beta: float,
    skew_lambda: float,
) -> torch.Tensor:
    """Summed divergence over the valid rows of 2-D ``student``/``teacher`` blocks."""
    valid = labels != ignore_index
    if not bool(valid.all()):
        student, teacher, labels = student[valid], teacher[valid], labels[valid]
    if student.shape[0] == 0:
        # No valid token: a zero that still backpropagates (a zero gradient), so an
        # all-prompt micro-batch in gradient accumulation needs no special case.
        return student.to(compute_dtype(student)).sum()
    with torch.no_grad():
        teacher32 = teacher.detach().to(compute_dtype(teacher))
        if loca_alpha is None:
            log_target = torch.log_softmax(teacher32 / temperature, dim=-1)
        else:
            log_target = loca_log_target(teacher32, labels, loca_alpha, temperature, ignore_index).log_probs
    log_student = torch.log_softmax(student.to(compute_dtype(student)) / temperature, dim=-1)
    return divergence_rows(
        divergence, log_student, log_target, jsd_beta=jsd_beta, skew_lambda=skew_lambda
    ).sum()


class _ChunkedRowsLoss(torch.autograd.Function):
    """Sum of ``rows_loss`` over row blocks; the backward recomputes one block at a time."""

    @staticmethod
    def forward(ctx, student, teacher, labels, rows_loss, chunk_size):  # noqa: D401
        total = student.new_zeros((), dtype=compute_dtype(student))
        for start in range(0, student.shape[0], chunk_size):
            stop = start + chunk_size
            total = total + rows_loss(student[start:stop], teacher[start:stop], labels[start:stop])
        ctx.save_for_backward(student, teacher, labels)
        ctx.rows_loss = rows_loss
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, labels = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            with torch.enable_grad():
                block = student[start:stop].detach().requires_grad_(True)
                loss = ctx.rows_loss(block, teacher[start:stop], labels[start:stop])
                if loss.requires_grad:  # False for a block with no valid row
                    (block_grad,) = torch.autograd.grad(loss, block)
                    grad[start:stop] = block_grad * grad_output
        return grad, None, None, None, None


def token_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    *,
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
    """Token-level distillation loss between a student and a (optionally LoCa-calibrated) teacher.

    Args:
        student_logits, teacher_logits: ``[..., V]`` aligned logits of the same shape.
        labels: ``[...]`` next-token ids aligned with the logits; ``ignore_index`` masks a position.
        divergence: one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``,
            ``skew_reverse_kl``, ``total_variation``.
        loca_alpha: calibrate the teacher's next-token distribution with LoCa (None: plain).
        temperature: softmax temperature of both distributions (the MiniLLM recipe uses 1);
            unlike image KD no T^2 factor is applied.
        normalizer: divide the summed loss by this (e.g. all valid tokens of the accumulated,
            all-rank batch); default: the valid tokens in ``labels``.
        chunk_size: rows per block for the memory-saving path (None: one shot).
        jsd_beta: mixing weight of ``jsd`` in (0, 1); 0.5 is the symmetric Jensen-Shannon divergence.
        skew_lambda: skew weight of the skew divergences in (0, 1); DistiLLM uses 0.1.
        reduction: ``"mean"`` (sum / normalizer) or ``"sum"``.
    """
    get_divergence(divergence)
    if reduction not in ("mean", "sum"):
        raise InputError(f"token_distill_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    if validate:
        validate_pair(student_logits, teacher_logits, labels, ignore_index)
        temperature = check_temperature(temperature)
        if loca_alpha is not None:
            loca_alpha = check_unit_interval(loca_alpha, "loca_alpha", closed=False)
        jsd_beta = check_unit_interval(jsd_beta, "jsd_beta", closed=False)
        skew_lambda = check_unit_interval(skew_lambda, "skew_lambda", closed=False)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    rows_loss: Callable[..., torch.Tensor] = partial(
        _token_rows_loss,
        divergence=divergence,
        loca_alpha=loca_alpha,
        temperature=temperature,
        ignore_index=ignore_index,
        jsd_beta=jsd_beta,
        skew_lambda=skew_lambda,
    )
    if chunk_size is None or chunk_size >= student.shape[0]:
        total = rows_loss(student, teacher, flat_labels)
    else:
        total = _ChunkedRowsLoss.apply(student, teacher, flat_labels, rows_loss, chunk_size)
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = (flat_labels != ignore_index).sum().clamp(min=1).to(total.dtype)
    elif not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise InputError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


def _named(divergence: str) -> Callable[..., torch.Tensor]:
    def loss(student_logits, teacher_logits, labels, **kwargs):
        return token_distill_loss(student_logits, teacher_logits, labels, divergence, **kwargs)

    loss.__name__ = f"{divergence}_loss"
    loss.__doc__ = f"``token_distill_loss(..., divergence={divergence!r})``; see :func:`token_distill_loss`."
    return loss


forward_kl_loss = _named("forward_kl")
reverse_kl_loss = _named("reverse_kl")
jsd_loss = _named("jsd")
skew_forward_kl_loss = _named("skew_forward_kl")
skew_reverse_kl_loss = _named("skew_reverse_kl")
total_variation_loss = _named("total_variation")
