"""Image-classification training: ``train_teacher(cfg)`` and ``distill(cfg)``, one loop for both.

The run lifecycle (device, process group, run folder, resume checks, checkpoints with every rank's RNG
state, metrics, summary) is :mod:`locakd.engine`'s; this module holds what is particular to images:

* data from :func:`locakd.data.build_dataset`: the order and augmentation of an epoch depend only on
  (seed, epoch, sample), so a resumed run repeats exactly what an uninterrupted one does, and N
  processes x B samples draw the same augmentations as 1 process x N*B;
* the student trained through a :class:`~locakd.distiller.Distiller` (method ``ce`` for teachers) with
  the configured optimiser and per-epoch learning-rate schedule;
* top-1 / top-5 on the test split every ``run.eval_every`` epochs and at the end
  (:func:`locakd.image.evaluate.evaluate`);
* per epoch: losses, train accuracy, learning rate, the teacher's mis-instruction rate on the
  (augmented) training stream and the test metrics to ``metrics.jsonl`` / TensorBoard;
* ``best.pt`` (when top-1 improves) and ``last.pt`` after every epoch; ``summary.json`` at the end.

Under ``torchrun --nproc_per_node N`` the same code runs data-parallel: the student is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA), each rank takes its shard of the epoch's
permutation, metrics are summed over ranks, and only rank 0 writes files. ``data.batch_size`` is per
process. BatchNorm statistics are per process unless ``run.sync_batchnorm`` (CUDA) is on; rank 0's are
broadcast before every evaluation and are the ones saved.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distiller import Distiller
from ..engine.distributed import all_reduce_sum, barrier, broadcast_buffers, convert_sync_batchnorm, wrap_ddp
from ..engine.io import load_checkpoint, load_model_state
from ..engine.run import FiniteWatch, Run, open_run
from ..engine.runtime import autocast_context, make_grad_scaler, seed_everything
from ..errors import CheckpointError, ConfigError
from .config import ImageExperimentConfig
from .evaluate import evaluate

__all__ = [
    "CHECKPOINT_FORMAT",
    "EpochCallback",
    "build_lr_lambda",
    "distill",
    "load_teacher",
    "resolve_teacher_checkpoint",
    "run_image_experiment",
    "train_teacher",
]

CHECKPOINT_FORMAT = "locakd-image-v1"
MODES = ("train-teacher", "distill")

# Called on every rank after an epoch's checkpoint is written: (completed epochs, epoch metrics).
EpochCallback = Callable[[int, dict[str, float]], None]

# Test hook: make one rank fail at one training step (exercises failure propagation under DDP).
_FAIL_RANK_ENV = "LOCAKD_TEST_FAIL_RANK"
_FAIL_STEP_ENV = "LOCAKD_TEST_FAIL_STEP"


def train_teacher(
    cfg: ImageExperimentConfig, *, resume: bool = False, callbacks: Sequence[EpochCallback] = ()
) -> dict[str, Any]:
    """Train ``cfg.student.name`` alone with cross-entropy (``method.name: ce``); returns the summary."""
    return run_image_experiment(cfg, "train-teacher", resume=resume, callbacks=callbacks)


def distill(
    cfg: ImageExperimentConfig, *, resume: bool = False, callbacks: Sequence[EpochCallback] = ()
) -> dict[str, Any]:
    """Distill the frozen ``cfg.teacher`` into ``cfg.student`` with ``cfg.method``; returns the summary."""
    return run_image_experiment(cfg, "distill", resume=resume, callbacks=callbacks)


def run_image_experiment(
    cfg: ImageExperimentConfig,
    mode: str,
    *,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> dict[str, Any]:
    """The one training loop behind :func:`train_teacher` and :func:`distill`."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    cfg.check_for(mode)
    with open_run(cfg, out_dir=cfg.output_dir(), command=mode, checkpoint_format=CHECKPOINT_FORMAT,
                  position_key="epoch", resume=resume) as run:
        return _ImageRun(cfg, mode, run).fit(callbacks)


# --------------------------------------------------------------------------- helpers


