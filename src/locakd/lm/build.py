"""What an LM config builds: records, tokenizer, student and teacher, optimizer and schedule.

``lm-sft`` / ``lm-distill`` (:mod:`locakd.lm.trainer`) and ``lm-eval`` (:mod:`locakd.lm.eval_command`)
resolve a :class:`~locakd.lm.config.LMExperimentConfig` into data and models the same way, so a
run directory can be evaluated with exactly the prompts and tokenizer it was trained with.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.io import atomic_write_dir
from ..errors import ConfigError, DataError
from ..teachers import FrozenTeacher
from .config import LMExperimentConfig
from .data import (
    TokenizedDataset,
    load_instruction_records,
    make_collate_fn,
    tokenize_examples,
    train_test_split_records,
)
from .fused_head import check_fused_head
from .models import apply_lora, check_teacher_tokenizer, create_causal_lm, load_causal_lm, load_tokenizer

__all__ = [
    "VALID_HOLDOUT_SEED",
    "RecordSplits",
    "check_positions",
    "load_run_tokenizer",
    "load_student",
    "load_teacher",
    "load_test_records",
    "load_train_valid_records",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "max_positions",
    "misinstruction_batches",
    "param_count",
    "quiet_transformers",
    "save_pretrained_atomic",
    "teacher_misinstruction",
    "tokenize",
    "tokenizer_source",
    "warmup_steps_of",
]

VALID_HOLDOUT_SEED = 0
"""The train/valid hold-out split does not depend on run.seed, so every seed sees the same split."""


@dataclass
class RecordSplits:
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]


def load_train_valid_records(config: LMExperimentConfig) -> RecordSplits:
    """Training and validation records (validation: ``data.valid``, or ``data.valid_holdout`` train records)."""
    d = config.data
    if not d.train:
        raise ConfigError("data.train is required: a Dolly-layout .jsonl file or a Hugging Face dataset name")
    train = load_instruction_records(d.train, d.train_split)
    if d.max_train_examples is not None:
        train = train[: d.max_train_examples]
    valid: list[dict[str, Any]] = []
    if d.valid:
        if d.valid_holdout:
            raise ConfigError("set either data.valid or data.valid_holdout, not both")
        valid = load_instruction_records(d.valid, d.valid_split)
    elif d.valid_holdout:
        if d.valid_holdout >= len(train):
            raise ConfigError(f"data.valid_holdout={d.valid_holdout} leaves no training records out of {len(train)}")
        train, valid = train_test_split_records(train, d.valid_holdout, seed=VALID_HOLDOUT_SEED)
    return RecordSplits(train=train, valid=valid)


def load_test_records(config: LMExperimentConfig) -> list[dict[str, Any]]:
    if not config.data.test:
        raise ConfigError("data.test is required for lm-eval (a .jsonl file or a Hugging Face dataset name)")
    return load_instruction_records(config.data.test, config.data.test_split)


def tokenize(config: LMExperimentConfig, records: list[dict[str, Any]], tokenizer: Any) -> TokenizedDataset:
    return tokenize_examples(
        records, tokenizer, max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length, template=config.prompt_template(),
    )


def tokenizer_source(config: LMExperimentConfig) -> str:
    return config.model.tokenizer or config.model.student


def load_run_tokenizer(config: LMExperimentConfig, source: str | None = None) -> Any:
    source = source or tokenizer_source(config)
    if not source:
        raise ConfigError("model.student (or model.tokenizer) is required")
    with quiet_transformers():
        tokenizer = load_tokenizer(source)
    # transformers 5 quirk: AutoTokenizer on a folder with a config.json but no tokenizer files returns
    # an empty tokenizer (1 token) that encodes every text to [] instead of raising.
    if len(tokenizer) < 2 or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise DataError(
            f"the tokenizer loaded from '{source}' is empty (no tokenizer files there?); save the tokenizer "
            "next to the model or set model.tokenizer"
        )
    return tokenizer


def load_student(config: LMExperimentConfig, device: torch.device) -> nn.Module:
    """The model to train: ``from_pretrained``, or a fresh random init from its config (``model.init: scratch``).

    With ``model.lora.r > 0`` the student is wrapped in LoRA adapters (``peft``) and only they train."""
    source = config.model.student
    if not source:
        raise ConfigError("model.student is required: a save_pretrained folder or a Hugging Face hub name")
    if config.model.init == "scratch":
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(source)
        except OSError as err:
            raise DataError(f"model.init is 'scratch' but no model config could be read from '{source}': {err}") from None
        model = create_causal_lm(hf_config, seed=config.run.seed)
    else:
        with quiet_transformers():
            model = load_causal_lm(source, dtype="float32")
    lora = config.model.lora
    if lora.r:  # only the adapters train; best/ and final/ then hold the adapter
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return model.to(device)


def load_teacher(config: LMExperimentConfig, device: torch.device, tokenizer: Any = None) -> FrozenTeacher:
    """The frozen teacher in ``model.teacher_dtype``, eval mode, no gradients.

    Unless ``model.check_tokenizer`` is false, the tokenizer saved with the teacher must equal the run's
    tokenizer (``tokenizer``, loaded from the config when None): vocabulary, special tokens, encoding;
    otherwise an error says how they differ. The check runs before the teacher's weights are loaded.
    """
    if not config.model.teacher:
        raise ConfigError(f"method '{config.method.name}' needs a teacher: set model.teacher")
    if config.model.check_tokenizer:
        check_teacher_tokenizer(config.model.teacher, tokenizer if tokenizer is not None else load_run_tokenizer(config),
                                opt_out="model.check_tokenizer=false")
    with quiet_transformers():
        model = load_causal_lm(config.model.teacher, dtype=config.model.teacher_dtype, device=device)
    return FrozenTeacher(model)


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: nn.Module, max_length: int, what: str) -> None:
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length} exceeds the {what}'s {limit} positions; lower data.max_length "
            f"(and data.max_prompt_length)"
        )


def param_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" progress bars from transformers 5."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, target: Path, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` model + tokenizer into ``target``, swapped in by rename so it is never half-written."""

    def fill(folder: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        if extra is not None:
            (folder / "locakd_state.json").write_text(json.dumps(extra, indent=2) + "\n")

    atomic_write_dir(target, fill)


def misinstruction_batches(examples: TokenizedDataset | list, tokenizer: Any, batch_size: int):
    collate = make_collate_fn(tokenizer)
    for start in range(0, len(examples), batch_size):
        yield collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])


