"""Moved to :mod:`locakd.image.summarize`; this module keeps the old import path working for one release."""

from ..image.summarize import (
    GroupSummary,
    RunRecord,
    find_runs,
    format_table,
    groups_to_json,
    load_run,
    mean_std,
    summarize_runs,
)

__all__ = [
    "GroupSummary",
    "RunRecord",
    "find_runs",
    "format_table",
    "groups_to_json",
    "load_run",
    "mean_std",
    "summarize_runs",
]
