"""The one training loop behind ``locakd lm-sft`` and ``locakd lm-distill``.

Per optimizer step (``optim.grad_accum_steps`` micro-batches of ``optim.micro_batch_size`` examples on
each of the ``WORLD_SIZE`` processes)::

    N    = response tokens of all micro-batches of all ranks      (all-reduced before any forward)
    loss = sum over micro-batches of [(1 - r) * CE_sum + r * D_sum] / N      (sft: CE_sum / N)

where ``CE_sum`` is the summed next-token cross-entropy on response tokens and ``D_sum`` the summed
token-level divergence to the frozen teacher (:func:`locakd.token_distill_loss`, optionally LoCa).
Because every micro-batch divides by the same global ``N``, the accumulated loss and gradient equal
those of one big batch, whatever the split over micro-batches and ranks (DDP averages gradients
over ranks, so the loss is multiplied by the world size before ``backward``).

Data order: every epoch draws a permutation from ``(run.seed, epoch)``; optimizer step ``s`` of the
epoch takes the next ``global_batch = micro * accum * world`` examples, sorts them by length (less
padding) and deals them out to micro-steps and ranks. The data position is therefore a function of
the step alone, which makes ``--resume`` exact. An incomplete last global batch of an epoch is
skipped (the next epoch's permutation differs).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import config_changes, config_keys, to_dict
from ..errors import CheckpointError, ConfigError
from ..losses.token import token_distill_loss
from ..training.checkpoint import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint
from ..training.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from ..training.run_dir import RunLogger
from ..training.runtime import autocast_context, make_grad_scaler, resolve_device, seed_everything
from .config import LMExperimentConfig, LMMethodConfig, MethodSpec
from .data import IGNORE_INDEX, count_valid_tokens, make_collate_fn, shift_for_next_token
from .models import check_vocab, crop_logits
from .pipeline import (
    check_positions,
    load_run_tokenizer,
    load_student,
    load_teacher,
    load_train_valid_records,
    param_count,
    save_pretrained_atomic,
    teacher_misinstruction,
    tokenize,
)

CHECKPOINT_FORMAT = "locakd-lm-v1"

# Config keys that may change when a run is resumed (field metadata); any other difference is an error.
RESUMABLE_CHANGES = config_keys(LMExperimentConfig, resume=True)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


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

    spec: MethodSpec
    kd_ratio: float = 0.5
    loca_alpha: float = 0.9
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    chunk_size: int | None = 1024
    vocab_size: int | None = None  # shared vocabulary of the divergence (crop_vocab)

    @classmethod
    def from_config(cls, method: LMMethodConfig, vocab_size: int | None = None) -> LMObjective:
        return cls(spec=method.spec, kd_ratio=method.kd_ratio, loca_alpha=method.loca_alpha,
                   temperature=method.temperature, jsd_beta=method.jsd_beta, skew_lambda=method.skew_lambda,
                   chunk_size=method.chunk_size, vocab_size=vocab_size)

    def __call__(self, student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None, normalizer: torch.Tensor | float) -> LossTerms:
        """``student_logits``/``teacher_logits`` are raw causal-LM outputs ``[B, L, V]``; ``labels`` ``[B, L]``
        aligned with ``input_ids`` (the next-token shift happens here)."""
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


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


@dataclass
class StepStats:
    ce_sum: float
    kd_sum: float
    n_tokens: float  # global (all micro-batches, all ranks)

    def means(self, kd_ratio: float, uses_teacher: bool) -> dict[str, float]:
        n = max(self.n_tokens, 1.0)
        ce, kd = self.ce_sum / n, self.kd_sum / n
        out = {"loss": (1.0 - kd_ratio) * ce + kd_ratio * kd if uses_teacher else ce, "ce": ce}
        if uses_teacher:
            out["kd"] = kd
        return out


def accumulate_gradients(
    student: nn.Module,
    teacher: nn.Module | None,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    objective: LMObjective,
    *,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
) -> StepStats:
    """Forward + backward over the micro-batches of one optimizer step (gradients accumulate in ``.grad``).

    The normaliser is the number of response tokens of all ``micro_batches`` summed over all ranks
    (all-reduced first), so the accumulated gradient equals that of one batch holding every example.
    ``student`` may be wrapped in ``DistributedDataParallel``: gradients are then synchronised on the
    last micro-batch only, and the loss is scaled by ``world_size`` to undo DDP's averaging.
    """
    device = torch.device(device)
    n_local = sum(int(count_valid_tokens(b["labels"])) for b in micro_batches)
    n_global = all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=device))
    normalizer = float(n_global.clamp(min=1.0))
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    ce_total = torch.zeros((), dtype=torch.float64, device=device)
    kd_total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = (not ddp) or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else student.no_sync():
            teacher_logits = None
            if objective.spec.uses_teacher:
                if teacher is None:
                    raise ConfigError(f"method '{objective.spec.name}' needs a teacher")
                with torch.no_grad():
                    teacher_logits = _logits(teacher(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"], use_cache=False))
            with autocast if autocast is not None else contextlib.nullcontext():
                student_logits = _logits(student(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"], use_cache=False))
            terms = objective(student_logits, batch["labels"], teacher_logits, normalizer)
            loss = terms.loss * world_size if ddp else terms.loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
        ce_total += terms.ce_sum.double()
        kd_total += terms.kd_sum.double()
    sums = all_reduce_sum(torch.stack([ce_total, kd_total]))
    return StepStats(ce_sum=float(sums[0]), kd_sum=float(sums[1]), n_tokens=float(n_global))


# --------------------------------------------------------------------------------------------------
# Data order, optimizer, schedule
# --------------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_micro_batches(order: Sequence[int], step_in_epoch: int, lengths: Sequence[int], *,
                       micro_batch_size: int, grad_accum_steps: int, world_size: int = 1,
                       rank: int = 0) -> list[list[int]]:
    """Example indices of this rank's micro-batches for one optimizer step (see module docstring)."""
    global_batch = micro_batch_size * grad_accum_steps * world_size
    chunk = list(order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch])
    chunk.sort(key=lambda i: (lengths[i], i))
    per_micro = micro_batch_size * world_size
    out = []
    for a in range(grad_accum_steps):
        part = chunk[a * per_micro:(a + 1) * per_micro]
        out.append(part[rank * micro_batch_size:(rank + 1) * micro_batch_size])
    return out


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


