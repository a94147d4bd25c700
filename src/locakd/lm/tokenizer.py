"""Moved to :mod:`locakd.lm.fixtures`; this module keeps the old import path working for one release."""

from .fixtures import ENDOFTEXT, train_bpe_tokenizer

__all__ = ["ENDOFTEXT", "train_bpe_tokenizer"]
