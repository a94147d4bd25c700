"""LoCa distillation inside a Hugging Face ``transformers.Trainer`` (exposed as :mod:`locakd.hf`).

For users who already train with ``Trainer`` / TRL under ``accelerate`` (DDP, FSDP, DeepSpeed)::

    from locakd.hf import DistillationArguments, DistillationTrainer

    args = DistillationArguments(output_dir="out", method="kd+loca", loca_alpha=0.9, kd_ratio=0.5)
    trainer = DistillationTrainer(model="student", teacher_model="teacher", args=args,
                                  train_dataset=records, processing_class=tokenizer)
    trainer.train()

* The loss is the project's LM objective (the one ``locakd lm-distill`` trains with):
  ``(1 - kd_ratio) * CE + kd_ratio * divergence`` summed over response tokens and divided by
  ``num_items_in_batch``, the response-token count of the whole accumulated batch summed over
  processes (``average_tokens_across_devices``), so every token weighs the same whatever the split
  over micro-batches and processes -- the update equals one big batch, as in ``lm-distill``.
* The teacher is frozen (:class:`~locakd.teachers.FrozenTeacher`: eval mode, no gradient), never part
  of the student (so never in a checkpoint), on the student's device, and prepared for the engine:
  plain / DDP through ``accelerator.prepare_model(evaluation_mode=True)``, FSDP wrapped (sharded)
  with the run's FSDP plugin, DeepSpeed initialised for inference (ZeRO-3 shards it) -- as TRL
  prepares reference models.
* Training logs add ``ce``, ``kd`` (the divergence term) and ``teacher_misinstruction_rate`` (share of
  response tokens whose teacher top-1 token is not the label) to the Trainer's own logs, so every
  ``report_to`` integration receives them. ``eval_loss`` is the student's cross-entropy per response
  token (the validation loss ``lm-distill`` reports; the teacher is not run during evaluation).
* ``fused_lm_head=True`` computes the objective from both models' final hidden states and output-layer
  weights chunk by chunk (:class:`locakd.lm.batch_loss.FusedHead`): the student's forward still runs
  through the DDP / FSDP wrapper, but neither model builds its ``[tokens, V]`` logits; the loss, the logged
  terms and the mis-instruction rate equal the unfused ones to float32 rounding.
* ``teacher_cache=`` (a :class:`locakd.lm.cache.TeacherCache` of the training examples, opened with
  :func:`locakd.lm.cache.open_teacher_cache`) replaces the teacher: its top-k log-probabilities are read
  for each micro-batch (:class:`locakd.lm.batch_loss.CachedTeacher`, the sparse divergence with the tail
  as one bucket and LoCa exact). ``train_dataset`` must then be the tokenised examples the cache was
  captured from, in that order: each example carries its index (the cache's row key) through the
  sampler, DDP sharding and the collator; the model's forward never sees it. Not with ``fused_lm_head``.
* Datasets may be tokenised already (``input_ids`` + ``labels``) or be records in any layout of
  :data:`locakd.lm.data.DATA_FORMATS` (TRL's ``messages`` and ``prompt``/``completion``, or Dolly),
  which are tokenised with the prompt masked.

``transformers`` is imported by this module; ``import locakd`` never imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from ..engine.run import check_finite
from ..errors import ConfigError, DataError
from ..losses.objectives import LMObjective
from ..teachers import FrozenTeacher, freeze_teacher
from .batch_loss import micro_batch_loss
from .config import METHODS, method_spec
from .data import (
    EXAMPLE_INDEX,
    PROMPT_TEMPLATES,
    PromptTemplate,
    count_valid_tokens,
    make_collate_fn,
    normalise_records,
    tokenize_examples,
)
from .fused_head import FUSED_SETTING, check_fused_head
from .models import (
    check_same_tokenizer,
    check_teacher_tokenizer,
    check_vocab,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
)

__all__ = ["DistillationArguments", "DistillationTrainer"]

_OPT_OUT = "DistillationArguments(check_tokenizer=False)"


@dataclass
class DistillationArguments(transformers.TrainingArguments):
    """``TrainingArguments`` plus the distillation settings of ``locakd lm-distill`` (same names and meaning)."""

    method: str = field(default="kd+loca", metadata={
        "help": f"distillation method: {', '.join(METHODS)}. loss = (1 - kd_ratio) * CE + kd_ratio * divergence "
                "over response tokens; +loca calibrates the teacher where its top-1 token is wrong"})
    kd_ratio: float = field(default=0.5, metadata={
        "help": "weight of the divergence term in [0, 1] (ignored by sft); MiniLLM uses 0.5"})
    loca_alpha: float = field(default=0.9, metadata={
        "help": "LoCa strength in (0, 1) for the +loca methods: the label leads the calibrated teacher "
                "by 1 - alpha"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of teacher and student in the divergence"})
    jsd_beta: float = field(default=0.5, metadata={"help": "mixing weight of jsd in (0, 1)"})
    skew_lambda: float = field(default=0.1, metadata={"help": "skew weight of skew-kl / skew-rkl in (0, 1)"})
    chunk_size: int | None = field(default=1024, metadata={
        "help": "token rows per block of the vocabulary-wide losses, recomputed in the backward pass to bound "
                "memory (None: one shot)"})
    crop_vocab: bool = field(default=False, metadata={
        "help": "if teacher and student output layers differ in size (padded embedding rows), compare only "
                "the shared first V logits"})
    fused_lm_head: bool = field(default=False, metadata={
        "help": "compute CE + divergence from both models' final hidden states and output-layer weights, chunk_size "
                "token rows at a time, so neither model's [tokens, vocab] logits are built (memory; not for sft). "
                "Equals the unfused loss to float32 rounding; models whose logits are not hidden @ W.T + b "
                "(soft-capping, logit scaling, a LoRA head) and DeepSpeed are refused"})
    check_tokenizer: bool = field(default=True, metadata={
        "help": "refuse a teacher whose tokenizer differs from the student's (vocabulary, special tokens, "
                "encoding); False skips the check"})
    teacher_dtype: str = field(default="float32", metadata={
        "help": "dtype a teacher given as a path is loaded in: float32, bfloat16 or float16"})
    max_length: int = field(default=1024, metadata={
        "help": "max tokens per example (prompt + response) when the datasets hold records to tokenise"})
    max_prompt_length: int = field(default=512, metadata={
        "help": "prompt tokens kept (cut from the left) when the datasets hold records to tokenise"})
    prompt_template: str = field(default="alpaca", metadata={
        "help": f"prompt template of Dolly records: {', '.join(PROMPT_TEMPLATES)} (chat records use the "
                "tokenizer's chat template)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = method_spec(self.method)  # ConfigError naming the known methods

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(0.0 <= self.kd_ratio <= 1.0, f"kd_ratio must be in [0, 1], got {self.kd_ratio}")
        check(not (spec.uses_teacher and self.kd_ratio == 0.0),
              f"method '{self.method}' with kd_ratio 0 trains on CE only; use method sft instead")
        check(0.0 < self.loca_alpha < 1.0, f"loca_alpha must be in (0, 1), got {self.loca_alpha}")
        check(self.temperature > 0 and math.isfinite(self.temperature),
              f"temperature must be > 0, got {self.temperature}")
        check(0.0 < self.jsd_beta < 1.0, f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        check(0.0 < self.skew_lambda < 1.0, f"skew_lambda must be in (0, 1), got {self.skew_lambda}")
        check(self.chunk_size is None or self.chunk_size >= 1, f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        check(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        check(1 <= self.max_prompt_length <= self.max_length,
              f"max_prompt_length must be in [1, max_length={self.max_length}], got {self.max_prompt_length}")
        PromptTemplate.from_config(self.prompt_template)
        resolve_dtype(self.teacher_dtype)
        check(not (self.fused_lm_head and not spec.uses_teacher),
              f"fused_lm_head=True fuses the divergence to a teacher with the cross-entropy; method '{self.method}' "
              "has no divergence: set fused_lm_head=False")

    def objective(self, vocab_size: int | None = None) -> LMObjective:
        """The loss these arguments describe (``vocab_size``: the shared size when ``crop_vocab`` crops)."""
        return LMObjective(spec=method_spec(self.method), kd_ratio=self.kd_ratio, loca_alpha=self.loca_alpha,
                           temperature=self.temperature, jsd_beta=self.jsd_beta, skew_lambda=self.skew_lambda,
                           chunk_size=self.chunk_size, vocab_size=vocab_size)


def _info(args: transformers.TrainingArguments, message: str) -> None:
    if args.process_index == 0:
        print(f"locakd.hf: {message}", file=sys.stderr, flush=True)


def _first(dataset: Any) -> Any:
    try:
        return dataset[0] if len(dataset) else None
    except (TypeError, KeyError, IndexError):  # not a map-style dataset
        return None


def _prepare_dataset(dataset: Any, tokenizer: Any, args: DistillationArguments, name: str) -> Any:
    """Tokenise a dataset of records; a dataset that is tokenised already (``input_ids``) is returned as is."""
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):  # several eval datasets by name (a dict or a datasets.DatasetDict)
        return {key: _prepare_dataset(value, tokenizer, args, f"{name}[{key!r}]") for key, value in dataset.items()}
    first = _first(dataset)
    if not isinstance(first, Mapping) or "input_ids" in first:
        return dataset
    records = normalise_records((dict(row) for row in dataset), name)
    tokenized = tokenize_examples(records, tokenizer, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length,
                                  template=PromptTemplate.from_config(args.prompt_template))
    _info(args, f"{name}: {tokenized.stats.summary()}")
    if len(tokenized) == 0:
        raise DataError(f"{name}: no example survived tokenisation ({tokenized.stats.summary()}); raise "
                        "max_length or check the records")
    return tokenized


def _name_or_path(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


# --------------------------------------------------------------------------------------------------
# Teacher preparation for the distributed engines (after TRL's prepare_deepspeed / prepare_fsdp)
# --------------------------------------------------------------------------------------------------


def _prepare_deepspeed_teacher(model: nn.Module, accelerator: Any) -> nn.Module:
    """DeepSpeed engine for inference: ZeRO-3 shards the teacher like the student; stages 0-2 keep it whole."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    hidden = getattr(model.config, "hidden_size", None)
    if getattr(model.config, "hidden_sizes", None):
        hidden = max(model.config.hidden_sizes)
    if stage == 3 and hidden is not None:
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                    stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
    # no optimizer / scheduler for a frozen model (DeepSpeed would otherwise build them)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    if stage != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _prepare_fsdp_teacher(model: nn.Module, accelerator: Any) -> nn.Module:
    """Shard the teacher with the run's FSDP plugin (FSDP1 wrapper or FSDP2 ``fully_shard``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = accelerator.state.fsdp_plugin
    if isinstance(model, FSDP):
        return model
    if plugin.fsdp_version == 1:
        plugin.set_auto_wrap_policy(model)
        model = FSDP(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            param_init_fn=plugin.param_init_fn,
            ignored_modules=plugin.ignored_modules,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
    else:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
                  "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
        # one FSDP unit per block (the plugin's wrap policy, as for the student), so a forward gathers one
        # block at a time instead of the whole teacher
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        if policy is not None:
            for module in reversed(list(model.modules())[1:]):
                if policy(module):
                    fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` that distills a frozen teacher into the student with locakd's LM objective.

    Args:
        model: the student: a model, or a folder / hub name loaded with ``AutoModelForCausalLM``.
        args: :class:`DistillationArguments` (``method``, ``kd_ratio``, ``loca_alpha`` ... beside the usual
            ``TrainingArguments``).
        teacher_model: the teacher: a model, or a folder / hub name (loaded in ``args.teacher_dtype``).
            Not needed for ``method="sft"``.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``): the student gets adapters and only they train;
            checkpoints and ``save_model`` then hold the adapter (``PeftModel.from_pretrained`` loads it).
        teacher_tokenizer: the teacher's tokenizer (object or path) for the tokenizer check, when the teacher
            is a model whose ``name_or_path`` holds no tokenizer.
        teacher_cache: instead of ``teacher_model``, an offline teacher cache
            (:class:`~locakd.lm.cache.TeacherCache`) of ``train_dataset``'s examples, in order.
        processing_class: the student's tokenizer (loaded from the student's folder when omitted).
        train_dataset / eval_dataset: tokenised examples (``input_ids``, ``labels`` with -100 on the prompt)
            or records of any :data:`locakd.lm.data.DATA_FORMATS` layout (tokenised here).
        data_collator: default: right padding with the tokenizer's pad id (labels padded with -100).
        **kwargs: passed to ``transformers.Trainer``.

    Before training, teacher and student must share the tokenizer (vocabulary, special tokens, encoding;
    ``check_tokenizer=False`` skips this) and their output layers must cover the same vocabulary
    (``crop_vocab=True`` compares the shared first V logits of padded layers).
    """

    # compute_loss divides by num_items_in_batch (the whole accumulated batch): nothing more to scale
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module | str | None = None, args: DistillationArguments | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, teacher_model: nn.Module | str | os.PathLike[str] | None = None,
                 peft_config: Any = None, teacher_tokenizer: Any = None, teacher_cache: Any = None,
                 **kwargs: Any) -> None:
        if args is None:
            args = DistillationArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationArguments):
            raise ConfigError(f"args must be locakd.hf.DistillationArguments (TrainingArguments plus the "
                              f"distillation settings), got {type(args).__name__}")
        if model is None:
            raise ConfigError("DistillationTrainer needs model= (the student: a model or a folder / hub name)")
        spec = method_spec(args.method)
        if isinstance(model, (str, os.PathLike)):
            if processing_class is None:
                processing_class = load_tokenizer(model)
            model = load_causal_lm(model, dtype="float32")
        if processing_class is None:
            source = _name_or_path(model)
            if source is None:
                raise ConfigError("pass processing_class= (the student's tokenizer): the student model does not "
                                  "say where it was loaded from")
            processing_class = load_tokenizer(source)
        if peft_config is not None:
            from .models import _peft

            peft = _peft()
            if isinstance(model, peft.PeftModel):
                raise ConfigError("the student is a PeftModel already; pass peft_config only for a plain model")
            try:
                model = peft.get_peft_model(model, peft_config)
            except ImportError as exc:
                raise ConfigError(f"peft cannot create the adapters in this environment: {exc}") from exc
            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad

        if teacher_cache is not None:
            if teacher_model is not None:
                raise ConfigError("pass teacher_model= or teacher_cache=, not both")
            if args.fused_lm_head:
                raise ConfigError("fused_lm_head=True is not supported with teacher_cache: the cached (sparse) "
                                  "teacher's divergence needs the student's logits; set it to False")
            teacher = None
        else:
            teacher = self._load_teacher(teacher_model, spec.uses_teacher, processing_class, teacher_tokenizer, args)
        vocab = check_vocab(teacher, model, processing_class, crop_to_shared=args.crop_vocab)
        if teacher_cache is not None:
            vocab = teacher_cache.vocab_size  # the softmax the cached log-probabilities were taken over
        self.vocab_size = vocab  # logits per position the loss compares (shared size when crop_vocab crops)
        self.teacher_cache = teacher_cache
        self.objective = args.objective(vocab_size=vocab if teacher is not None else None)
        self._eval_objective = dataclasses.replace(self.objective, spec=method_spec("sft"))  # CE only
        if args.fused_lm_head:  # refuse models whose logits are not hidden @ W.T + b, before wrapping / sharding
            check_fused_head(model, "student")
            if teacher is not None:
                check_fused_head(teacher, "teacher")

        if data_collator is None:
            data_collator = make_collate_fn(processing_class)
        train_dataset = _prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        if teacher_cache is not None and spec.uses_teacher:
            from .cache.run import IndexedExamples

            if train_dataset is None or len(train_dataset) != teacher_cache.num_examples:
                raise ConfigError(f"teacher_cache holds {teacher_cache.num_examples} examples, train_dataset "
                                  f"{None if train_dataset is None else len(train_dataset)}: pass the examples the "
                                  "cache was captured from, in order")
            train_dataset = IndexedExamples(train_dataset)  # each example carries its cache row key
        eval_dataset = _prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self.args.n_gpu > 1:
            raise ConfigError("DistillationTrainer does not support nn.DataParallel (several GPUs in one process); "
                              "launch with `accelerate launch` or `torchrun`, or expose one GPU")
        if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
            raise ConfigError("average_tokens_across_devices=False lets every process divide by its own token count, "
                              "so tokens weigh differently per process; DistillationTrainer weighs every response "
                              "token equally and needs average_tokens_across_devices=True")
        # The Trainer counts num_items_in_batch only for models that "accept loss kwargs"; compute_loss below
        # consumes it (the model never sees it). The count must be over labels[..., 1:], the positions a
        # next-token loss predicts, for every architecture (the Trainer infers that from the model's loss type).
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True

        if args.fused_lm_head and self.is_deepspeed_enabled:
            raise ConfigError(f"{FUSED_SETTING} is not supported under DeepSpeed: ZeRO-3 partitions the output-layer "
                              "weight the fused loss needs whole (and the path is untested there); set it to false")
        self.teacher_model = self._prepare_teacher(teacher) if teacher is not None else None
        # how a micro-batch's outputs are produced and which form of the objective consumes them
        self._loss_of = micro_batch_loss(self.objective, self.teacher_model, fused_lm_head=args.fused_lm_head,
                                         teacher_cache=teacher_cache)
        self._eval_loss_of = micro_batch_loss(self._eval_objective, None)
        device = self.args.device
        # [ce_sum, kd_sum, response tokens, mis-instructed tokens] since the last log; totals of the whole run
        self._train_sums = torch.zeros(4, dtype=torch.float64, device=device)
        self._train_totals = torch.zeros(4, dtype=torch.float64, device=device)
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=device)

    def _set_signature_columns_if_needed(self) -> None:
        """The model's forward arguments, plus the example index a teacher cache is read by: the Trainer's
        column removal keeps it for :meth:`compute_loss`, which never passes it to the model."""
        super()._set_signature_columns_if_needed()
        if EXAMPLE_INDEX not in self._signature_columns:
            self._signature_columns.append(EXAMPLE_INDEX)

    # ------------------------------------------------------------------------------------ teacher

    @staticmethod
    def _load_teacher(teacher: Any, needed: bool, tokenizer: Any, teacher_tokenizer: Any,
                      args: DistillationArguments) -> nn.Module | None:
        if teacher is None:
            if needed:
                raise ConfigError(f"method '{args.method}' needs teacher_model= (a model or a folder / hub name)")
            return None
        if not needed:
            _info(args, f"method {args.method} trains on the cross-entropy only; the teacher is not used")
            return None
        source = None
        if isinstance(teacher, (str, os.PathLike)):
            source = teacher
        else:
            if isinstance(teacher, FrozenTeacher):
                teacher = teacher.module
            if not isinstance(teacher, nn.Module):
                raise ConfigError(f"teacher_model must be a model or a folder / hub name, got {type(teacher).__name__}")
            source = _name_or_path(teacher)
        if args.check_tokenizer:  # before loading a large teacher from a path
            if teacher_tokenizer is not None and not isinstance(teacher_tokenizer, (str, os.PathLike)):
                check_same_tokenizer(teacher_tokenizer, tokenizer, opt_out=_OPT_OUT)
            elif teacher_tokenizer is not None or source is not None:
                check_teacher_tokenizer(teacher_tokenizer or source, tokenizer, opt_out=_OPT_OUT)
            else:
                raise ConfigError("cannot check that teacher and student share a tokenizer: the teacher model does "
                                  "not say where it was loaded from; pass teacher_tokenizer= (its tokenizer or "
                                  f"folder), or set {_OPT_OUT}")
        if isinstance(teacher, (str, os.PathLike)):
            teacher = load_causal_lm(teacher, dtype=args.teacher_dtype)
        return freeze_teacher(teacher)

    def _prepare_teacher(self, teacher: nn.Module) -> FrozenTeacher:
        """Place / shard the frozen teacher for the engine the accelerator runs (never part of self.model)."""
        if self.is_deepspeed_enabled:
            teacher = _prepare_deepspeed_teacher(teacher, self.accelerator)
        elif self.is_fsdp_enabled:
            teacher = _prepare_fsdp_teacher(teacher, self.accelerator)
        else:
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
            # prepare_model registers the model with the accelerator; the teacher must never be saved with
            # Accelerator.save_state or mistaken for the prepared student
            models = getattr(self.accelerator, "_models", None)
            if isinstance(models, list) and any(m is teacher for m in models):
                models[:] = [m for m in models if m is not teacher]
        return FrozenTeacher(teacher)

    # ------------------------------------------------------------------------------------ loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The objective summed over this micro-batch's response tokens, divided by ``num_items_in_batch``.

        ``num_items_in_batch`` is the response-token count of all micro-batches of the optimizer step (of all
        processes when ``average_tokens_across_devices``); since DDP / FSDP / DeepSpeed average gradients over
        processes, the loss is multiplied by the process count, as ``lm-distill`` does. Without it (a direct
        call) the micro-batch's own count is used. In evaluation mode the loss is the student's CE per
        response token (no teacher forward). How the two models' outputs are produced (logits, or hidden
        states and heads with ``fused_lm_head``) is :func:`locakd.lm.batch_loss.micro_batch_loss`'s choice.
        """
        labels = inputs["labels"]
        n_local = count_valid_tokens(labels).to(torch.float64)
        if not model.training:
            # the fused path only when nobody reads the logits (compute_metrics needs them)
            loss_of = self._loss_of if self.args.fused_lm_head and self.compute_metrics is None else self._eval_loss_of
            ce_sum, outputs = loss_of.summed_ce(model, inputs)
            self._eval_sums += torch.stack([ce_sum.double(), n_local]).to(self._eval_sums.device)
            loss = ce_sum / max(float(n_local), 1.0)
            return (loss, outputs) if return_outputs else loss

        if num_items_in_batch is None:
            normalizer, scale = max(float(n_local), 1.0), 1
        else:
            normalizer = max(float(num_items_in_batch), 1.0)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        terms, outputs = self._loss_of(model, inputs, normalizer, count_misinstructed=True)
        loss = terms.loss * scale if scale != 1 else terms.loss
        n_mis = terms.n_misinstructed if terms.n_misinstructed is not None else torch.zeros((), dtype=torch.float64)
        step = torch.stack([terms.ce_sum.double(), terms.kd_sum.double(), n_local, n_mis.to(n_local.device)])
        self._train_sums += step.to(self._train_sums.device)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------ metrics

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes > 1:
            return self.accelerator.reduce(tensor.clone(), reduction="sum")
        return tensor.clone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``ce``, ``kd`` and ``teacher_misinstruction_rate`` (per response token, since the last log, all
        processes) to the training logs; refuse a non-finite loss with an error naming the step."""
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            sums = self._sum_over_processes(self._train_sums)
            self._train_sums.zero_()
            self._train_totals += sums
            ce, kd, n, n_mis = (float(v) for v in sums)
            # the one error of both engines for a non-finite loss (NonFiniteLossError naming the term and step)
            check_finite(f"optimizer step {self.state.global_step} (summed over {n:.0f} response tokens since the "
                         "previous log)", ce=ce, kd=kd)
            if n > 0:
                logs["ce"] = ce / n
                if self.objective.spec.uses_teacher:
                    logs["kd"] = kd / n
                    logs["teacher_misinstruction_rate"] = n_mis / n
        super().log(logs, start_time)

    def teacher_misinstruction(self) -> dict[str, float | int] | None:
        """The teacher's token-level mis-instruction rate over every response token trained so far (logged ones)."""
        if not self.objective.spec.uses_teacher:
            return None
        _, _, n, n_mis = (float(v) for v in self._train_totals)
        if not n:
            return None
        return {"misinstruction_rate": n_mis / n, "top1_accuracy": 1.0 - n_mis / n, "n_tokens": int(n),
                "n_misinstructed": int(n_mis)}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop, with ``{prefix}_loss`` = the student's CE per response token over the whole set."""
        if self.compute_metrics is None:
            prediction_loss_only = True  # never collect [tokens, vocab] logits nobody reads
        self._eval_sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        ce, n = (float(v) for v in self._sum_over_processes(self._eval_sums))
        if n > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = ce / n
            output.metrics[f"{metric_key_prefix}_response_tokens"] = n
        return output

