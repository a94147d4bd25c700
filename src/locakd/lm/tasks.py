"""Moved to :mod:`locakd.lm.fixtures`; this module keeps the old import path working for one release."""

from .fixtures import INSTRUCTION_TASKS, WORDS, make_instruction_suite, make_shakespeare_prompts, write_jsonl

__all__ = ["INSTRUCTION_TASKS", "WORDS", "make_instruction_suite", "make_shakespeare_prompts", "write_jsonl"]
