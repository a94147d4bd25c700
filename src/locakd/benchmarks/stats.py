"""Deprecated alias of :mod:`locakd.experiments.stats` (kept for one release)."""

from ..experiments.stats import *  # noqa: F403 - the alias re-exports everything
from ..experiments.stats import __all__  # noqa: F401
