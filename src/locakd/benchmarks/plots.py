"""Deprecated alias of :mod:`locakd.experiments.plots` (kept for one release)."""

from ..experiments.plots import *  # noqa: F403 - the alias re-exports everything
from ..experiments.plots import __all__  # noqa: F401