# --------------------------------------------------------------------------------------------------
# RNG state (per rank) for exact resume
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model: nn.Module, examples: Sequence[dict], collate, *, batch_size: int, device: torch.device,
                    autocast: Any, env: DistEnv, chunk_size: int | None) -> tuple[float, float]:
    """(summed CE, response tokens) over this rank's shard of ``examples``, all-reduced."""
    was_training = model.training
    model.eval()
    ce = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    shard = list(range(env.rank, len(examples), env.world_size))
    for start in range(0, len(shard), batch_size):
        batch = collate([examples[i] for i in shard[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False))
        s_logits, targets = shift_for_next_token(logits, batch["labels"])
        ce += summed_cross_entropy(s_logits, targets, chunk_size).double()
        n += count_valid_tokens(batch["labels"]).double()
    model.train(was_training)
    sums = all_reduce_sum(torch.stack([ce, n]))
    return float(sums[0]), float(sums[1])


def validation_generation(model: nn.Module, tokenizer: Any, records: Sequence[dict], config: LMExperimentConfig,
                          env: DistEnv, device: torch.device) -> dict[str, float]:
    """Greedy ROUGE-L / exact match (percent) over this rank's shard of ``records``, all-reduced."""
    from .evaluate import evaluate_generation

    shard = list(records)[env.rank::env.world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if shard:
        res = evaluate_generation(
            model, tokenizer, shard, template=config.prompt_template(), seeds=(0,),
            max_new_tokens=config.eval.max_new_tokens, do_sample=False, batch_size=config.eval.batch_size,
            max_prompt_length=config.data.max_prompt_length, case_sensitive=config.eval.case_sensitive,
        )
        sums += torch.tensor([res["rouge_l_mean"] * len(shard), res["exact_match_mean"] * len(shard),
                              float(len(shard))], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    n = max(float(sums[2]), 1.0)
    return {"rouge_l": float(sums[0]) / n, "exact_match": float(sums[1]) / n}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _better(metric: str, value: float, loss: float, best: dict[str, Any]) -> bool:
    """Is (value, valid loss) better than the best so far? Ties of a generation metric go to the lower loss."""
    if best["value"] is None:
        return True
    if metric == "loss":
        return value < best["value"]
    if value != best["value"]:
        return value > best["value"]
    return loss < best.get("loss", math.inf)


def check_command(config: LMExperimentConfig, command: str) -> None:
    spec = config.method.spec
    if command == "lm-sft":
        if spec.name != "sft":
            raise ConfigError(f"lm-sft trains with method sft, but method.name is '{spec.name}'; use lm-distill")
        if config.model.teacher:
            raise ConfigError("lm-sft fine-tunes model.student on its own; unset model.teacher (or use lm-distill)")
    elif command == "lm-distill":
        if spec.uses_teacher and not config.model.teacher:
            raise ConfigError(f"method '{spec.name}' needs a teacher: set model.teacher (a folder or hub name)")
    else:
        raise ConfigError(f"unknown LM training command {command!r}")


def train_lm(config: LMExperimentConfig, *, command: str = "lm-distill", resume: bool = False,
             stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``lm-sft`` or ``lm-distill`` for ``config``; returns the summary (also written to summary.json).

    Runs unchanged under ``torchrun --nproc_per_node N`` (DDP on the student; rank 0 writes).
    ``stop_after_steps`` ends this session after that many optimizer steps with a checkpoint written
    (continue with ``resume=True``), e.g. for jobs with a wall-clock limit.
    """
    check_command(config, command)
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ConfigError(f"stop_after_steps must be >= 1, got {stop_after_steps}")
    if config.run.engine == "hf":  # transformers.Trainer; accelerate launch gives DDP / FSDP / DeepSpeed
        from .hf_run import train_with_hf

        return train_with_hf(config, command=command, resume=resume, stop_after_steps=stop_after_steps)
    import os

    device = resolve_device(config.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    env = init_distributed(device, timeout_s=config.run.dist_timeout_s)
    try:
        return _train(config, command=command, resume=resume, stop_after_steps=stop_after_steps,
                      device=device, env=env)
    finally:
        shutdown_distributed()


def _train(config: LMExperimentConfig, *, command: str, resume: bool, stop_after_steps: int | None,
           device: torch.device, env: DistEnv) -> dict[str, Any]:
    run, o = config.run, config.optim
    spec = config.method.spec
    run_dir = Path(run.out_dir)
    last_path = run_dir / "last.pt"
    if resume and not last_path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {last_path} (nothing to resume)")
    if not resume and last_path.exists():
        raise ConfigError(f"{run_dir} already holds a run ({last_path.name}); pass --resume to continue it "
                          "or set run.out_dir to a new folder")
    autocast = autocast_context(device, run.precision)  # raises early for fp16 on the CPU
    logger = RunLogger(run_dir, enabled=env.is_main, tensorboard=run.tensorboard, progress=run.progress)
    try:
        return _train_with_logger(config, command, resume, stop_after_steps, device, env, logger, autocast,
                                  spec, run_dir, last_path, o)
    finally:
        logger.close()


def _train_with_logger(config, command, resume, stop_after_steps, device, env, logger, autocast, spec,
                       run_dir, last_path, o) -> dict[str, Any]:
    run = config.run
    started = time.time()
    seed_everything(run.seed)

    # ---- data and models -------------------------------------------------------------------------
    tokenizer = load_run_tokenizer(config)
    splits = load_train_valid_records(config)
    train_ds = tokenize(config, splits.train, tokenizer)
    valid_ds = tokenize(config, splits.valid, tokenizer) if splits.valid else None
    logger.info(f"{command}: train {train_ds.stats.summary()}")
    if len(train_ds) == 0:
        raise ConfigError("no training example survived tokenisation (see the counts above); "
                          "raise data.max_length or check the records")
    valid_records = splits.valid[: config.eval.valid_max_examples or None]

    student = load_student(config, device)
    check_positions(student, config.data.max_length, "student")
    teacher = None
    if config.model.teacher and command == "lm-distill":
        teacher = load_teacher(config, device)
        check_positions(teacher, config.data.max_length, "teacher")
        if not spec.uses_teacher:
            logger.info("lm-distill: method sft does not train on the teacher; it is loaded only to report "
                        "its mis-instruction rate")
    vocab = check_vocab(teacher, student, tokenizer, crop_to_shared=config.model.crop_vocab)
    objective = LMObjective.from_config(config.method, vocab_size=vocab if teacher is not None else None)
    student.train()
    seed_everything(run.seed + env.rank)  # dropout streams differ per rank; init above is shared

    model: nn.Module = student
    if env.enabled:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(student, config)
    global_batch = o.micro_batch_size * o.grad_accum_steps * env.world_size
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_ds)} training examples are fewer than one global batch of {global_batch} "
            f"(micro_batch_size {o.micro_batch_size} x grad_accum_steps {o.grad_accum_steps} x "
            f"{env.world_size} process(es))"
        )
    total_steps = o.max_steps or o.epochs * steps_per_epoch
    warmup = warmup_steps_of(config, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, o.schedule, o.min_lr_ratio)
    )
    scaler = make_grad_scaler(device, run.precision)
    collate = make_collate_fn(tokenizer)
    lengths = [len(ex["input_ids"]) for ex in train_ds]
    select_by = config.eval.select_by if valid_ds is not None else None

    step = 0
    best: dict[str, Any] = {"metric": select_by, "value": None, "step": None, "loss": None}
    teacher_mis: dict[str, Any] | None = None
    tokens_trained = 0.0
    elapsed_before = 0.0
    if resume:
        state = load_checkpoint(last_path, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{last_path} is not a locakd LM checkpoint (format {state.get('format')!r})")
        if state["global_batch"] != global_batch:
            raise CheckpointError(
                f"{last_path} was written with a global batch of {state['global_batch']} examples, this run has "
                f"{global_batch} (micro_batch_size x grad_accum_steps x processes); the data position would not match"
            )
        load_model_state(student, state["model"], what="student", source=str(last_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        best = dict(state["best"])
        teacher_mis = state.get("teacher_misinstruction")
        tokens_trained = float(state.get("tokens_trained", 0.0))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rng = state["rng"]
        if len(rng) == env.world_size:
            _set_rng_state(rng[env.rank])
        else:
            seed_everything(run.seed + env.rank + 7919 * step)
        changes = config_changes(state.get("config") or {}, to_dict(config), RESUMABLE_CHANGES)
        if changes:
            raise ConfigError(
                f"cannot resume {run_dir} with a different config ({'; '.join(changes)}); only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )
        logger.truncate_metrics_after(step, tag="train")
        logger.truncate_metrics_after(step, tag="valid")
        logger.info(f"{command}: resumed from {last_path} at step {step}/{total_steps}")
    logger.save_config(config)

    if teacher is not None and teacher_mis is None:
        teacher_mis = _sharded_misinstruction(config, teacher, tokenizer, train_ds, vocab, env, device)
        logger.info(f"{command}: teacher token-level mis-instruction rate on {teacher_mis['n_tokens']} training "
                    f"response tokens: {100 * teacher_mis['misinstruction_rate']:.2f}%")

    logger.info(
        f"{command}: method {spec.name}, {len(train_ds)} examples, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps (global batch {global_batch}, {env.world_size} process(es), device {device}, "
        f"{run.precision}), student {param_count(student) / 1e6:.2f}M params"
        + (f", teacher {param_count(teacher) / 1e6:.2f}M params ({config.model.teacher_dtype})" if teacher else "")
    )

    def save_last() -> None:
        rng_states = _gather_objects(_rng_state(), env)
        if env.is_main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states,
                "global_batch": global_batch,
                "world_size": env.world_size,
                # the data order is a function of (run.seed, epoch); this is where the next step starts
                "data_position": {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                                  "steps_per_epoch": steps_per_epoch, "seed": run.seed},
                "best": best,
                "teacher_misinstruction": teacher_mis,
                "tokens_trained": tokens_trained,
                "elapsed_s": elapsed_before + time.time() - started,
                "config": to_dict(config),
            }, last_path)
        barrier()

    last_valid: dict[str, float] = {}

    def validate() -> None:
        nonlocal last_valid
        raw = _unwrap(model)
        ce, n = validation_loss(raw, valid_ds, collate, batch_size=o.micro_batch_size, device=device,
                                autocast=autocast, env=env, chunk_size=config.method.chunk_size)
        metrics = {"loss": ce / max(n, 1.0)}
        if select_by in ("rouge_l", "exact_match"):
            metrics.update(validation_generation(raw, tokenizer, valid_records, config, env, device))
        last_valid = metrics
        logger.log(step, metrics, tag="valid")
        value = metrics[select_by]
        improved = _better(select_by, value, metrics["loss"], best)
        if improved:
            best.update(value=value, step=step, loss=metrics["loss"])
            if env.is_main:
                save_pretrained_atomic(raw, tokenizer, run_dir / "best",
                                       extra={"step": step, "select_by": select_by, "value": value})
            barrier()
        logger.info(f"{command}: step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + (" (best)" if improved else f" (best {best['value']:.4f} at step {best['step']})"))

    session_steps = 0
    last_train: dict[str, float] = {}
    order: list[int] | None = None
    order_epoch = -1
    window = {"ce": 0.0, "kd": 0.0, "n": 0.0, "t": time.time()}
    stopped_early = False
    optimizer.zero_grad(set_to_none=True)
    for _ in logger.progress(range(step, total_steps), desc=f"{command} {spec.name}", total=total_steps - step):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_permutation(len(train_ds), run.seed, epoch), epoch
        micro = step_micro_batches(order, pos, lengths, micro_batch_size=o.micro_batch_size,
                                   grad_accum_steps=o.grad_accum_steps, world_size=env.world_size, rank=env.rank)
        batches = [collate([train_ds[i] for i in idx]) for idx in micro]
        stats = accumulate_gradients(model, teacher, batches, objective, device=device, autocast=autocast,
                                     scaler=scaler if scaler.is_enabled() else None, world_size=env.world_size)
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        clip = o.grad_clip if o.grad_clip else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), clip))
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        session_steps += 1
        tokens_trained += stats.n_tokens
        window["ce"] += stats.ce_sum
        window["kd"] += stats.kd_sum
        window["n"] += stats.n_tokens
        if not math.isfinite(stats.ce_sum) or not math.isfinite(stats.kd_sum):
            raise FloatingPointError(f"{command}: non-finite loss at step {step} (ce {stats.ce_sum}, kd {stats.kd_sum})")
        if step % run.log_every == 0 or step == total_steps:
            now = time.time()
            agg = StepStats(window["ce"], window["kd"], window["n"]).means(objective.kd_ratio, spec.uses_teacher)
            last_train = {**agg, "lr": lr, "grad_norm": grad_norm, "epoch": step / steps_per_epoch,
                          "tokens_per_s": window["n"] / max(now - window["t"], 1e-9)}
            logger.log(step, last_train, tag="train")
            window = {"ce": 0.0, "kd": 0.0, "n": 0.0, "t": now}
        end_of_epoch = step % steps_per_epoch == 0
        do_eval = valid_ds is not None and (
            step == total_steps or (run.eval_every and step % run.eval_every == 0)
            or (not run.eval_every and end_of_epoch)
        )
        if do_eval:
            validate()
        stop_now = stop_after_steps is not None and session_steps >= stop_after_steps and step < total_steps
        if (run.save_every and step % run.save_every == 0) or (not run.save_every and do_eval) \
                or step == total_steps or stop_now:
            save_last()
        if stop_now:
            stopped_early = True
            logger.info(f"{command}: stopped after {session_steps} steps at step {step}/{total_steps}; "
                        f"continue with --resume")
            break

    summary: dict[str, Any] = {
        "command": command,
        "method": spec.name,
        "status": "stopped" if stopped_early else "finished",
        "step": step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "world_size": env.world_size,
        "global_batch_size": global_batch,
        "device": str(device),
        "precision": run.precision,
        "train_examples": len(train_ds),
        "tokenization": train_ds.stats.as_dict(),
        "valid_examples": len(valid_ds) if valid_ds is not None else 0,
        "vocab_size": vocab,
        "student_params": param_count(student),
        "teacher_params": param_count(teacher) if teacher is not None else None,
        "teacher_misinstruction": teacher_mis,
        "tokens_trained": tokens_trained,
        "last_train": last_train,
        "last_valid": last_valid,
        "best": {**best, "path": str(run_dir / "best") if best["step"] is not None else None},
        "final_model": None,
        "train_time_s": round(elapsed_before + time.time() - started, 2),
    }
    if not stopped_early:
        if env.is_main:
            save_pretrained_atomic(_unwrap(model), tokenizer, run_dir / "final", extra={"step": step})
        summary["final_model"] = str(run_dir / "final")
        if best["step"] is None:
            logger.info(f"{command}: no validation set, so no best/ checkpoint; the model is in {run_dir / 'final'}")
    if env.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    barrier()
    logger.info(f"{command}: done in {summary['train_time_s']:.1f}s -> {run_dir}")
    return summary


def _sharded_misinstruction(config, teacher, tokenizer, train_ds, vocab, env, device) -> dict[str, Any]:
    cap = config.eval.misinstruction_max_examples
    examples = list(train_ds)[: cap or None]
    shard = examples[env.rank::env.world_size]
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    if shard:
        res = teacher_misinstruction(config, teacher, tokenizer, shard, vocab_size=vocab)
        counts += torch.tensor([res["n_misinstructed"], res["n_tokens"]], dtype=torch.float64, device=device)
    all_reduce_sum(counts)
    n_mis, n_tok = int(counts[0]), int(counts[1])
    rate = n_mis / max(n_tok, 1)
    return {"misinstruction_rate": rate, "top1_accuracy": 1.0 - rate, "n_tokens": n_tok,
            "n_misinstructed": n_mis, "n_examples": len(examples)}
