"""Moved to :mod:`locakd.image.evaluate` and :mod:`locakd.image.summarize`; kept for one release."""

from ..image.evaluate import evaluate, topk_correct
from ..image.summarize import (
    GroupSummary,
    RunRecord,
    find_runs,
    format_table,
    load_run,
    mean_std,
    summarize_runs,
)

__all__ = [
    "GroupSummary",
    "RunRecord",
    "evaluate",
    "find_runs",
    "format_table",
    "load_run",
    "mean_std",
    "summarize_runs",
    "topk_correct",
]
