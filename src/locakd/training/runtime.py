"""Moved to :mod:`locakd.engine.runtime`; this module keeps the old import path working for one release."""

from ..engine.runtime import PRECISIONS, autocast_context, make_grad_scaler, resolve_device, seed_everything

__all__ = ["PRECISIONS", "autocast_context", "make_grad_scaler", "resolve_device", "seed_everything"]
