"""Experiment drivers: many image-trainer runs (in worker processes), aggregated and plotted.

This is what ``locakd demo`` is built on, and the MNIST-1D benchmark suite
(``benchmarks/mnist1d/suite.py``, outside the package) too. Nothing here trains by itself:
every run is a config handed to :func:`locakd.image.trainer.train_teacher` or
:func:`~locakd.image.trainer.distill`.

* :mod:`locakd.experiments.runner`: :class:`RunSpec`, :func:`run_specs` (resumable,
  dependency-aware, parallel worker processes, one overall progress bar), :class:`RunResult`,
  :func:`finished_results` (read finished runs back without training), :func:`default_workers`;
* :mod:`locakd.experiments.stats`: mean +- std, the paired t confidence interval
  (:func:`paired_ci`, :func:`paired_by_seed`), :func:`t_quantile`;
* :mod:`locakd.experiments.plots`: bar chart with error bars, alpha-sweep plot (matplotlib, Agg);
* :mod:`locakd.experiments.mnist1d`: :class:`Mnist1dSetting` (one MNIST-1D regime -> run specs),
  :data:`DEFAULT_SETTING` / :data:`QUICK_SETTING`, the KD / DKD method families of the Distiller;
* :mod:`locakd.experiments.machine`: :func:`machine_info`, :func:`cpu_seconds` and the load
  average recorded next to every timing.

Layer: above the image trainer, below ``locakd.demo`` and the CLI; nothing below imports it.
"""

from .machine import cpu_seconds, machine_info
from .mnist1d import DEFAULT_SETTING, QUICK_SETTING, Mnist1dSetting
from .runner import RunResult, RunSpec, default_workers, finished_results, run_specs
from .stats import mean_std, paired_by_seed, paired_ci, t_quantile

__all__ = [
    "DEFAULT_SETTING",
    "QUICK_SETTING",
    "Mnist1dSetting",
    "RunResult",
    "RunSpec",
    "cpu_seconds",
    "default_workers",
    "finished_results",
    "machine_info",
    "mean_std",
    "paired_by_seed",
    "paired_ci",
    "run_specs",
    "t_quantile",
]
