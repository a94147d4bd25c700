"""The language-model training objective: ``(1 - kd_ratio) * CE + kd_ratio * divergence`` on response tokens.

:class:`LMObjective` takes raw causal-LM outputs ``[B, L, V]`` and labels ``[B, L]`` aligned with
``input_ids`` (Hugging Face convention, ``IGNORE_INDEX`` = -100 on prompt and padding positions), shifts
them so that the logits at ``t`` predict the token at ``t + 1``, and returns the *summed* float32
cross-entropy and divergence (:func:`locakd.losses.token.token_distill_loss`, optionally LoCa) divided
by a normaliser the caller passes: the response tokens of the whole accumulated, all-rank batch, so
gradient accumulation and several processes weigh every token the same.

:meth:`LMObjective.fused` is the same objective from what the two models' output layers consume
(:class:`HeadInputs`: final hidden states, head weight and bias) instead of their logits
(:func:`locakd.losses.linear.linear_distill_objective`): no ``[tokens, V]`` logit tensor is built, and
the result equals the logits form to float32 rounding. :func:`head_cross_entropy_sum` and
:func:`head_misinstructed_count` give the validation CE and the teacher's mis-instruction count the
same way, chunk by chunk.

Pure tensor code: no config, model or data module is imported here (a method is anything with
``name``, ``divergence`` and ``loca``, e.g. :class:`locakd.lm.config.MethodSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..calibration import misinstruction_mask, misinstruction_rows
from ..errors import ConfigError, InputError
from .linear import linear_distill_objective
from .token import shift_for_next_token, token_distill_loss

__all__ = [
    "IGNORE_INDEX",
    "HeadInputs",
    "LMObjective",
    "LossTerms",
    "MethodLike",
    "crop_head",
    "crop_logits",
    "head_cross_entropy_sum",
    "head_misinstructed_count",
    "summed_cross_entropy",
]

IGNORE_INDEX = -100
"""Label value of positions that are not trained (prompt and padding)."""


class MethodLike(Protocol):
    name: str
    divergence: str | None  # None: cross-entropy only (sft)
    loca: bool


def crop_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits[..., :vocab_size]`` (a view). Raises InputError when the last dim is smaller."""
    size = logits.shape[-1]
    if size < vocab_size:
        raise InputError(f"cannot crop logits with {size} entries to a vocabulary of {vocab_size}")
    if size == vocab_size:
        return logits
    return logits[..., :vocab_size]


def _ce_block(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    valid = labels != IGNORE_INDEX
    return F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum")


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of the float32 cross-entropy over rows whose (aligned) label is not -100.

    With ``chunk_size`` the rows are processed in blocks under activation checkpointing, so the float32
    log-softmax of only one block is alive at a time (values and gradients are unchanged).
    """
    vocab = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    if chunk_size is None or flat.shape[0] <= chunk_size or not flat.requires_grad:
        return _ce_block(flat, flat_labels)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_size):
        block_labels = flat_labels[start:start + chunk_size]
        if bool((block_labels != IGNORE_INDEX).any()):
            total = total + checkpoint(_ce_block, flat[start:start + chunk_size], block_labels,
                                       use_reentrant=False, preserve_rng_state=False)
    return total


class HeadInputs(NamedTuple):
    """What a causal LM's linear output layer works on: its logits are ``hidden @ weight.T + bias``."""

    hidden: torch.Tensor  # [B, L, H] final hidden states (after the final norm), aligned with input_ids
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]


def crop_head(head: HeadInputs, vocab_size: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight[:V], bias[:V])``: the rows of the shared vocabulary (the head form of :func:`crop_logits`)."""
    rows = head.weight.shape[0]
    if rows < vocab_size:
        raise InputError(f"cannot crop the {what}'s output layer with {rows} rows to a vocabulary of {vocab_size}")
    if rows == vocab_size:
        return head.weight, head.bias
    return head.weight[:vocab_size], None if head.bias is None else head.bias[:vocab_size]


def _head_logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                       chunk_size: int | None):
    """``(logits, labels)`` of the rows whose label is not -100, ``chunk_size`` rows at a time, in the
    float dtype the losses compute in (float32; float64 stays float64). ``labels`` are aligned with
    ``hidden``'s rows (shifted already)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    step = max(1, rows.numel() if chunk_size is None else chunk_size)
    for start in range(0, rows.numel(), step):
        picked = rows[start:start + step]
        h = flat.detach().index_select(0, picked).to(dtype)
        yield (h @ w.t() if b is None else torch.addmm(b, h, w.t())), flat_labels.index_select(0, picked)


