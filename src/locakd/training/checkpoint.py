"""Moved to :mod:`locakd.engine.io`; this module keeps the old import path working for one release."""

from ..engine.io import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint

__all__ = ["atomic_write_text", "load_checkpoint", "load_model_state", "save_checkpoint"]
