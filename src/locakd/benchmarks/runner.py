"""Deprecated alias of :mod:`locakd.experiments.runner` (kept for one release)."""

from ..experiments.runner import *  # noqa: F403 - the alias re-exports everything
from ..experiments.runner import __all__  # noqa: F401
