"""Experiment drivers: run many image-trainer experiments (in worker processes), aggregate them.

Nothing here trains by itself: every run is a config handed to
:func:`locakd.training.image_trainer.train_teacher` or :func:`~locakd.training.image_trainer.distill`.

* :mod:`locakd.experiments.runner`: :class:`RunSpec` and :func:`run_specs` (resumable, dependency-aware,
  parallel worker processes, one overall progress bar);
* :mod:`locakd.experiments.stats`: mean +- std and the paired t confidence interval;
* :mod:`locakd.experiments.plots`: bar chart with error bars, alpha-sweep plot (matplotlib, Agg);
* :mod:`locakd.experiments.mnist1d`: the MNIST-1D setting shared by ``locakd demo`` and the suite.
"""

from .runner import RunSpec, run_specs
from .stats import mean_std, paired_ci, t_quantile

__all__ = ["RunSpec", "mean_std", "paired_ci", "run_specs", "t_quantile"]