def teacher_misinstruction(config: LMExperimentConfig, teacher: nn.Module, tokenizer: Any,
                           train_examples: TokenizedDataset | list | None = None,
                           vocab_size: int | None = None) -> dict[str, Any]:
    """Teacher's token-level mis-instruction rate on (up to ``eval.misinstruction_max_examples``) training responses."""
    from .evaluate import teacher_misinstruction_rate

    if train_examples is None:
        records = load_train_valid_records(config).train
        train_examples = tokenize(config, records, tokenizer)
    cap = config.eval.misinstruction_max_examples
    examples = list(train_examples)[: cap or None]
    if config.method.fused_lm_head:  # no [tokens, V] logits here either; refuse a head that is not linear
        check_fused_head(teacher, "teacher")
    result = teacher_misinstruction_rate(
        teacher, misinstruction_batches(examples, tokenizer, config.eval.batch_size), vocab_size=vocab_size,
        fused_lm_head=config.method.fused_lm_head, chunk_size=config.method.chunk_size,
    )
    return {**result, "n_examples": len(examples)}


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, config: LMExperimentConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm weights or other vectors)."""
    o = config.optim
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_of(config: LMExperimentConfig, total_steps: int) -> int:
    o = config.optim
    return o.warmup_steps if o.warmup_steps > 0 else int(round(o.warmup_ratio * total_steps))


def make_scheduler(optimizer: torch.optim.Optimizer, config: LMExperimentConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then ``optim.schedule`` over ``total_steps`` optimizer steps (stepped once per step)."""
    o = config.optim
    warmup = warmup_steps_of(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, o.schedule, o.min_lr_ratio)
    )