def build_lr_lambda(cfg: ImageExperimentConfig) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` for (0-based) epoch ``e``: a pure function of the config."""
    o = cfg.optim
    if o.schedule == "multistep":
        milestones = list(o.milestones)
        return lambda e: o.gamma ** sum(1 for m in milestones if e >= m)
    if o.schedule == "cosine":
        epochs = cfg.run.epochs
        floor = o.min_lr / o.lr
        return lambda e: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))
    return lambda e: 1.0


def resolve_teacher_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a teacher run folder (its ``best.pt``, else ``last.pt``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"teacher run folder {path} (config key teacher.checkpoint) holds no best.pt or last.pt; "
            "train the teacher first (locakd train-teacher) or point at a checkpoint file"
        )
    if not path.exists():
        raise CheckpointError(f"teacher checkpoint not found: {path} (config key teacher.checkpoint)")
    return path


def _state_dict_of(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The model weights in a locakd checkpoint, a ``{"model": ...}`` / ``{"state_dict": ...}`` dict, or a bare state dict."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            sd = state[key]
            break
    else:
        sd = state
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights (expected a 'model' state dict)")
    # Weights saved from a DDP / DataParallel wrapper carry a "module." prefix.
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_teacher(
    cfg: ImageExperimentConfig, num_classes: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build ``teacher.name`` and load ``teacher.checkpoint`` into it (CheckpointError on any mismatch)."""
    from .. import models

    teacher = models.create(cfg.teacher.name, num_classes)
    path = resolve_teacher_checkpoint(cfg.teacher.checkpoint)
    state = load_checkpoint(path)
    sd = _state_dict_of(state, path)
    source = f"{path} (config key teacher.checkpoint, teacher.name={cfg.teacher.name!r})"
    try:
        load_model_state(teacher, sd, what="teacher", source=source)
    except CheckpointError as err:
        trained_as = (
            (state.get("config") or {}).get("student", {}).get("name")
            if isinstance(state.get("config"), dict)
            else None
        )
        hint = (
            f"; that checkpoint was trained as {trained_as!r}"
            if trained_as and trained_as != cfg.teacher.name
            else ""
        )
        raise CheckpointError(f"{err}{hint}") from None
    return teacher.to(device)


# --------------------------------------------------------------------------- the run


class _ImageRun:
    def __init__(self, cfg: ImageExperimentConfig, mode: str, run: Run) -> None:
        from .. import models

        self.cfg, self.mode, self.run = cfg, mode, run
        self.env, self.device, self.out_dir = run.env, run.device, run.out_dir
        env, device, ckpt = run.env, run.device, run.checkpoint

        seed_everything(cfg.run.seed + env.rank)
        self.spec = self._build_data()
        self.num_classes = self.spec.num_classes

        # Student (same initial weights on every rank), optional frozen teacher.
        student = models.create(cfg.student.name, self.num_classes, seed=cfg.run.seed)
        self._check_forward(student, "student.name", cfg.student.name)
        student.to(device)
        if cfg.run.sync_batchnorm:
            student = convert_sync_batchnorm(student, device, env, "run.sync_batchnorm")
        self.student = student
        self.teacher = load_teacher(cfg, self.num_classes, device) if cfg.has_teacher else None
        if self.teacher is not None:
            self._check_forward(self.teacher, "teacher.name", cfg.teacher.name)
        if ckpt is not None:
            load_model_state(self.student, ckpt["model"], what="student", source=str(run.last_path))
        self.distiller = Distiller.from_config(wrap_ddp(student, device, env), self.teacher, cfg.method)

        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, build_lr_lambda(cfg))
        self.scaler = make_grad_scaler(device, cfg.run.precision)

        self.best_top1, self.best_top5, self.best_epoch = -math.inf, math.nan, 0
        self.last_eval: dict[str, float] = {}
        self.teacher_eval: dict[str, float] | None = None
        self.mis_total = [0.0, 0.0]  # mis-instructed samples, samples (all epochs so far)
        self.last_mis_rate: float | None = None
        if ckpt is not None:
            self._restore(ckpt)

    # ----------------------------------------------------------------- setup

    def _build_data(self):
        from ..data import build_dataset

        d = self.cfg.data
        if d.name == "mnist1d":
            kwargs: dict[str, Any] = {
                "num_samples": d.mnist1d_samples,
                "seed": d.mnist1d_seed,
                "train_split": d.mnist1d_train_split,
                "noise_std": d.mnist1d_noise_std if d.augment else 0.0,
                "cache_dir": d.root or None,
            }
        elif d.name == "imagefolder":
            kwargs = {"image_size": d.image_size}
        else:
            kwargs = {"augment": d.augment, "progress": self.env.is_main}
        root = d.root or None
        # Rank 0 fetches/extracts first; the others then read what it left.
        if self.env.enabled and d.download:
            if self.env.is_main:
                spec = build_dataset(d.name, root, download=True, **kwargs)
            barrier()
            if not self.env.is_main:
                spec = build_dataset(d.name, root, download=False, **kwargs)
            return spec
        return build_dataset(d.name, root, download=d.download, **kwargs)

    def _loader(self, split: str):
        d, env = self.cfg.data, self.env
        train = split == "train"
        return self.spec.loader(
            split,
            d.batch_size if train else d.eval_batch_size,
            shuffle=train,
            seed=self.cfg.run.seed,
            rank=env.rank,
            world_size=env.world_size,
            drop_last=d.drop_last if train else False,
            augment=d.augment,
            device=self.device if self.spec.in_memory else None,
            num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _check_forward(self, model: nn.Module, key: str, name: str) -> None:
        """One tiny forward on two test inputs: a model/dataset mismatch fails here, clearly."""
        loader = self.spec.loader("test", 2, shuffle=False)
        images, _ = next(iter(loader))
        param = next(model.parameters(), None)
        if param is not None:
            images = images.to(param.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(images)
        except Exception as err:
            raise ConfigError(
                f"{key}={name!r} cannot take {self.spec.name} inputs of shape {tuple(images.shape[1:])}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        finally:
            model.train(was_training)
        if tuple(logits.shape) != (images.shape[0], self.num_classes):
            raise ConfigError(
                f"{key}={name!r} returned logits of shape {tuple(logits.shape)}, expected "
                f"[N, {self.num_classes}] for {self.spec.name}"
            )

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = list(self.student.parameters())
        if o.name == "sgd":
            return torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
            )
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.best_top1 = float(ckpt["best_top1"])
        self.best_top5 = float(ckpt["best_top5"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.last_eval = dict(ckpt.get("last_eval") or {})
        self.teacher_eval = ckpt.get("teacher_eval")
        self.mis_total = list(ckpt.get("misinstruction_total", [0.0, 0.0]))
        self.last_mis_rate = ckpt.get("misinstruction_rate_last")

    # ----------------------------------------------------------------- loop

    def fit(self, callbacks: Sequence[EpochCallback]) -> dict[str, Any]:
        cfg, env, run = self.cfg, self.env, self.run
        logger = run.begin()
        run.restore_rng()
        if run.resumed:
            logger.info(f"resuming {self.out_dir} after epoch {run.position}/{cfg.run.epochs}")
        else:
            logger.info(
                f"{self.mode}: {self._describe()} -> {self.out_dir} "
                f"(world size {env.world_size}, device {self.device}, {cfg.run.precision})"
            )
        if self.mode == "train-teacher" and cfg.method.ce_weight != 1.0:
            logger.info(
                f"note: method.ce_weight={cfg.method.ce_weight} scales the cross-entropy loss "
                "(the teacher recipes use 1.0)"
            )
        test_loader = self._loader("test")
        if self.teacher is not None and self.teacher_eval is None:
            self.teacher_eval = self._evaluate(self.teacher, test_loader, "teacher")
            logger.log(0, {f"teacher_{k}": float(v) for k, v in self.teacher_eval.items()}, tag="teacher")
            logger.info(
                f"teacher {cfg.teacher.name}: test top-1 {self.teacher_eval['top1']:.2f} "
                f"top-5 {self.teacher_eval['top5']:.2f}"
            )
        train_loader = self._loader("train")
        for epoch in range(run.position, cfg.run.epochs):
            metrics = self._train_epoch(epoch, train_loader)
            done = epoch + 1
            is_best = False
            if done % cfg.run.eval_every == 0 or done == cfg.run.epochs:
                result = self._evaluate(self.student, test_loader, f"eval {done}")
                self.last_eval = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
                                  "epoch": done}
                metrics.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"])
                is_best = result["top1"] > self.best_top1
                if is_best:
                    self.best_top1, self.best_top5, self.best_epoch = result["top1"], result["top5"], done
            if math.isfinite(self.best_top1):
                metrics["best_top1"] = self.best_top1
            logger.log(done, metrics)
            run.save(self._state(done), best=is_best)
            logger.info(self._epoch_line(done, metrics))
            for callback in callbacks:
                callback(done, metrics)
        summary = run.finish(self._summary())
        logger.info(
            f"done: best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
            f"last top-1 {summary['last_top1']:.2f}; {self.out_dir / 'summary.json'}"
        )
        return summary

    def _describe(self) -> str:
        cfg = self.cfg
        if self.teacher is None:
            return f"{cfg.student.name} on {cfg.data.name} with {cfg.method.name}"
        return f"{cfg.teacher.name} -> {cfg.student.name} on {cfg.data.name} with {cfg.method.name}"

    def _train_epoch(self, epoch: int, loader) -> dict[str, float]:
        cfg, env, device = self.cfg, self.env, self.device
        distiller, optimizer, scaler = self.distiller, self.optimizer, self.scaler
        distiller.train()
        loader.set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        # sums: ce, kd, total loss (x batch size), correct, samples, mis-instructed
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        watch = FiniteWatch(["ce"] if cfg.method.name == "ce" else ["ce", "kd"], device)
        fail_step = self._fail_step()
        t0 = time.time()
        bar = self._progress(loader, desc=f"epoch {epoch + 1}/{cfg.run.epochs}", total=len(loader))
        for step, (images, labels) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, cfg.run.precision):
                out = distiller.compute(images, labels, epoch=epoch)
            watch.update(step, **out.losses)
            loss = out.loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = labels.shape[0]
            with torch.no_grad():
                sums[0] += out.losses["ce"].detach().double() * n
                if "kd" in out.losses:
                    sums[1] += out.losses["kd"].detach().double() * n
                sums[2] += loss.detach().double() * n
                sums[3] += (out.student_logits.argmax(dim=-1) == labels).sum()
                sums[4] += n
                if out.teacher_logits is not None:
                    sums[5] += (out.teacher_logits.argmax(dim=-1) != labels).sum()
            if fail_step is not None and step == fail_step:
                raise RuntimeError(
                    f"injected failure on rank {env.rank} at step {step} ({_FAIL_RANK_ENV}/{_FAIL_STEP_ENV} test hook)"
                )
        self.scheduler.step()
        watch.check(lambda step: f"step {step + 1} of epoch {epoch + 1} (global step {epoch * len(loader) + step + 1})")
        all_reduce_sum(sums)
        count = max(float(sums[4]), 1.0)
        metrics = {
            "lr": lr,
            "train_loss": float(sums[2]) / count,
            "train_ce": float(sums[0]) / count,
            "train_top1": 100.0 * float(sums[3]) / count,
            "epoch_time_s": time.time() - t0,
        }
        if self.teacher is not None:
            metrics["train_kd"] = float(sums[1]) / count
            metrics["kd_factor"] = distiller.kd_factor(epoch)
            rate = float(sums[5]) / count
            metrics["misinstruction_rate"] = rate
            self.last_mis_rate = rate
            self.mis_total[0] += float(sums[5])
            self.mis_total[1] += float(sums[4])
        return metrics

    def _progress(self, iterable, *, desc: str, total: int):
        assert self.run.logger is not None  # begin() opened it
        return self.run.logger.progress(iterable, desc=desc, total=total)

    def _fail_step(self) -> int | None:
        rank = os.environ.get(_FAIL_RANK_ENV)
        if rank is None or int(rank) != self.env.rank:
            return None
        return int(os.environ.get(_FAIL_STEP_ENV, "0"))

    def _evaluate(self, model: nn.Module, loader, desc: str) -> dict[str, float]:
        if model is self.student:
            broadcast_buffers(model)
        return evaluate(
            model,
            loader,
            device=self.device,
            precision=self.cfg.run.precision,
            rank=self.env.rank,
            world_size=self.env.world_size,
            progress=lambda it: self._progress(it, desc=desc, total=len(loader)),
        )

    def _state(self, done: int) -> dict[str, Any]:
        """What ``last.pt`` / ``best.pt`` hold besides the engine's entries (format, RNG, config, ...)."""
        return {
            "mode": self.mode,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": done,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "best_epoch": self.best_epoch,
            "last_eval": self.last_eval,
            "teacher_eval": self.teacher_eval,
            "misinstruction_total": list(self.mis_total),
            "misinstruction_rate_last": self.last_mis_rate,
        }

    def _epoch_line(self, done: int, m: dict[str, float]) -> str:
        parts = [f"epoch {done}/{self.cfg.run.epochs}", f"lr {m['lr']:.4g}", f"loss {m['train_loss']:.4f}"]
        parts.append(f"train top-1 {m['train_top1']:.2f}")
        if "misinstruction_rate" in m:
            parts.append(f"mis-instructed {100 * m['misinstruction_rate']:.2f}%")
        if "test_top1" in m:
            parts.append(f"test top-1 {m['test_top1']:.2f} top-5 {m['test_top5']:.2f}")
        if "best_top1" in m:
            parts.append(f"best {m['best_top1']:.2f}")
        return " | ".join(parts)

    def _summary(self) -> dict[str, Any]:
        """The image pipeline's summary keys (the engine adds command, status, seed, wall time, ...)."""
        cfg = self.cfg
        from ..models import count_parameters

        return {
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "student": cfg.student.name,
            "teacher": cfg.teacher.name or None,
            "epochs": cfg.run.epochs,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "best_epoch": self.best_epoch,
            "last_top1": self.last_eval.get("top1"),
            "last_top5": self.last_eval.get("top5"),
            "last_epoch": self.last_eval.get("epoch"),
            "teacher_top1": None if self.teacher_eval is None else self.teacher_eval["top1"],
            "teacher_top5": None if self.teacher_eval is None else self.teacher_eval["top5"],
            "misinstruction_rate": (self.mis_total[0] / self.mis_total[1]) if self.mis_total[1] else None,
            "misinstruction_rate_last_epoch": self.last_mis_rate,
            "student_params": count_parameters(self.student),
            "global_batch_size": cfg.data.batch_size * self.env.world_size,
        }
