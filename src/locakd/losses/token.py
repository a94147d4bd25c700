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

Each divergence is computed by a row-block kernel (:mod:`locakd.losses._fused`) that
produces every block's loss *and* its closed-form gradient in the forward pass; the backward
pass only scales the stored gradient. ``chunk_size`` caps the rows per block (the float32
scratch memory); values and gradients equal the float64 reference to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validation import check_temperature, check_unit_interval
from ..errors import InputError
from ._common import (
    check_chunk_size,
    check_normalizer,
    check_reduction,
    floor_log_probs,
    kl_rows,
    validate_pair,
)
from ._fused import Block, RowsPlan, fused_rows, softmax_grad, store_difference


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
# (block, options, gradient coefficient [rows, 1] or None, gradient output [rows, V] or None)
#   -> per-row divergence [rows]; writes coef * dL/du into the output (u = z / T)
BlockFunction = Callable[[Block, DivergenceOptions, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One token-level divergence: its value and gradient, and its LM method name.

    ``rows`` is the log-space formula (exact with -inf masks; the reference the fast path is
    tested against and its fallback); ``block`` computes a block's rows *and* their gradient
    with respect to the student logits in one pass (see :mod:`locakd.losses._fused`).
    """

    name: str
    lm_method: str  # short method name of ``locakd lm-distill`` (``+loca`` is appended for LoCa)
    rows: RowsFunction
    block: BlockFunction
    summary: str


# Each block function below uses q = softmax(u), p the target, m a mixture, and the closed form
# dL/du = q * (g - <q, g>) for g = dL/dq (constants in g cancel); blk.a / blk.b are u and the
# target's logits minus their row max, so log q = a - log ss and log p = b - log st.
def _forward_kl(log_p, log_q, options):
    return kl_rows(log_p, log_q)


def _forward_kl_block(blk, options, coef, out):
    # KL(p || q) = <p, b - a> - log st + log ss;  dL/du = q - p
    pb, pa = blk.dot(blk.eb, blk.b), blk.dot(blk.eb, blk.a)
    ea, ss, log_ss = blk.student_exp(inplace=True)
    if out is not None:
        store_difference(out, ea, coef / ss, blk.eb, coef / blk.st)
    return ((pb - pa) / blk.st - blk.log_st + log_ss).squeeze(-1)


def _reverse_kl(log_p, log_q, options):
    return kl_rows(log_q, log_p)


def _reverse_kl_block(blk, options, coef, out):
    # KL(q || p) = <q, a - b> - log ss + log st;  g = log q - log p: g - <q, g> = d - <q, d>, d = a - b
    d = torch.sub(blk.a, blk.b, out=blk.b)
    ea, ss, log_ss = blk.student_exp(inplace=True)
    qd = blk.dot(ea, d) / ss
    if out is not None:
        softmax_grad(out, ea, coef / ss, d, qd)
    return (qd - log_ss + blk.log_st).squeeze(-1)


def _jsd(log_p, log_q, options):
    beta = options.jsd_beta
    log_mix = _mixture(log_p, log_q, beta)
    return beta * kl_rows(log_p, log_mix) + (1 - beta) * kl_rows(log_q, log_mix)


def _jsd_block(blk, options, coef, out):
    # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;  g = (1 - beta) log(q / m)
    beta = options.jsd_beta
    ea, ss, log_ss = blk.student_exp()
    log_m = torch.mul(blk.eb, beta / blk.st, out=blk.spare(2)).addcmul_(ea, (1 - beta) / ss).log_()
    pb, pm = blk.dot(blk.eb, blk.b), blk.dot(blk.eb, log_m)
    qa, qm = blk.dot(ea, blk.a), blk.dot(ea, log_m)
    loss = beta * ((pb - pm) / blk.st - blk.log_st) + (1 - beta) * ((qa - qm) / ss - log_ss)
    if out is not None:
        g = torch.sub(blk.a, log_m, out=log_m)  # log(q / m) + log ss
        softmax_grad(out, ea, coef * (1 - beta) / ss, g, (qa - qm) / ss)
    return loss.squeeze(-1)


def _skew_forward_kl(log_p, log_q, options):
    return kl_rows(log_p, _mixture(log_p, log_q, options.skew_lambda))


def _skew_forward_kl_block(blk, options, coef, out):
    # KL(p || m), m = lam p + (1 - lam) q;  g = -(1 - lam) p / m
    lam = options.skew_lambda
    ea, ss, _ = blk.student_exp(inplace=True)
    mix = torch.mul(blk.eb, lam / blk.st, out=blk.spare(1)).addcmul_(ea, (1 - lam) / ss)
    ratio = torch.div(blk.eb, mix, out=blk.spare(2)) if out is not None else None  # st * p / m
    log_m = mix.log_()
    loss = (blk.dot(blk.eb, blk.b) - blk.dot(blk.eb, log_m)) / blk.st - blk.log_st
    if out is not None:
        softmax_grad(out, ea, -coef * (1 - lam) / (ss * blk.st), ratio, blk.dot(ea, ratio) / ss)
    return loss.squeeze(-1)


def _skew_reverse_kl(log_p, log_q, options):
    return kl_rows(log_q, _mixture(log_q, log_p, options.skew_lambda))


def _skew_reverse_kl_block(blk, options, coef, out):
    # KL(q || m), m = lam q + (1 - lam) p;  g = log(q / m) - lam q / m  (+1, which cancels)
    lam = options.skew_lambda
    ea, ss, log_ss = blk.student_exp()
    mix = torch.mul(ea, lam / ss, out=blk.spare(2)).addcmul_(blk.eb, (1 - lam) / blk.st)
    ratio = torch.div(ea, mix, out=blk.eb) if out is not None else None  # ss * q / m (p no longer needed)
    log_m = mix.log_()
    qa, qm = blk.dot(ea, blk.a), blk.dot(ea, log_m)
    if out is not None:
        g = torch.sub(blk.a, log_m, out=log_m).addcmul_(ratio, -lam / ss)
        softmax_grad(out, ea, coef / ss, g, blk.dot(ea, g) / ss)
    return ((qa - qm) / ss - log_ss).squeeze(-1)


def _total_variation(log_p, log_q, options):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


def _total_variation_block(blk, options, coef, out):
    # 0.5 sum |q - p|;  g = 0.5 sign(q - p)
    ea, ss, _ = blk.student_exp(inplace=True)
    d = torch.mul(ea, 1 / ss, out=blk.b).addcmul_(blk.eb, -1 / blk.st)
    loss = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=-1)
    if out is not None:
        g = d.sign_()
        softmax_grad(out, ea, coef * 0.5 / ss, g, blk.dot(ea, g) / ss)
    return loss


REGISTRY: dict[str, Divergence] = {
    entry.name: entry
    for entry in (
        Divergence("forward_kl", "kd", _forward_kl, _forward_kl_block, "KL(p || q)"),
        Divergence("reverse_kl", "rkl", _reverse_kl, _reverse_kl_block, "KL(q || p)"),
        Divergence(
            "jsd", "jsd", _jsd, _jsd_block, "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q"
        ),
        Divergence(
            "skew_forward_kl", "skew-kl", _skew_forward_kl, _skew_forward_kl_block, "KL(p || lam p + (1 - lam) q)"
        ),
        Divergence(
            "skew_reverse_kl", "skew-rkl", _skew_reverse_kl, _skew_reverse_kl_block, "KL(q || lam q + (1 - lam) p)"
        ),
        Divergence("total_variation", "tv", _total_variation, _total_variation_block, "0.5 sum |p - q|"),
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
        chunk_size: at most this many token rows per block (None: blocks sized for the CPU cache).
            Either way each block's loss and gradient are computed in one pass and only the
            gradient (one ``[tokens, V]`` tensor in the input dtype) is kept for the backward, so
            ``chunk_size`` bounds the float32 scratch memory (a few ``[chunk_size, V]`` buffers)
            and costs no speed.
        jsd_beta: mixing weight of ``jsd`` in (0, 1); 0.5 is the symmetric Jensen-Shannon divergence.
        skew_lambda: skew weight of the skew divergences in (0, 1); DistiLLM uses 0.1.
        reduction: ``"mean"`` (sum / normalizer) or ``"sum"``.
        validate: check shapes, dtypes, label range and the mixing weights first; NaN/+inf in the
            logits is detected from the loss rows the kernel computes anyway (then diagnosed
            precisely), so the check costs no extra pass over the logits.

    The backward pass hands over a gradient computed in the forward pass: a second backward
    through the same graph (``retain_graph=True``) raises, and the loss is differentiable once.
    """
    entry = get_divergence(divergence)
    check_reduction(reduction, ("mean", "sum"), name="token_distill_loss reduction")
    if validate:
        validate_pair(student_logits, teacher_logits, labels, ignore_index, finite=False)
        temperature = check_temperature(temperature)
        if loca_alpha is not None:
            loca_alpha = check_unit_interval(loca_alpha, "loca_alpha", closed=False)
        jsd_beta = check_unit_interval(jsd_beta, "jsd_beta", closed=False)
        skew_lambda = check_unit_interval(skew_lambda, "skew_lambda", closed=False)
        check_chunk_size(chunk_size)
    if reduction == "mean":
        check_normalizer(normalizer)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    plan = RowsPlan(
        divergence=entry,
        options=DivergenceOptions(jsd_beta, skew_lambda),
        temperature=temperature,
        loca_alpha=loca_alpha,
        ignore_index=ignore_index,
        block_rows=chunk_size,
        validate=validate,
    )
    scale, divide_by = 1.0, None
    if reduction == "mean":
        if normalizer is None:
            scale = 1.0 / max(int((flat_labels != ignore_index).sum()), 1)
        elif isinstance(normalizer, torch.Tensor):
            divide_by = normalizer  # a tensor stays a tensor (no host sync): divided by autograd
        else:
            scale = 1.0 / float(normalizer)
    checked = (("student_logits", student_logits), ("teacher_logits", teacher_logits))
    total = fused_rows(student, teacher, flat_labels, plan, scale=scale, checked=checked)
    return total if divide_by is None else total / divide_by


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
