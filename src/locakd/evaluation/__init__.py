"""Evaluation: top-k accuracy (exact under DDP) and summaries over seeds of finished runs."""

from .metrics import evaluate, topk_correct
from .summarize import GroupSummary, RunRecord, find_runs, format_table, load_run, mean_std, summarize_runs

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
