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

* :class:`CachedTeacher` (``model.teacher_cache``): only the student runs; the teacher of the micro-batch
  is read from an offline cache (:mod:`locakd.lm.cache`: top-k log-probabilities, the label's and the
  tail mass, looked up by the batch's :data:`~locakd.lm.data.EXAMPLE_INDEX`) and the divergence is
  :func:`~locakd.losses.sparse.sparse_token_distill_loss` (tail as one bucket, LoCa exact).

Each returns the same :class:`~locakd.losses.objectives.LossTerms` (differentiable loss divided by the
caller's normaliser, detached CE and divergence sums, optionally the teacher's mis-instruction count),
so normalisation, accumulation and logging do not depend on the source.
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
from ..losses.objectives import (
    LMObjective,
    LossTerms,
    crop_logits,
    head_cross_entropy_sum,
    summed_cross_entropy,
)
from ..losses.sparse import sparse_misinstruction_mask, sparse_token_distill_loss
from ..losses.token import shift_for_next_token
from .data import EXAMPLE_INDEX
from .fused_head import FUSED_SETTING, HeadTap, is_sharded

__all__ = ["CachedTeacher", "DenseLogits", "FusedHead", "MicroBatchLoss", "logits_of", "micro_batch_loss"]


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


@dataclass
class CachedTeacher:
    """The student's full forward; the teacher's top-k log-probabilities of the micro-batch come from an offline
    cache (``cache``: a :class:`~locakd.lm.cache.TeacherCache` of the training examples, opened with
    :func:`~locakd.lm.cache.open_teacher_cache`), looked up by the batch's ``EXAMPLE_INDEX`` tensor.

    The terms are the dense path's with the divergence swapped for its sparse form: the student's CE over its
    whole output layer plus ``kd_ratio`` times :func:`~locakd.losses.sparse.sparse_token_distill_loss` (the
    run's divergence, LoCa alpha and temperature; the student's logits cropped to the cache's vocabulary),
    both summed over response tokens and divided by the caller's ``normalizer``, so accumulation, DDP and
    ``num_items_in_batch`` weigh tokens exactly as with a live teacher. ``method.fused_lm_head`` is refused:
    the sparse divergence needs the student's logits.
    """

    objective: LMObjective
    cache: Any

    def __post_init__(self) -> None:
        if not self.objective.uses_teacher:
            raise ConfigError(f"method '{self.objective.spec.name}' has no divergence: it does not read a teacher cache")

    def _targets(self, batch: Mapping[str, torch.Tensor]):
        from .cache.run import teacher_cache_targets

        indices = batch.get(EXAMPLE_INDEX)
        if indices is None:
            raise ConfigError(f"the batch has no '{EXAMPLE_INDEX}': training from a teacher cache needs each "
                              "example's index in the tokenised training set (collate with "
                              "locakd.lm.data.make_collate_fn over locakd.lm.cache.IndexedExamples)")
        return teacher_cache_targets(self.cache, indices.tolist(), batch["labels"])

    def __call__(self, student: nn.Module, batch: Mapping[str, torch.Tensor], normalizer: torch.Tensor | float, *,
                 autocast: Any = None, count_misinstructed: bool = False) -> tuple[LossTerms, Any]:
        objective = self.objective
        targets = self._targets(batch)
        with _maybe(autocast):
            output = student(**_forward_kwargs(batch))
        logits = logits_of(output)
        labels = batch["labels"]
        if logits.shape[:-1] != labels.shape:
            raise ConfigError(f"the student's logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
        s_logits, shifted = shift_for_next_token(logits, labels)
        ce_sum = summed_cross_entropy(s_logits, shifted, objective.chunk_size)
        kd_sum = sparse_token_distill_loss(
            crop_logits(s_logits, self.cache.vocab_size), targets.topk_ids, targets.topk_logprobs, targets.labels,
            targets.label_logprob, objective.spec.divergence, tail_logprob=targets.tail_logprob,
            loca_alpha=objective.loca_alpha if objective.spec.loca else None, temperature=objective.temperature,
            chunk_size=objective.chunk_size, jsd_beta=objective.jsd_beta, skew_lambda=objective.skew_lambda,
            reduction="sum", validate=False,
        )
        loss = ((1.0 - objective.kd_ratio) * ce_sum + objective.kd_ratio * kd_sum) / normalizer
        n_mis = None
        if count_misinstructed:
            n_mis = sparse_misinstruction_mask(targets.topk_ids, targets.topk_logprobs, targets.labels,
                                               targets.label_logprob).sum().double()
        return LossTerms(loss, ce_sum.detach(), kd_sum.detach(), n_mis), output

    def summed_ce(self, model: nn.Module, batch: Mapping[str, torch.Tensor], *,
                  autocast: Any = None) -> tuple[torch.Tensor, Any]:
        return DenseLogits(self.objective).summed_ce(model, batch, autocast=autocast)


def micro_batch_loss(objective: LMObjective, teacher: nn.Module | None, *, fused_lm_head: bool = False,
                     teacher_cache: Any = None) -> MicroBatchLoss:
    """The :class:`MicroBatchLoss` of a run: :class:`CachedTeacher` with a ``teacher_cache`` (a
    :class:`~locakd.lm.cache.TeacherCache`) and a method with a divergence, else :class:`FusedHead` with
    ``fused_lm_head``, else :class:`DenseLogits`."""
    if teacher_cache is not None and objective.uses_teacher:
        if teacher is not None:
            raise ConfigError("a run distills from model.teacher or from model.teacher_cache, not both at once")
        if fused_lm_head:
            raise ConfigError(f"{FUSED_SETTING} is not supported with model.teacher_cache: the cached (sparse) "
                              "teacher's divergence needs the student's logits; set it to false")
        return CachedTeacher(objective, teacher_cache)
    if fused_lm_head:
        return FusedHead(objective, teacher)
    return DenseLogits(objective, teacher)