@torch.no_grad()
def head_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk_size: int | None = 1024) -> torch.Tensor:
    """Summed float32 cross-entropy of the logits ``hidden @ weight.T + bias`` against ``labels`` (rows
    labelled -100 skipped), ``chunk_size`` rows at a time, without gradient: the validation loss of the
    fused lm-head path (equals :func:`summed_cross_entropy` of the logits to float32 rounding)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    for logits, targets in _head_logit_chunks(hidden, weight, bias, labels, chunk_size):
        total += (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    return total


@torch.no_grad()
def head_misinstructed_count(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             bias: torch.Tensor | None = None, chunk_size: int | None = 1024) -> torch.Tensor:
    """Rows (label not -100) whose top logit of ``hidden @ weight.T + bias`` is not the label's (a tie
    counts as right, as :func:`locakd.calibration.misinstruction_mask`), chunk by chunk: the teacher's
    mis-instruction count without its ``[tokens, V]`` logits. A float64 scalar."""
    count = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for logits, targets in _head_logit_chunks(hidden, weight, bias, labels, chunk_size):
        count += misinstruction_rows(logits, targets, IGNORE_INDEX).mask.sum()
    return count


@dataclass
class LossTerms:
    loss: torch.Tensor  # what to backward: (weighted sum) / normalizer
    ce_sum: torch.Tensor  # detached float32 sums
    kd_sum: torch.Tensor
    n_misinstructed: torch.Tensor | None = None  # float64: tokens whose teacher top-1 is not the label (when asked)


@dataclass(frozen=True)
class LMObjective:
    """``(1 - kd_ratio) * CE + kd_ratio * divergence`` on response tokens, divided by a given normaliser."""

    spec: MethodLike
    kd_ratio: float = 0.5
    loca_alpha: float = 0.9
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    chunk_size: int | None = 1024
    vocab_size: int | None = None  # shared vocabulary of the divergence (crop_vocab)

    @classmethod
    def from_config(cls, method: Any, vocab_size: int | None = None) -> LMObjective:
        """From an LM ``method`` config section (its ``spec`` plus the loss settings)."""
        return cls(spec=method.spec, kd_ratio=method.kd_ratio, loca_alpha=method.loca_alpha,
                   temperature=method.temperature, jsd_beta=method.jsd_beta, skew_lambda=method.skew_lambda,
                   chunk_size=method.chunk_size, vocab_size=vocab_size)

    @property
    def uses_teacher(self) -> bool:
        return self.spec.divergence is not None

    def __call__(self, student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None, normalizer: torch.Tensor | float, *,
                 count_misinstructed: bool = False) -> LossTerms:
        """``student_logits``/``teacher_logits`` are raw causal-LM outputs ``[B, L, V]``; ``labels`` ``[B, L]``
        aligned with ``input_ids`` (the next-token shift happens here). ``count_misinstructed``: also count
        the response tokens whose teacher top-1 token is not the label (``LossTerms.n_misinstructed``)."""
        if student_logits.shape[:-1] != labels.shape:
            raise InputError(f"logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not align")
        s_logits, targets = shift_for_next_token(student_logits, labels)
        # CE over the student's full output layer (padded rows are pushed down too).
        ce_sum = summed_cross_entropy(s_logits, targets, self.chunk_size)
        if self.spec.divergence is None:
            return LossTerms(ce_sum / normalizer, ce_sum.detach(), torch.zeros_like(ce_sum.detach()))
        if teacher_logits is None:
            raise ConfigError(f"method '{self.spec.name}' needs teacher logits")
        t_logits, _ = shift_for_next_token(teacher_logits, labels)
        if self.vocab_size is not None:
            s_logits, t_logits = crop_logits(s_logits, self.vocab_size), crop_logits(t_logits, self.vocab_size)
        kd_sum = token_distill_loss(
            s_logits, t_logits, targets, self.spec.divergence,
            loca_alpha=self.loca_alpha if self.spec.loca else None, temperature=self.temperature,
            chunk_size=self.chunk_size, jsd_beta=self.jsd_beta, skew_lambda=self.skew_lambda,
            reduction="sum", validate=False,
        )
        loss = ((1.0 - self.kd_ratio) * ce_sum + self.kd_ratio * kd_sum) / normalizer
        n_mis = None
        if count_misinstructed:
            n_mis = misinstruction_mask(t_logits, targets, ignore_index=IGNORE_INDEX, validate=False).sum().double()
        return LossTerms(loss, ce_sum.detach(), kd_sum.detach(), n_mis)

    def fused(self, student: HeadInputs, labels: torch.Tensor, teacher: HeadInputs | None,
              normalizer: torch.Tensor | float, *, count_misinstructed: bool = False) -> LossTerms:
        """The objective from the two output layers' inputs instead of their logits (``method.fused_lm_head``).

        ``student`` / ``teacher`` hold hidden states ``[B, L, H]`` aligned with ``input_ids`` and ``labels``
        ``[B, L]`` (the shift happens here) and each head's weight ``[V, H]`` and bias. Equals
        ``self(hidden_s @ W_s.T + b_s, labels, hidden_t @ W_t.T + b_t, normalizer)`` to float32 rounding,
        but computes both terms and their gradients chunk by chunk
        (:func:`~locakd.losses.linear.linear_distill_objective`, float32 accumulation whatever the dtypes),
        so neither ``[tokens, V]`` logit tensor is built. The CE covers the student's whole output layer;
        with ``vocab_size`` the divergence compares the teacher's first ``vocab_size`` rows (``weight[:V]``).
        Gradients reach the student's hidden states, weight (tied or not) and bias.
        """
        if self.spec.divergence is None:
            raise ConfigError(f"method '{self.spec.name}' trains on the cross-entropy only: the fused lm-head "
                              "objective computes CE + divergence to a teacher")
        if teacher is None:
            raise ConfigError(f"method '{self.spec.name}' needs the teacher's hidden states and output layer")
        if student.hidden.shape[:-1] != labels.shape or teacher.hidden.shape[:-1] != labels.shape:
            raise InputError(f"hidden states {tuple(student.hidden.shape)} (student) / {tuple(teacher.hidden.shape)} "
                             f"(teacher) and labels {tuple(labels.shape)} do not align")
        hs, targets = shift_for_next_token(student.hidden, labels)
        ht, _ = shift_for_next_token(teacher.hidden, labels)
        if self.vocab_size is not None:
            wt, bt = crop_head(teacher, self.vocab_size, "teacher")
            crop_head(student, self.vocab_size, "student")  # the student must cover the shared vocabulary too
        else:
            wt, bt = teacher.weight, teacher.bias
            if student.weight.shape[0] != wt.shape[0]:
                raise InputError(f"the student's output layer has {student.weight.shape[0]} rows, the teacher's "
                                 f"{wt.shape[0]}: pass vocab_size (crop_vocab) to compare the shared first rows")
        chunk = self.chunk_size if self.chunk_size is not None else max(1, targets.numel())
        terms = linear_distill_objective(
            hs, student.weight, ht, wt, targets, self.spec.divergence,
            kd_weight=self.kd_ratio, ce_weight=1.0 - self.kd_ratio, normalizer=normalizer,
            loca_alpha=self.loca_alpha if self.spec.loca else None, temperature=self.temperature,
            chunk_size=chunk, student_bias=student.bias, teacher_bias=bt, ignore_index=IGNORE_INDEX,
            jsd_beta=self.jsd_beta, skew_lambda=self.skew_lambda, validate=False,
        )
        n_mis = head_misinstructed_count(ht, wt, targets, bt, chunk) if count_misinstructed else None
        return LossTerms(terms.loss, terms.ce_sum, terms.divergence_sum, n_mis)
