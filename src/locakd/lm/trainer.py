"""``locakd lm-sft`` / ``lm-distill``: the optimizer step, gradient accumulation and validation.

The run lifecycle (device, process group, run folder, resume checks, checkpoints with every rank's RNG
state, metrics, summary) is :mod:`locakd.engine`'s; records, tokenizer, models, optimizer and schedule
come from :mod:`locakd.lm.build`, the loss from :class:`locakd.losses.objectives.LMObjective`.

Per optimizer step (``optim.grad_accum_steps`` micro-batches of ``optim.micro_batch_size`` examples on
each of the ``WORLD_SIZE`` processes)::

    N    = response tokens of all micro-batches of all ranks      (all-reduced before any forward)
    loss = sum over micro-batches of [(1 - r) * CE_sum + r * D_sum] / N      (sft: CE_sum / N)

where ``CE_sum`` is the summed next-token cross-entropy on response tokens and ``D_sum`` the summed
token-level divergence to the frozen teacher (:func:`locakd.token_distill_loss`, optionally LoCa), or,
with ``model.teacher_cache``, to the offline teacher cache (:func:`locakd.sparse_token_distill_loss`
over the cached top-k entries, the label and the tail; the teacher is never loaded).
Because every micro-batch divides by the same global ``N``, the accumulated loss and gradient equal
those of one big batch, whatever the split over micro-batches and ranks (DDP averages gradients
over ranks, so the loss is multiplied by the world size before ``backward``).

Data order: every epoch draws the permutation :func:`locakd.data.loader.epoch_permutation` of
``(run.seed, epoch)`` (the same function the image pipeline uses); optimizer step ``s`` of the epoch
takes the next ``global_batch = micro * accum * world`` examples, sorts them by length (less padding)
and deals them out to micro-steps and ranks. The data position is therefore a function of the step
alone, which makes ``--resume`` exact. An incomplete last global batch of an epoch is skipped (the next
epoch's permutation differs).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.loader import epoch_permutation
from ..engine.distributed import DistEnv, all_reduce_sum, barrier, unwrap, wrap_ddp
from ..engine.io import load_model_state
from ..engine.run import Run, check_finite, open_run
from ..engine.runtime import autocast_context, make_grad_scaler, seed_everything
from ..errors import CheckpointError, ConfigError
from ..losses.objectives import LMObjective
from ..losses.objectives import LossTerms as LossTerms  # moved there; importable from here for one release
from .batch_loss import DenseLogits, MicroBatchLoss, micro_batch_loss
from .build import (
    check_positions,
    load_run_tokenizer,
    load_student,
    load_teacher,
    load_train_valid_records,
    make_optimizer,
    make_scheduler,
    param_count,
    save_pretrained_atomic,
    teacher_misinstruction,
    tokenize,
)
from .build import lr_factor as lr_factor  # moved there; importable from here for one release
from .build import warmup_steps_of as warmup_steps_of  # (same)
from .cache.run import IndexedExamples, cached_misinstruction, open_teacher_cache, teacher_cache_summary
from .cache.store import json_hash
from .config import LMExperimentConfig, method_spec
from .data import count_valid_tokens, make_collate_fn
from .fused_head import check_fused_head
from .models import check_vocab, output_vocab_size

__all__ = [
    "CHECKPOINT_FORMAT",
    "StepStats",
    "accumulate_gradients",
    "check_command",
    "improves_on_best",
    "step_micro_batches",
    "train_lm",
    "validation_generation",
    "validation_loss",
]

# v2: the data order is locakd.data.loader.epoch_permutation (v1 had its own permutation)
CHECKPOINT_FORMAT = "locakd-lm-v2"


# --------------------------------------------------------------------------------------------------
# One optimizer step: accumulation over micro-batches and ranks
# --------------------------------------------------------------------------------------------------


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
    fused_lm_head: bool = False,
    teacher_cache: Any = None,
) -> StepStats:
    """Forward + backward over the micro-batches of one optimizer step (gradients accumulate in ``.grad``).

    The normaliser is the number of response tokens of all ``micro_batches`` summed over all ranks
    (all-reduced first), so the accumulated gradient equals that of one batch holding every example.
    ``student`` may be wrapped in ``DistributedDataParallel``: gradients are then synchronised on the
    last micro-batch only, and the loss is scaled by ``world_size`` to undo DDP's averaging.
    ``fused_lm_head``: compute the objective from hidden states and head weights, never building the
    ``[tokens, V]`` logits (:func:`locakd.lm.batch_loss.micro_batch_loss` decides the outputs' source).
    ``teacher_cache``: read the teacher from this :class:`~locakd.lm.cache.TeacherCache` (``teacher`` None;
    every micro-batch then holds its examples' ``EXAMPLE_INDEX``).
    """
    device = torch.device(device)
    loss_of = micro_batch_loss(objective, teacher, fused_lm_head=fused_lm_head, teacher_cache=teacher_cache)
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
            terms, _ = loss_of(student, batch, normalizer, autocast=autocast)
            loss = terms.loss * world_size if ddp else terms.loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
        ce_total += terms.ce_sum.double()
        kd_total += terms.kd_sum.double()
    sums = all_reduce_sum(torch.stack([ce_total, kd_total]))
    return StepStats(ce_sum=float(sums[0]), kd_sum=float(sums[1]), n_tokens=float(n_global))


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model: nn.Module, examples: Sequence[dict], collate, *, batch_size: int, device: torch.device,
                    autocast: Any, env: DistEnv, chunk_size: int | None,
                    loss_of: MicroBatchLoss | None = None) -> tuple[float, float]:
    """(summed CE, response tokens) over this rank's shard of ``examples``, all-reduced.

    ``loss_of`` (the run's :class:`~locakd.lm.batch_loss.MicroBatchLoss`) says how the student's CE is
    computed (the fused lm-head path: from hidden states, without logits); default: from its logits."""
    if loss_of is None:
        loss_of = DenseLogits(LMObjective(spec=method_spec("sft"), chunk_size=chunk_size))
    was_training = model.training
    model.eval()
    ce = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    shard = list(range(env.rank, len(examples), env.world_size))
    for start in range(0, len(shard), batch_size):
        batch = collate([examples[i] for i in shard[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        ce += loss_of.summed_ce(model, batch, autocast=autocast)[0].double()
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


def improves_on_best(metric: str, value: float, loss: float, best: dict[str, Any]) -> bool:
    """Is (value, valid loss) better than the best so far? Ties of a generation metric go to the lower loss.

    ``best`` holds ``value`` and ``loss`` of the best validation so far (``None`` before the first);
    both engines select ``best/`` with it."""
    if best["value"] is None:
        return True
    if metric == "loss":
        return value < best["value"]
    if value != best["value"]:
        return value > best["value"]
    return loss < (best["loss"] if best.get("loss") is not None else math.inf)


def check_command(config: LMExperimentConfig, command: str) -> None:
    spec = config.method.spec
    if command == "lm-sft":
        if spec.name != "sft":
            raise ConfigError(f"lm-sft trains with method sft, but method.name is '{spec.name}'; use lm-distill")
        if config.model.teacher:
            raise ConfigError("lm-sft fine-tunes model.student on its own; unset model.teacher (or use lm-distill)")
        if config.model.teacher_cache:
            raise ConfigError("lm-sft fine-tunes model.student on its own; unset model.teacher_cache (or use lm-distill)")
    elif command == "lm-distill":
        if spec.uses_teacher and not (config.model.teacher or config.model.teacher_cache):
            raise ConfigError(f"method '{spec.name}' needs a teacher: set model.teacher (a folder or hub name) or "
                              "model.teacher_cache (a folder written by lm-cache-teacher)")
        if config.model.teacher_cache and config.method.fused_lm_head:
            raise ConfigError("method.fused_lm_head is not supported with model.teacher_cache: the cached (sparse) "
                              "teacher's divergence needs the student's logits; set method.fused_lm_head=false")
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
    with open_run(config, out_dir=config.run.out_dir, command=command, checkpoint_format=CHECKPOINT_FORMAT,
                  position_key="step", resume=resume) as run:
        return _LMRun(config, command, run).fit(stop_after_steps)


class _LMRun:
    """Data, models and optimizer of one run, built from the config and restored from ``run.checkpoint``."""

    def __init__(self, config: LMExperimentConfig, command: str, run: Run) -> None:
        self.config, self.command, self.run = config, command, run
        env, device, o = run.env, run.device, config.optim
        self.env, self.device = env, device
        self.spec = config.method.spec
        self.autocast = autocast_context(device, config.run.precision)
        seed_everything(config.run.seed)

        # ---- data and models
        self.tokenizer = load_run_tokenizer(config)
        splits = load_train_valid_records(config)
        self.train_ds = tokenize(config, splits.train, self.tokenizer)
        self.valid_ds = tokenize(config, splits.valid, self.tokenizer) if splits.valid else None
        if len(self.train_ds) == 0:
            raise ConfigError(f"no training example survived tokenisation ({self.train_ds.stats.summary()}); "
                              "raise data.max_length or check the records")
        self.valid_records = splits.valid[: config.eval.valid_max_examples or None]
        self.student = load_student(config, device)
        check_positions(self.student, config.data.max_length, "student")
        self.teacher = None
        self.cache = None  # model.teacher_cache: the teacher's training rows, read instead of running it
        if config.model.teacher_cache and command == "lm-distill":
            # checks that the cache was captured from this run's tokenizer, data, template, lengths, temperature
            # and vocabulary (ConfigError naming the field) before anything trains; model.teacher is not read
            self.cache = open_teacher_cache(config, self.tokenizer, split="train", examples=self.train_ds,
                                            student_vocab_size=output_vocab_size(self.student))
        elif config.model.teacher and command == "lm-distill":
            self.teacher = load_teacher(config, device, self.tokenizer)  # checks the tokenizers first
            check_positions(self.teacher, config.data.max_length, "teacher")
        self.vocab = check_vocab(self.teacher, self.student, self.tokenizer, crop_to_shared=config.model.crop_vocab)
        if self.cache is not None:
            self.vocab = self.cache.vocab_size  # the softmax the cached log-probabilities were taken over
        self.objective = LMObjective.from_config(config.method,
                                                 vocab_size=self.vocab if self.teacher is not None else None)
        self.fused_lm_head = config.method.fused_lm_head
        if self.fused_lm_head:  # refuse models whose logits are not hidden @ W.T + b, before any training
            check_fused_head(self.student, "student")
            if self.teacher is not None:
                check_fused_head(self.teacher, "teacher")
        self.loss_of = micro_batch_loss(self.objective, self.teacher, fused_lm_head=self.fused_lm_head,
                                        teacher_cache=self.cache)
        self.student.train()
        seed_everything(config.run.seed + env.rank)  # dropout streams differ per rank; init above is shared
        self.model = wrap_ddp(self.student, device, env)

        # ---- optimizer, schedule, data position
        self.optimizer = make_optimizer(self.student, config)
        self.global_batch = o.micro_batch_size * o.grad_accum_steps * env.world_size
        self.steps_per_epoch = len(self.train_ds) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_ds)} training examples are fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size {o.micro_batch_size} x grad_accum_steps {o.grad_accum_steps} x "
                f"{env.world_size} process(es))"
            )
        self.total_steps = o.max_steps or o.epochs * self.steps_per_epoch
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = make_grad_scaler(device, config.run.precision)
        self.collate = make_collate_fn(self.tokenizer)
        # with a cache, every example carries its index in train_ds: the key of its cached rows
        self.train_examples = IndexedExamples(self.train_ds) if self.cache is not None else self.train_ds
        self.lengths = [len(ex["input_ids"]) for ex in self.train_ds]
        self.select_by = config.eval.select_by if self.valid_ds is not None else None

        self.step = 0
        self.best: dict[str, Any] = {"metric": self.select_by, "value": None, "step": None, "loss": None}
        self.teacher_mis: dict[str, Any] | None = None
        self.tokens_trained = 0.0
        self.last_train: dict[str, float] = {}
        self.last_valid: dict[str, float] = {}
        self.window = {"ce": 0.0, "kd": 0.0, "n": 0.0}  # sums since the last logged training row
        if run.checkpoint is not None:
            self._restore(run.checkpoint)

    def _restore(self, state: dict[str, Any]) -> None:
        last_path = self.run.last_path
        if state["global_batch"] != self.global_batch:
            raise CheckpointError(
                f"{last_path} was written with a global batch of {state['global_batch']} examples, this run has "
                f"{self.global_batch} (micro_batch_size x grad_accum_steps x processes); the data position would "
                "not match"
            )
        if self.cache is not None and state.get("teacher_cache_sha256") not in (None, self._cache_sha256()):
            raise CheckpointError(
                f"{last_path} was trained from another teacher cache than the one in {self.config.model.teacher_cache} "
                "now (its shards' checksums differ): resume with the cache the run started with"
            )
        load_model_state(self.student, state["model"], what="student", source=str(last_path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = dict(state["best"])
        self.teacher_mis = state.get("teacher_misinstruction")
        self.tokens_trained = float(state.get("tokens_trained", 0.0))
        self.last_train = dict(state.get("last_train") or {})
        self.last_valid = dict(state.get("last_valid") or {})
        self.window = dict(state.get("log_window") or self.window)

    def _state(self) -> dict[str, Any]:
        """What ``last.pt`` holds besides the engine's entries (format, RNG, config, wall time)."""
        step, per_epoch = self.step, self.steps_per_epoch
        return {
            "step": step,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_batch": self.global_batch,
            # the data order is a function of (run.seed, epoch); this is where the next step starts
            "data_position": {"epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                              "steps_per_epoch": per_epoch, "seed": self.config.run.seed},
            "best": self.best,
            "teacher_misinstruction": self.teacher_mis,
            "tokens_trained": self.tokens_trained,
            "last_train": self.last_train,
            "last_valid": self.last_valid,
            "log_window": dict(self.window),
            "teacher_cache_sha256": self._cache_sha256(),
        }

    def _cache_sha256(self) -> str | None:
        """One hash of the training cache's shards (their checksums): a resume must read the same rows."""
        if self.cache is None:
            return None
        return json_hash([shard["sha256"] for shard in self.cache.manifest["shards"]])

    # ------------------------------------------------------------------ loop

    def fit(self, stop_after_steps: int | None) -> dict[str, Any]:
        config, command, run, env, spec = self.config, self.command, self.run, self.env, self.spec
        o = config.optim
        logger = run.begin()
        run.restore_rng()
        logger.info(f"{command}: train {self.train_ds.stats.summary()}")
        if self.teacher is not None and not spec.uses_teacher:
            logger.info("lm-distill: method sft does not train on the teacher; it is loaded only to report "
                        "its mis-instruction rate")
        if run.resumed:
            logger.info(f"{command}: resumed from {run.last_path} at step {self.step}/{self.total_steps}")
        if self.cache is not None and self.teacher_mis is None:
            self.teacher_mis = cached_misinstruction(self.cache, self.train_ds,
                                                     max_examples=config.eval.misinstruction_max_examples)
            logger.info(f"{command}: teacher cache {config.model.teacher_cache} (top_k {self.cache.top_k}, "
                        f"{self.cache.bytes_per_token:.0f} bytes per token); the teacher is not loaded. Its token-level "
                        f"mis-instruction rate on {self.teacher_mis['n_tokens']} training response tokens: "
                        f"{100 * self.teacher_mis['misinstruction_rate']:.2f}%")
        if self.teacher is not None and self.teacher_mis is None:
            self.teacher_mis = _sharded_misinstruction(config, self.teacher, self.tokenizer, self.train_ds,
                                                       self.vocab, env, self.device)
            logger.info(f"{command}: teacher token-level mis-instruction rate on {self.teacher_mis['n_tokens']} "
                        f"training response tokens: {100 * self.teacher_mis['misinstruction_rate']:.2f}%")
        logger.info(
            f"{command}: method {spec.name}, {len(self.train_ds)} examples, {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps (global batch {self.global_batch}, {env.world_size} process(es), device "
            f"{self.device}, {config.run.precision}), student {param_count(self.student) / 1e6:.2f}M params"
            + (f", teacher {param_count(self.teacher) / 1e6:.2f}M params ({config.model.teacher_dtype})"
               if self.teacher is not None else "")
        )

        session_steps = 0
        order: list[int] | None = None
        order_epoch = -1
        window, window_started = self.window, time.time()
        stopped_early = False
        scaler = self.scaler
        self.optimizer.zero_grad(set_to_none=True)
        for _ in logger.progress(range(self.step, self.total_steps), desc=f"{command} {spec.name}",
                                 total=self.total_steps - self.step):
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_permutation(len(self.train_ds), config.run.seed, epoch).tolist(), epoch
            micro = step_micro_batches(order, pos, self.lengths, micro_batch_size=o.micro_batch_size,
                                       grad_accum_steps=o.grad_accum_steps, world_size=env.world_size,
                                       rank=env.rank)
            batches = [self.collate([self.train_examples[i] for i in idx]) for idx in micro]
            stats = accumulate_gradients(self.model, self.teacher, batches, self.objective, device=self.device,
                                         autocast=self.autocast, scaler=scaler if scaler.is_enabled() else None,
                                         world_size=env.world_size, fused_lm_head=self.fused_lm_head,
                                         teacher_cache=self.cache)
            check_finite(f"optimizer step {self.step + 1} (epoch {epoch + 1})", ce=stats.ce_sum, kd=stats.kd_sum)
            if scaler.is_enabled():
                scaler.unscale_(self.optimizer)
            clip = o.grad_clip if o.grad_clip else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip))
            lr = self.optimizer.param_groups[0]["lr"]
            scaler.step(self.optimizer)
            scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            session_steps += 1
            self.tokens_trained += stats.n_tokens
            window["ce"] += stats.ce_sum
            window["kd"] += stats.kd_sum
            window["n"] += stats.n_tokens
            step = self.step
            if step % config.run.log_every == 0 or step == self.total_steps:
                now = time.time()
                agg = StepStats(window["ce"], window["kd"], window["n"]).means(self.objective.kd_ratio,
                                                                               spec.uses_teacher)
                self.last_train = {**agg, "lr": lr, "grad_norm": grad_norm, "epoch": step / self.steps_per_epoch,
                                   "tokens_per_s": window["n"] / max(now - window_started, 1e-9)}
                logger.log(step, self.last_train, tag="train")
                window.update(ce=0.0, kd=0.0, n=0.0)
                window_started = now
            end_of_epoch = step % self.steps_per_epoch == 0
            eval_every = config.run.eval_every
            do_eval = self.valid_ds is not None and (
                step == self.total_steps or (eval_every and step % eval_every == 0)
                or (not eval_every and end_of_epoch)
            )
            if do_eval:
                self._validate()
            stop_now = stop_after_steps is not None and session_steps >= stop_after_steps and step < self.total_steps
            save_every = config.run.save_every
            if (save_every and step % save_every == 0) or (not save_every and do_eval) \
                    or step == self.total_steps or stop_now:
                run.save(self._state())
            if stop_now:
                stopped_early = True
                logger.info(f"{command}: stopped after {session_steps} steps at step {step}/{self.total_steps}; "
                            f"continue with --resume")
                break

        final_model = None
        if not stopped_early:
            if env.is_main:
                save_pretrained_atomic(unwrap(self.model), self.tokenizer, run.out_dir / "final",
                                       extra={"step": self.step})
            barrier()
            final_model = str(run.out_dir / "final")
            if self.best["step"] is None:
                logger.info(f"{command}: no validation set, so no best/ checkpoint; the model is in {final_model}")
        summary = run.finish({
            "method": spec.name,
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": self.global_batch,
            "train_examples": len(self.train_ds),
            "tokenization": self.train_ds.stats.as_dict(),
            "valid_examples": len(self.valid_ds) if self.valid_ds is not None else 0,
            "vocab_size": self.vocab,
            "student_params": param_count(self.student),
            "teacher_params": param_count(self.teacher) if self.teacher is not None else None,
            "teacher_cache": teacher_cache_summary(config.model.teacher_cache, self.cache),
            "teacher_misinstruction": self.teacher_mis,
            "tokens_trained": self.tokens_trained,
            "last_train": self.last_train,
            "last_valid": self.last_valid,
            "best": {**self.best, "path": str(run.out_dir / "best") if self.best["step"] is not None else None},
            "final_model": final_model,
        }, status="stopped" if stopped_early else "finished")
        logger.info(f"{command}: done in {summary['wall_time_s']:.1f}s -> {run.out_dir}")
        return summary

    def _validate(self) -> None:
        config, env, best, step = self.config, self.env, self.best, self.step
        raw = unwrap(self.model)
        ce, n = validation_loss(raw, self.valid_ds, self.collate, batch_size=config.optim.micro_batch_size,
                                device=self.device, autocast=self.autocast, env=env,
                                chunk_size=config.method.chunk_size, loss_of=self.loss_of)
        metrics = {"loss": ce / max(n, 1.0)}
        if self.select_by in ("rouge_l", "exact_match"):
            metrics.update(validation_generation(raw, self.tokenizer, self.valid_records, config, env, self.device))
        self.last_valid = metrics
        logger = self.run.logger
        logger.log(step, metrics, tag="valid")
        value = metrics[self.select_by]
        improved = improves_on_best(self.select_by, value, metrics["loss"], best)
        if improved:
            best.update(value=value, step=step, loss=metrics["loss"])
            if env.is_main:
                save_pretrained_atomic(raw, self.tokenizer, self.run.out_dir / "best",
                                       extra={"step": step, "select_by": self.select_by, "value": value})
            barrier()
        logger.info(f"{self.command}: step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + (" (best)" if improved else f" (best {best['value']:.4f} at step {best['step']})"))


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
