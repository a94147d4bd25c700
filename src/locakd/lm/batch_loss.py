"""How one micro-batch becomes its loss terms: where the models' outputs come from and which objective consumes them.

Both LM engines -- the own loop (:func:`locakd.lm.trainer.accumulate_gradients`, validation) and the
Trainer (:meth:`locakd.lm.hf_trainer.DistillationTrainer.compute_loss`) -- call a :class:`MicroBatchLoss`
made by :func:`micro_batch_loss`, the one place that decides how the student's and the teacher's outputs
of a micro-batch are produced and which form of :class:`~locakd.losses.objectives.LMObjective` consumes
them:

* :class:`DenseLogits` (default): both models' full forwards return ``[B, L, V]`` logits, consumed by
  ``LMObjective.__call__``;
* :class:`FusedHead` (``method.fused_lm_head``): both forwards stop at the output layer
  (:class:`~locakd.lm.fused_head.HeadTap`) and ``LMObjective.fused`` computes CE + divergence from hidden
  states and head weights chunk by chunk, so neither model's ``[tokens, V]`` logits are built.

Each returns the same :class:`~locakd.losses.objectives.LossTerms` (differentiable loss divided by the
caller's normaliser, detached CE and divergence sums, optionally the teacher's mis-instruction count),
so normalisation, accumulation and logging do not depend on the source. Another teacher source (e.g. a
cached sparse teacher) is one more class with the same two methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from ..losses.objectives import LMObjective, LossTerms, head_cross_entropy_sum, summed_cross_entropy
from ..losses.token import shift_for_next_token
from .fused_head import FUSED_SETTING, HeadTap, is_sharded

__all__ = ["DenseLogits", "FusedHead", "MicroBatchLoss", "logits_of", "micro_batch_loss"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a causal LM's output (an object with ``.logits``, a tuple, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def _forward_kwargs(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def _maybe(context: Any) -> Any:
    return context if context is not None else contextlib.nullcontext()


class MicroBatchLoss(Protocol):
    """The loss terms of one micro-batch (``input_ids``, ``attention_mask``, ``labels`` aligned with the ids)."""

    objective: LMObjective

    def __call__(self, student: nn.Module, batch: Mapping[str, torch.Tensor], normalizer: torch.Tensor | float, *,
                 autocast: Any = None, count_misinstructed: bool = False) -> tuple[LossTerms, Any]:
        """``(terms, student output)``: the teacher runs without gradient, the student under ``autocast``
        (a context manager or None); ``terms.loss`` is the objective's sums divided by ``normalizer``."""
        ...

    def summed_ce(self, model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                  autocast: Any = None) -> tuple[torch.Tensor, Any]:
        """``(CE sum, model output)``: the student's summed float32 cross-entropy over the batch's response
        tokens (validation; no gradient)."""
        ...


@dataclass
class DenseLogits:
    """Full forwards of student and teacher; the objective consumes their ``[B, L, V]`` logits."""

    objective: LMObjective
    teacher: nn.Module | None = None

    def __call__(self, student: nn.Module, batch: Mapping[str, torch.Tensor], normalizer: torch.Tensor | float, *,
                 autocast: Any = None, count_misinstructed: bool = False) -> tuple[LossTerms, Any]:
        forward = _forward_kwargs(batch)
        teacher_logits = None
        if self.objective.uses_teacher:
            if self.teacher is None:
                raise ConfigError(f"method '{self.objective.spec.name}' needs a teacher")
            with torch.no_grad():
                teacher_logits = logits_of(self.teacher(**forward))
        with _maybe(autocast):
            output = student(**forward)
        terms = self.objective(logits_of(output), batch["labels"], teacher_logits, normalizer,
                               count_misinstructed=count_misinstructed and teacher_logits is not None)
        return terms, output

    def summed_ce(self, model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                  autocast: Any = None) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            with _maybe(autocast):
                output = model(**_forward_kwargs(batch))
            s_logits, targets = shift_for_next_token(logits_of(output), batch["labels"])
            return summed_cross_entropy(s_logits, targets, self.objective.chunk_size), output


@dataclass
class FusedHead:
    """Forwards that stop at the output layer; the objective consumes hidden states and head weights
    (:meth:`~locakd.losses.objectives.LMObjective.fused`), so no ``[tokens, V]`` logits are built."""

    objective: LMObjective
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        # an FSDP-sharded teacher frees its gathered head after the forward: the tap keeps a float32 copy
        self._teacher_sharded = self.teacher is not None and is_sharded(self.teacher)
        if not self.objective.uses_teacher:
            raise ConfigError(f"{FUSED_SETTING} fuses the divergence to a teacher with the cross-entropy; method "
                              f"'{self.objective.spec.name}' has no divergence: set it to false")

    def __call__(self, student: nn.Module, batch: Mapping[str, torch.Tensor], normalizer: torch.Tensor | float, *,
                 autocast: Any = None, count_misinstructed: bool = False) -> tuple[LossTerms, Any]:
        if self.teacher is None:
            raise ConfigError(f"method '{self.objective.spec.name}' needs a teacher")
        forward = _forward_kwargs(batch)
        ids = batch["input_ids"]
        with torch.no_grad(), HeadTap(self.teacher, "teacher", copy_weights=self._teacher_sharded) as teacher_tap:
            self.teacher(**forward)
        with _maybe(autocast), HeadTap(student, "student") as student_tap:
            output = student(**forward)
        student_head, teacher_head = student_tap.inputs(ids), teacher_tap.inputs(ids)
        # the loss accumulates in float32 itself; autocast would only lower its projections' precision
        with torch.autocast(student_head.hidden.device.type, enabled=False):
            terms = self.objective.fused(student_head, batch["labels"], teacher_head, normalizer,
                                         count_misinstructed=count_misinstructed)
        # Tie the loss to the forward's output, the empty [B, 0, V] logits (their sum is exactly 0): wrappers that
        # hook the outputs to follow the backward (FSDP1's pre-backward hooks, DDP's unused-parameter search)
        # then see it, as they do for a loss computed from the logits.
        empty = logits_of(output)
        if empty.numel() != 0:
            raise ConfigError(f"{FUSED_SETTING}: the student's forward returned logits of shape {tuple(empty.shape)} "
                              "although its output layer received no position; set it to false for this model")
        return dataclasses.replace(terms, loss=terms.loss + empty.sum()), output

    def summed_ce(self, model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                  autocast: Any = None) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            with _maybe(autocast), HeadTap(model, "student") as tap:
                output = model(**_forward_kwargs(batch))
            head = tap.inputs(batch["input_ids"])
            hidden, targets = shift_for_next_token(head.hidden, batch["labels"])
            with torch.autocast(hidden.device.type, enabled=False):
                ce = head_cross_entropy_sum(hidden, head.weight, targets, head.bias, self.objective.chunk_size)
            return ce, output


def micro_batch_loss(objective: LMObjective, teacher: nn.Module | None, *, fused_lm_head: bool = False) -> MicroBatchLoss:
    """The :class:`MicroBatchLoss` of a run: :class:`FusedHead` with ``fused_lm_head``, else :class:`DenseLogits`."""
    if fused_lm_head:
        return FusedHead(objective, teacher)
    return DenseLogits(objective, teacher)
