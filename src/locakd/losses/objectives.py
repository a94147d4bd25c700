"""The language-model training objective: ``(1 - kd_ratio) * CE + kd_ratio * divergence`` on response tokens.

:class:`LMObjective` takes raw causal-LM outputs ``[B, L, V]`` and labels ``[B, L]`` aligned with
``input_ids`` (Hugging Face convention, ``IGNORE_INDEX`` = -100 on prompt and padding positions), shifts
them so that the logits at ``t`` predict the token at ``t + 1``, and returns the *summed* float32
cross-entropy and divergence (:func:`locakd.losses.token.token_distill_loss`, optionally LoCa) divided
by a normaliser the caller passes: the response tokens of the whole accumulated, all-rank batch, so
gradient accumulation and several processes weigh every token the same.

Pure tensor code: no config, model or data module is imported here (a method is anything with
``name``, ``divergence`` and ``loca``, e.g. :class:`locakd.lm.config.MethodSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError
from .token import shift_for_next_token, token_distill_loss

__all__ = ["IGNORE_INDEX", "LMObjective", "LossTerms", "MethodLike", "crop_logits", "summed_cross_entropy"]

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


@dataclass
class LossTerms:
    loss: torch.Tensor  # what to backward: (weighted sum) / normalizer
    ce_sum: torch.Tensor  # detached float32 sums
    kd_sum: torch.Tensor


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
                 teacher_logits: torch.Tensor | None, normalizer: torch.Tensor | float) -> LossTerms:
        """``student_logits``/``teacher_logits`` are raw causal-LM outputs ``[B, L, V]``; ``labels`` ``[B, L]``
        aligned with ``input_ids`` (the next-token shift happens here)."""
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
        return LossTerms(loss, ce_sum.detach(), kd_sum.detach())
