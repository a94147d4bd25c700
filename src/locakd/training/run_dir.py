"""Moved to :mod:`locakd.engine.logging`; this module keeps the old import path working for one release."""

from ..engine.logging import RunLogger, read_metrics

__all__ = ["RunLogger", "read_metrics"]
