"""Moved to :mod:`locakd.image.evaluate`; this module keeps the old import path working for one release."""

from ..image.evaluate import evaluate, topk_correct

__all__ = ["evaluate", "topk_correct"]
