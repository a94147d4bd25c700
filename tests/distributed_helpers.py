"""Launching a 2-process gloo run from a test, with one retry for a rank's C++ abort.

On the CPU, a rank of a 2-process gloo run occasionally dies by SIGABRT from C++ ("terminate called
without an active exception"), also after the run finished and wrote its summary, while threads and
process groups are torn down at exit; it was seen about once in tens of launches on the 2-core CI box,
at different points of different runs, never with a Python error. Such a launch is re-run once, after
removing what the first attempt wrote (``clean``), in that case only; every other failure, and a second
abort, fails the test, and every assertion applies to the second run.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

GLOO_ABORT = "terminate called without an active exception"


def _gloo_abort(result: subprocess.CompletedProcess) -> bool:
    """Failed by a C++ abort alone: the abort message or a rank killed by SIGABRT, and no Python traceback but
    the launcher's own (torchrun reports a dead rank with one, ending in ChildFailedError)."""
    output = result.stdout + result.stderr
    launcher_tracebacks = 1 if "ChildFailedError" in output else 0
    return (result.returncode != 0 and (GLOO_ABORT in output or "(SIGABRT)" in output)
            and output.count("Traceback (most recent call last)") <= launcher_tracebacks)


def run_distributed(cmd: Sequence[str], *, clean: Sequence[Path] = (), **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, re-run once after a C++ abort, with the
    files and folders in ``clean`` (what the launch writes) removed first."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if _gloo_abort(result):
        for path in clean:
            shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
        result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    return result
