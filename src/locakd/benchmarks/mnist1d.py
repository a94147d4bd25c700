"""Deprecated alias of :mod:`locakd.experiments.mnist1d` (kept for one release)."""

from ..experiments.mnist1d import *  # noqa: F403 - the alias re-exports everything
from ..experiments.mnist1d import __all__  # noqa: F401
