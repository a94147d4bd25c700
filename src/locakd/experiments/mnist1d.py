"""The MNIST-1D training setting shared by ``locakd demo`` and the MNIST-1D benchmark suite.

:class:`Mnist1dSetting` holds every number of one experimental regime (data size, input
noise, epochs, optimiser, KD / DKD / LoCa hyper-parameters) and turns it into config
overrides for the image trainer, i.e. into :class:`~locakd.experiments.runner.RunSpec`s.

The defaults are the regime where distillation was found to help on MNIST-1D (see
``BENCHMARKS_mnist1d.md`` for the grid behind them):

* 5000 samples (4000 train / 1000 test), generated locally with the ``mnist1d`` package;
* Gaussian noise (std 0.3, inputs are standardised to unit std) added to every training
  input, for teachers and students alike. Without it a teacher fits its training set
  perfectly, so it never mis-instructs and LoCa is exactly KD; with it the teacher is
  wrong on a few percent (strong teacher) to a quarter (weak teacher) of the stream;
* AdamW, lr 1e-2, cosine schedule to 0, no weight decay, batch 64, 30 epochs;
* KD: T = 4, CE weight 0.5, KD weight 0.5 (the CIFAR 0.1 / 0.9 mix under-uses the labels
  here); LoCa alpha 0.9;
* DKD: CE 1.0, DKD weight 1.0, TCKD weight 1.0, NCKD weight beta = 2 (8 over-weights the
  non-target term with 10 classes), T = 4, linear warm-up over 5 of the 30 epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distiller import DKD_METHODS, KD_METHODS, LOCA_METHODS, METHODS
from ..errors import ConfigError
from .runner import RunSpec

__all__ = [
    "DEFAULT_SETTING",
    "DKD_FAMILY",
    "KD_FAMILY",
    "QUICK_SETTING",
    "Mnist1dSetting",
    "mnist1d_models",
    "model_name",
    "relevant_fields",
    "short_model",
    "uncalibrated_method",
]

# The two method families, as the Distiller defines them: the KD family shares the CE / KD
# weights (and differs in the teacher target), the DKD family has its own loss weights.
KD_FAMILY: tuple[str, ...] = KD_METHODS
DKD_FAMILY: tuple[str, ...] = DKD_METHODS
_LOCA_SUFFIX = "+loca"


def uncalibrated_method(method: str) -> str:
    """The method a LoCa method calibrates, in the same family (``kd+loca`` -> ``kd``); others: itself."""
    if method not in LOCA_METHODS:
        return method
    base = method.removesuffix(_LOCA_SUFFIX)
    family = KD_FAMILY if method in KD_FAMILY else DKD_FAMILY
    if base == method or base not in family:
        raise ConfigError(f"LoCa method {method!r} has no uncalibrated counterpart in its family {family}")
    return base


def model_name(short: str) -> str:
    """``cnn_64`` -> ``mnist1d_cnn_64`` (full names pass through)."""
    return short if short.startswith("mnist1d_") else f"mnist1d_{short}"


def short_model(name: str) -> str:
    """``mnist1d_cnn_64`` -> ``cnn_64`` (other names pass through)."""
    return name[len("mnist1d_") :] if name.startswith("mnist1d_") else name


def mnist1d_models() -> list[str]:
    """Short names of the MNIST-1D models in the model registry, by family then width (``cnn_8``, ...)."""
    from ..models import available

    def order(short: str) -> tuple[str, int, str]:
        family, _, width = short.rpartition("_")
        return (family, int(width), short) if width.isdigit() else (short, 0, short)

    return sorted((short_model(m) for m in available() if m.startswith("mnist1d_")), key=order)


_DATA_FIELDS = ("samples", "train_split", "noise_std", "data_seed", "batch_size", "lr", "weight_decay")


def relevant_fields(method: str | None) -> tuple[str, ...]:
    """The :class:`Mnist1dSetting` fields a run of ``method`` depends on (``None``: a teacher run)."""
    if method is None:
        return (*_DATA_FIELDS, "teacher_epochs")
    if method == "ce":
        return (*_DATA_FIELDS, "epochs")
    base = (*_DATA_FIELDS, "epochs", "teacher_epochs", "temperature")
    if method in DKD_FAMILY:
        return (*base, "dkd_alpha", "dkd_beta", "dkd_warmup")
    return (*base, "ce_weight", "kd_weight") + (("smoothing",) if method == "ka_smooth" else ())


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Mnist1dSetting:
    """Every hyper-parameter of one MNIST-1D regime (see the module doc for the defaults)."""

    samples: int = 5000
    train_split: float = 0.8
    noise_std: float = 0.3
    data_seed: int = 42
    epochs: int = 30
    teacher_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    temperature: float = 4.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    loca_alpha: float = 0.9
    dkd_alpha: float = 1.0
    dkd_beta: float = 2.0
    dkd_warmup: int = 5
    smoothing: float = 0.1

    def replace(self, **changes: Any) -> Mnist1dSetting:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, fields: tuple[str, ...] | None = None) -> str:
        """Short hash of ``fields`` (default: all); names run folders so that settings never mix."""
        data = self.to_dict()
        if fields is not None:
            data = {k: data[k] for k in fields}
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_digest(self, method: str | None) -> str:
        """Hash of the fields that change a run of ``method`` (``None``: a teacher).

        Two settings that differ only in, say, the KD temperature share their teacher and CE runs.
        """
        return self.digest(relevant_fields(method))

    # ------------------------------------------------------------------ overrides

    def _common(
        self, model: str, epochs: int, seed: int, cache_dir: str | Path | None, device: str
    ) -> list[str]:
        return [
            "data.name=mnist1d",
            f"data.root={cache_dir or ''}",
            f"data.mnist1d_samples={self.samples}",
            f"data.mnist1d_train_split={self.train_split}",
            f"data.mnist1d_seed={self.data_seed}",
            f"data.mnist1d_noise_std={self.noise_std}",
            "data.augment=true",
            f"data.batch_size={self.batch_size}",
            "data.eval_batch_size=1000",
            f"student.name={model_name(model)}",
            "optim.name=adamw",
            f"optim.lr={self.lr}",
            f"optim.weight_decay={self.weight_decay}",
            "optim.schedule=cosine",
            "optim.min_lr=0.0",
            f"run.epochs={epochs}",
            f"run.seed={seed}",
            f"run.device={device}",
            "run.progress=false",
            "run.tensorboard=false",
            "run.eval_every=1",
        ]

    def teacher_overrides(
        self, model: str, *, seed: int = 0, cache_dir: str | Path | None = None, device: str = "cpu"
    ) -> list[str]:
        """A teacher trained alone with cross-entropy."""
        return [
            *self._common(model, self.teacher_epochs, seed, cache_dir, device),
            "method.name=ce",
            "method.ce_weight=1.0",
        ]

    def student_overrides(
        self,
        student: str,
        method: str,
        *,
        seed: int,
        teacher: str | None = None,
        teacher_checkpoint: str | Path | None = None,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
        loca_alpha: float | None = None,
    ) -> list[str]:
        """A student trained with ``method`` (``ce`` takes no teacher)."""
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        ov = [*self._common(student, self.epochs, seed, cache_dir, device), f"method.name={method}"]
        if method == "ce":
            return [*ov, "method.ce_weight=1.0"]
        if not teacher or not teacher_checkpoint:
            raise ConfigError(f"method {method!r} needs a teacher and its checkpoint")
        ov += [
            f"teacher.name={model_name(teacher)}",
            f"teacher.checkpoint={teacher_checkpoint}",
            f"method.temperature={self.temperature}",
        ]
        alpha = self.loca_alpha if loca_alpha is None else loca_alpha
        if method in DKD_FAMILY:
            ov += [
                "method.ce_weight=1.0",
                "method.kd_weight=1.0",
                f"method.dkd_alpha={self.dkd_alpha}",
                f"method.dkd_beta={self.dkd_beta}",
                f"method.warmup_epochs={self.dkd_warmup}",
            ]
        else:
            ov += [f"method.ce_weight={self.ce_weight}", f"method.kd_weight={self.kd_weight}"]
            if method == "ka_smooth":
                ov.append(f"method.smoothing={self.smoothing}")
        if method in LOCA_METHODS:
            ov.append(f"method.loca_alpha={alpha}")
        return ov

    # ------------------------------------------------------------------ specs

    def teacher_spec(
        self, key: str, out_dir: str | Path, model: str, *, cache_dir=None, device: str = "cpu", meta=None
    ) -> RunSpec:
        return RunSpec(
            key,
            "train-teacher",
            str(out_dir),
            tuple(self.teacher_overrides(model, cache_dir=cache_dir, device=device)),
            meta=dict(meta or {}, role="teacher", model=short_model(model_name(model))),
        )

    def student_spec(
        self,
        key: str,
        out_dir: str | Path,
        student: str,
        method: str,
        seed: int,
        *,
        teacher_spec: RunSpec | None = None,
        teacher: str | None = None,
        cache_dir=None,
        device: str = "cpu",
        loca_alpha: float | None = None,
        meta=None,
    ) -> RunSpec:
        """A student run; for methods other than ``ce`` it waits for ``teacher_spec`` and reads its ``last.pt``."""
        needs_teacher = method != "ce"
        ckpt = str(Path(teacher_spec.out_dir) / "last.pt") if (needs_teacher and teacher_spec) else None
        ov = self.student_overrides(
            student,
            method,
            seed=seed,
            teacher=teacher if needs_teacher else None,
            teacher_checkpoint=ckpt,
            cache_dir=cache_dir,
            device=device,
            loca_alpha=loca_alpha,
        )
        alpha = self.loca_alpha if loca_alpha is None else loca_alpha
        info = dict(
            meta or {}, role="student", model=short_model(model_name(student)), method=method, seed=seed
        )
        if method in LOCA_METHODS:
            info["loca_alpha"] = alpha
        return RunSpec(
            key,
            "distill",
            str(out_dir),
            tuple(ov),
            after=teacher_spec.key if (needs_teacher and teacher_spec) else None,
            meta=info,
        )

    def describe(self) -> str:
        """One line for tables and logs."""
        return (
            f"MNIST-1D {self.samples} samples ({int(self.samples * self.train_split)} train), input noise "
            f"{_fmt(self.noise_std)}, {self.epochs} epochs (teacher {self.teacher_epochs}), AdamW lr {_fmt(self.lr)} "
            f"cosine, batch {self.batch_size}; KD T={_fmt(self.temperature)} CE {_fmt(self.ce_weight)} / "
            f"KD {_fmt(self.kd_weight)}; LoCa alpha {_fmt(self.loca_alpha)}; DKD beta {_fmt(self.dkd_beta)}, "
            f"warm-up {self.dkd_warmup}"
        )


# The regime of the demo and of the suite's main comparison (see the module doc).
DEFAULT_SETTING = Mnist1dSetting()
# A smoke-test version: a few hundred samples and a few epochs (the numbers mean nothing).
QUICK_SETTING = Mnist1dSetting(samples=600, epochs=3, teacher_epochs=3, dkd_warmup=1)
