"""Benchmark drivers: run many image-trainer experiments (in worker processes), aggregate them.

Nothing here trains by itself: every run is a config handed to
:func:`locakd.training.image_trainer.train_teacher` or :func:`~locakd.training.image_trainer.distill`.

* :mod:`locakd.benchmarks.runner`: :class:`RunSpec` and :func:`run_specs` (resumable, dependency-aware,
  parallel worker processes, one overall progress bar);
* :mod:`locakd.benchmarks.stats`: mean +- std and the paired t confidence interval;
* :mod:`locakd.benchmarks.plots`: bar chart with error bars, alpha-sweep plot (matplotlib, Agg);
* :mod:`locakd.benchmarks.mnist1d_suite`: the MNIST-1D benchmark suite behind ``benchmarks/mnist1d/run_suite.py``.
"""

from .runner import RunSpec, run_specs
from .stats import mean_std, paired_ci, t_quantile

__all__ = ["RunSpec", "mean_std", "paired_ci", "run_specs", "t_quantile"]
