"""``locakd lm-sft / lm-distill CONFIG run.engine=hf``: the same YAML run through ``transformers.Trainer``.

The records, tokenizer, student (LoRA included) and frozen teacher are built exactly as for the own
loop (:mod:`locakd.lm.build`), then trained by :class:`locakd.hf.DistillationTrainer`. Under
``accelerate launch`` the Trainer then runs DDP, FSDP or DeepSpeed as the accelerate config says::

    accelerate launch --num_processes 8 -m locakd.cli.main lm-distill CONFIG run.engine=hf
    accelerate launch --config_file fsdp.yaml -m locakd.cli.main lm-distill CONFIG run.engine=hf eval.select_by=loss

Every ``optim`` / ``run`` key maps to a ``TrainingArguments`` field (:func:`training_arguments`); a
value the Trainer cannot honour is a :class:`~locakd.errors.ConfigError` naming the key. The run
folder holds what the own loop writes -- ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard),
``best/`` and ``final/`` (``save_pretrained``, what ``lm-eval`` reads), ``summary.json`` -- plus the
Trainer's ``checkpoint-N/`` (the latest only) that ``--resume`` continues from.

The run folder's lifecycle is :mod:`locakd.engine`'s (:class:`~locakd.engine.run.Run`): the same
checks before a fresh start or a resume (keys that may not change on resume, keys a saved config
lacks taken as their defaults), stale-file cleanup, metrics trimmed to the checkpoint with
TensorBoard's ``purge_step``, ``config.yaml``, ``summary.json`` with the shared
:data:`~locakd.engine.run.SUMMARY_KEYS`, atomic writes of ``best/`` / ``final/``. Only the checkpoint
is the Trainer's: ``checkpoint-N/`` plus ``locakd_state.json`` (what the Trainer does not keep: the
config, the best validation so far, the teacher's mis-instruction counts and the wall time).

Differences from the own loop, by design of the Trainer: the data order (the Trainer's seeded
sampler instead of length-sorted global batches), the warm-up (HF's starts at lr 0 on step 0), and
the teacher's mis-instruction rate, which is measured on the response tokens trained on rather than
in a pass before training (``eval.misinstruction_max_examples`` is not used).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import transformers

from ..config import read_yaml, to_dict
from ..engine.distributed import DistEnv, barrier, broadcast_object
from ..engine.io import atomic_write_text, swap_in_dir, temp_dir_for
from ..engine.logging import RunLogger
from ..engine.run import Run
from ..errors import CheckpointError, ConfigError
from .build import (
    check_positions,
    load_run_tokenizer,
    load_student,
    load_teacher,
    load_train_valid_records,
    param_count,
    quiet_transformers,
    tokenize,
)
from .cache.run import open_teacher_cache, teacher_cache_summary
from .config import LMExperimentConfig
from .hf_trainer import DistillationArguments, DistillationTrainer
from .models import output_vocab_size
from .trainer import improves_on_best, validation_generation

__all__ = ["train_with_hf", "training_arguments"]

_STATE_FILE = "locakd_state.json"  # in every checkpoint-N/ (what the Trainer does not keep), best/ and final/
_GENERATION_METRICS = ("rouge_l", "exact_match")


# --------------------------------------------------------------------------------------------------
# YAML -> TrainingArguments
# --------------------------------------------------------------------------------------------------


def _schedule(config: LMExperimentConfig) -> tuple[str, dict[str, Any]]:
    o = config.optim
    if o.schedule == "cosine":
        if o.min_lr_ratio > 0:
            return "cosine_with_min_lr", {"min_lr_rate": o.min_lr_ratio}
        return "cosine", {}
    if o.schedule == "linear":
        if o.min_lr_ratio > 0:
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} with optim.schedule linear: the hf engine's linear "
                              "schedule decays to 0; set optim.min_lr_ratio=0 or use optim.schedule=cosine")
        return "linear", {}
    return "constant_with_warmup", {}


def _device_arguments(config: LMExperimentConfig) -> dict[str, Any]:
    device, precision = config.run.device, config.run.precision
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"run.device={device!r}: under run.engine=hf each process takes its own device from the "
                          "launcher (LOCAL_RANK); use auto, cpu, cuda or mps and pick GPUs with CUDA_VISIBLE_DEVICES")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' was requested but CUDA is not available here; use run.device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("run.device='mps' was requested but MPS is not available here; use run.device=cpu")
    gpu = device in ("cuda", "mps") or (device == "auto" and torch.cuda.is_available())
    if precision == "float16" and not gpu:
        raise ConfigError("run.precision float16 needs a GPU; use bfloat16 or float32 on the CPU")
    return {"use_cpu": device == "cpu", "bf16": precision == "bfloat16", "fp16": precision == "float16"}


def training_arguments(config: LMExperimentConfig, *, has_valid: bool) -> DistillationArguments:
    """The ``DistillationArguments`` of a YAML config, key by key (ConfigError for what cannot be honoured).

    ========================  =====================================================================
    YAML key                  TrainingArguments
    ========================  =====================================================================
    optim.lr                  learning_rate
    optim.weight_decay        weight_decay (AdamW; biases and norm weights excluded, as in own loop)
    optim.betas, optim.eps    adam_beta1, adam_beta2, adam_epsilon (optim=adamw_torch)
    optim.schedule            lr_scheduler_type cosine / linear / constant_with_warmup
    optim.min_lr_ratio        cosine_with_min_lr + lr_scheduler_kwargs.min_lr_rate (linear: must be 0)
    optim.warmup_steps/ratio  warmup_steps (a count, or the ratio as a float < 1)
    optim.grad_clip           max_grad_norm (null: 0, no clipping)
    optim.micro_batch_size    per_device_train_batch_size (and per_device_eval_batch_size)
    optim.grad_accum_steps    gradient_accumulation_steps
    optim.epochs / max_steps  num_train_epochs / max_steps (incomplete last batches dropped)
    run.seed                  seed, data_seed
    run.device                use_cpu for cpu; auto / cuda / mps: the launcher's device per process
    run.precision             bf16 / fp16 (mixed precision; the loss math stays float32)
    run.out_dir               output_dir
    run.log_every             logging_steps
    run.eval_every            eval_strategy steps + eval_steps (0: epoch); no validation set: no
    run.save_every            save_strategy steps + save_steps (0: with every validation); 1 kept
    run.progress              disable_tqdm = not progress
    run.tensorboard           run_dir/tensorboard written by locakd (report_to none)
    run.dist_timeout_s        ddp_timeout (DDP: ddp_find_unused_parameters false, as the own loop)
    method.*, model.*         the DistillationArguments of the same names
    ========================  =====================================================================
    """
    o, r, m, d = config.optim, config.run, config.method, config.data
    scheduler, scheduler_kwargs = _schedule(config)
    warmup: float = o.warmup_steps if o.warmup_steps > 0 else o.warmup_ratio
    if r.eval_every:
        eval_strategy, eval_steps = "steps", r.eval_every
    else:
        eval_strategy, eval_steps = "epoch", None
    if not has_valid:
        eval_strategy, eval_steps = "no", None
    if r.save_every:
        save_strategy, save_steps = "steps", r.save_every
    else:
        save_strategy, save_steps = eval_strategy, eval_steps
    return DistillationArguments(
        output_dir=r.out_dir,
        learning_rate=o.lr, weight_decay=o.weight_decay, optim="adamw_torch",
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs, warmup_steps=warmup,
        max_grad_norm=o.grad_clip or 0.0,
        per_device_train_batch_size=o.micro_batch_size, per_device_eval_batch_size=o.micro_batch_size,
        gradient_accumulation_steps=o.grad_accum_steps,
        num_train_epochs=o.epochs, max_steps=o.max_steps or -1, dataloader_drop_last=True,
        seed=r.seed, data_seed=r.seed,
        **_device_arguments(config),
        logging_strategy="steps", logging_steps=r.log_every,
        eval_strategy=eval_strategy, eval_steps=eval_steps,
        save_strategy=save_strategy, save_steps=save_steps, save_total_limit=1,
        disable_tqdm=not r.progress, report_to="none", ddp_timeout=int(math.ceil(r.dist_timeout_s)),
        ddp_find_unused_parameters=False,  # every student parameter (or adapter) takes part in the loss
        method=m.name, kd_ratio=m.kd_ratio, loca_alpha=m.loca_alpha, temperature=m.temperature,
        jsd_beta=m.jsd_beta, skew_lambda=m.skew_lambda, chunk_size=m.chunk_size, fused_lm_head=m.fused_lm_head,
        crop_vocab=config.model.crop_vocab, teacher_dtype=config.model.teacher_dtype,
        check_tokenizer=False,  # load_teacher checked it already (model.check_tokenizer)
        max_length=d.max_length, max_prompt_length=d.max_prompt_length,
    )


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _save_model_atomic(trainer: transformers.Trainer, target: Path, extra: dict[str, Any]) -> None:
    """``trainer.save_model`` into ``target``, swapped in by rename (:func:`locakd.engine.io.swap_in_dir`).

    Every process calls it: ``save_model`` gathers FSDP / DeepSpeed shards (or writes them), so all
    processes fill the one temporary folder rank 0 created; rank 0 then swaps it in.
    """
    main = trainer.args.process_index == 0
    tmp = Path(broadcast_object(str(temp_dir_for(target)) if main else None))
    with quiet_transformers():
        trainer.save_model(str(tmp))
    barrier()
    if main:
        (tmp / _STATE_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        (tmp / "training_args.bin").unlink(missing_ok=True)  # the run folder's config.yaml says it all
        swap_in_dir(tmp, target)
    barrier()


class _RunTrainer(DistillationTrainer):
    """DistillationTrainer plus the YAML run's greedy-generation validation metrics (ROUGE-L / exact match)."""

    def __init__(self, *args: Any, run_config: LMExperimentConfig, valid_records: list[dict[str, Any]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self.valid_records = valid_records

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.run_config.eval.select_by in _GENERATION_METRICS and self.valid_records:
            env = DistEnv(rank=self.args.process_index, world_size=self.args.world_size,
                          local_rank=self.args.local_process_index)
            model = self.accelerator.unwrap_model(self.model)
            scores = validation_generation(model, self.processing_class, self.valid_records, self.run_config,
                                           env, self.args.device)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output


class _RunCallback(transformers.TrainerCallback):
    """metrics.jsonl rows, best/ selection, a final log / validation / checkpoint, --stop-after-steps."""

    def __init__(self, run: Run, logger: RunLogger, best: dict[str, Any], stop_after_steps: int | None,
                 has_valid: bool) -> None:
        self.run, self.config, self.logger, self.run_dir, self.best = run, run.config, logger, run.out_dir, best
        self.stop_after_steps, self.has_valid = stop_after_steps, has_valid
        self.trainer: DistillationTrainer | None = None
        self.session_steps = 0
        self.stopped = False
        self.last_train: dict[str, float] = {}
        self.last_valid: dict[str, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.session_steps += 1
        last = state.global_step >= state.max_steps
        stop = self.stop_after_steps is not None and self.session_steps >= self.stop_after_steps and not last
        if last:  # as the own loop: log, validate and checkpoint at the final step whatever the intervals
            control.should_log = True
            control.should_evaluate = self.has_valid
            control.should_save = True
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        if control.should_save:
            control.should_log = True  # the checkpoint's mis-instruction totals then include every step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            row = {k: v for k, v in logs.items() if k in ("loss", "ce", "kd", "teacher_misinstruction_rate",
                                                         "grad_norm", "epoch")}
            if "learning_rate" in logs:
                row["lr"] = logs["learning_rate"]
            self.last_train = row
            self.logger.log(state.global_step, row, tag="train")
        elif "eval_loss" in logs:
            row = {k.removeprefix("eval_"): v for k, v in logs.items()
                   if k.startswith("eval_") and k.removeprefix("eval_") in ("loss", "response_tokens",
                                                                            *_GENERATION_METRICS)}
            self.last_valid = row
            self.logger.log(state.global_step, row, tag="valid")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        select_by = self.config.eval.select_by
        key = f"eval_{select_by}"
        if key not in metrics or self.trainer is None:
            return
        value, loss = float(metrics[key]), float(metrics["eval_loss"])
        improved = improves_on_best(select_by, value, loss, self.best)
        if improved:
            self.best.update(value=value, step=state.global_step, loss=loss)
            _save_model_atomic(self.trainer, self.run_dir / "best",
                               {"step": state.global_step, "select_by": select_by, "value": value, "loss": loss})
        shown = f"{select_by} {value:.4f}" + (f", loss {loss:.4f}" if select_by != "loss" else "")
        self.logger.info(f"step {state.global_step}: valid {shown}"
                         + (" (best)" if improved else f" (best {self.best['value']:.4f} at step {self.best['step']})"))

    def on_save(self, args, state, control, **kwargs):
        if args.process_index != 0 or self.trainer is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            atomic_write_text(folder / _STATE_FILE, json.dumps({
                "step": state.global_step,
                "config": to_dict(self.config),
                "best": self.best,
                "train_totals": self.trainer._train_totals.tolist(),
                "wall_time_s": self.run.wall_time(),
            }, indent=2) + "\n")


class _BarsOnly(transformers.ProgressCallback):
    """The Trainer's progress bars (stderr) without the log dicts it prints with them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _measured(misinstruction: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if misinstruction is None else {**misinstruction, "measured_on": "trained response tokens"}


def _distributed_type(trainer: transformers.Trainer) -> str:
    kind = trainer.accelerator.distributed_type
    return str(getattr(kind, "value", kind))


def _checkpoint_step(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", path.rstrip("/"))
    return int(match.group(1)) if match else 0


class _TrainerRun(Run):
    """The engine's run folder, resumed from the Trainer's latest ``checkpoint-N/`` instead of ``last.pt``."""

    def open_checkpoint(self, resume: bool) -> dict[str, Any] | None:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(self.out_dir)) if self.out_dir.is_dir() else None
        if not resume:
            held = last or (self.last_path if self.last_path.is_file() else None) \
                or (self.out_dir / "summary.json" if (self.out_dir / "summary.json").is_file() else None)
            if held is not None:
                raise ConfigError(f"{self.out_dir} already holds a run ({Path(held).name}): pass --resume to continue "
                                  "it, or set run.out_dir (or run.seed) for a new run")
            return None
        if last is None:
            hint = " (it holds a run.engine=own run: resume it with run.engine=own)" if self.last_path.is_file() else ""
            raise CheckpointError(f"cannot resume: no Trainer checkpoint (checkpoint-N/) in {self.out_dir}{hint}; "
                                  "start the run without --resume, or check run.out_dir")
        state_path = Path(last) / _STATE_FILE
        state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if not state:  # killed after the Trainer wrote the checkpoint, before locakd's state went in
            best_path = self.out_dir / "best" / _STATE_FILE
            best = json.loads(best_path.read_text()) if best_path.is_file() else None
            config_path = self.out_dir / "config.yaml"
            state = {"config": read_yaml(config_path) if config_path.is_file() else {},
                     "best": None if best is None else {"metric": best.get("select_by"), "value": best.get("value"),
                                                        "step": best.get("step"), "loss": best.get("loss")},
                     "missing_state": True}
        return {**state, "step": _checkpoint_step(last), "path": last}


def train_with_hf(config: LMExperimentConfig, *, command: str = "lm-distill", resume: bool = False,
                  stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``lm-sft`` / ``lm-distill`` for ``config`` with ``transformers.Trainer``; returns the summary."""
    splits = load_train_valid_records(config)
    args = training_arguments(config, has_valid=bool(splits.valid))  # sets up the process group under a launcher
    env = DistEnv(rank=args.process_index, world_size=args.world_size, local_rank=args.local_process_index)
    run = _TrainerRun(config, out_dir=config.run.out_dir, command=command, checkpoint_format="transformers-trainer",
                      position_key="step", resume=resume, env=env, device=args.device)
    try:
        return _train(run, args, splits, stop_after_steps)
    finally:
        run.close()


def _train(run: _TrainerRun, args: DistillationArguments, splits: Any, stop_after_steps: int | None) -> dict[str, Any]:
    config, command, spec, run_dir = run.config, run.command, run.config.method.spec, run.out_dir
    logger = run.begin()  # stale temp files removed, metrics trimmed to the checkpoint, config.yaml written
    transformers.set_seed(config.run.seed)
    tokenizer = load_run_tokenizer(config)
    train_ds = tokenize(config, splits.train, tokenizer)
    valid_ds = tokenize(config, splits.valid, tokenizer) if splits.valid else None
    logger.info(f"{command} (engine hf): train {train_ds.stats.summary()}")
    if valid_ds is not None:
        logger.info(f"{command} (engine hf): valid {valid_ds.stats.summary()}")
    if len(train_ds) == 0:
        raise ConfigError("no training example survived tokenisation (see the counts above); "
                          "raise data.max_length or check the records")
    student = load_student(config, torch.device("cpu"))  # the Trainer places (or shards) it
    check_positions(student, config.data.max_length, "student")
    teacher = cache = None
    if config.model.teacher_cache and command == "lm-distill":
        # checked against the run (tokenizer, data, template, lengths, temperature, vocabulary) before training;
        # model.teacher is not read
        cache = open_teacher_cache(config, tokenizer, split="train", examples=train_ds,
                                   student_vocab_size=output_vocab_size(student))
        logger.info(f"{command}: teacher cache {config.model.teacher_cache} (top_k {cache.top_k}, "
                    f"{cache.bytes_per_token:.0f} bytes per token); the teacher is not loaded")
    elif spec.uses_teacher:
        teacher = load_teacher(config, torch.device("cpu"), tokenizer)  # checks the tokenizer (model.check_tokenizer)
        check_positions(teacher, config.data.max_length, "teacher")
    elif config.model.teacher:
        logger.info(f"{command}: method sft trains on the cross-entropy only; the hf engine does not load the teacher")

    best: dict[str, Any] = {"metric": config.eval.select_by if valid_ds is not None else None, "value": None,
                            "step": None, "loss": None}
    callback = _RunCallback(run, logger, best, stop_after_steps, has_valid=valid_ds is not None)
    valid_records = splits.valid[: config.eval.valid_max_examples or None]
    with quiet_transformers():
        trainer = _RunTrainer(model=student, teacher_model=teacher, teacher_cache=cache, args=args,
                              train_dataset=train_ds,
                              eval_dataset=valid_ds, processing_class=tokenizer, callbacks=[callback],
                              run_config=config, valid_records=valid_records)
    callback.trainer = trainer
    # metrics go to metrics.jsonl / TensorBoard and messages to stderr; keep stdout for the command's JSON result
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.remove_callback(transformers.ProgressCallback)
    if config.run.progress:
        trainer.add_callback(_BarsOnly())
    if valid_ds is not None and config.eval.select_by in _GENERATION_METRICS \
            and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ConfigError(f"eval.select_by={config.eval.select_by} validates by generating text, which a sharded "
                          "(FSDP / DeepSpeed) student cannot do here; use eval.select_by=loss")
    checkpoint = run.checkpoint
    if checkpoint is not None:
        best.update(checkpoint.get("best") or {})
        if "train_totals" in checkpoint:
            trainer._train_totals += torch.tensor(checkpoint["train_totals"], dtype=torch.float64,
                                                  device=trainer._train_totals.device)
        logger.info(f"{command}: resumed from {checkpoint['path']} at step {run.position}")
        if checkpoint.get("missing_state"):
            logger.info(f"note: {checkpoint['path']} has no {_STATE_FILE} (the run was stopped while saving it): "
                        "the best model so far is taken from best/, the wall time and the teacher's mis-instruction "
                        "counts start again from this session")
    world = args.world_size
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    logger.info(
        f"{command} (engine hf): method {spec.name}, {len(train_ds)} examples, global batch {global_batch} "
        f"({world} process(es), accelerate {_distributed_type(trainer)}, device {args.device}, "
        f"{config.run.precision}), student "
        f"{param_count(student) / 1e6:.2f}M params"
        + (f", teacher {param_count(teacher) / 1e6:.2f}M params ({config.model.teacher_dtype})" if teacher else "")
    )
    with quiet_transformers():
        trainer.train(resume_from_checkpoint=checkpoint["path"] if checkpoint is not None else None)
    stopped = callback.stopped
    step = trainer.state.global_step
    final_model = None
    if not stopped:
        _save_model_atomic(trainer, run_dir / "final", {"step": step})
        final_model = str(run_dir / "final")
        if best["step"] is None:
            logger.info(f"{command}: no validation set, so no best/ model; the model is in {run_dir / 'final'}")
    else:
        logger.info(f"{command}: stopped after {callback.session_steps} steps at step {step}; continue with --resume")
    summary = run.finish({  # plus the keys every pipeline writes (locakd.engine.run.SUMMARY_KEYS)
        "method": spec.name,
        "engine": "hf",
        "step": step,
        "total_steps": trainer.state.max_steps,
        "global_batch_size": global_batch,
        "train_examples": len(train_ds),
        "tokenization": train_ds.stats.as_dict(),
        "valid_examples": len(valid_ds) if valid_ds is not None else 0,
        "vocab_size": trainer.vocab_size,
        "student_params": param_count(student),
        "teacher_params": param_count(teacher) if teacher is not None else None,
        "teacher_cache": teacher_cache_summary(config.model.teacher_cache, cache),
        "teacher_misinstruction": _measured(trainer.teacher_misinstruction()),
        "tokens_trained": float(trainer._train_totals[2]),
        "last_train": callback.last_train,
        "last_valid": callback.last_valid,
        "best": {**best, "path": str(run_dir / "best") if best["step"] is not None else None},
        "final_model": final_model,
    }, status="stopped" if stopped else "finished")
    logger.info(f"{command}: done in {summary['wall_time_s']:.1f}s -> {run_dir}")
    return summary
