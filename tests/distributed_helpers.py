"""Launching a stateless 2-process gloo script from a test, with one retry for gloo's own C++ abort.

On the CPU, gloo occasionally aborts a rank from C++ ("terminate called without an active exception",
the rank dies by SIGABRT) while process groups / DDP reducers are torn down; it was seen about once in
tens of launches on the 2-core CI box, at different points of different scripts, never with a Python
error. A script whose every check prints a line and that writes nothing is re-run once in that case
only; every other failure, and a second abort, fails the test. Runs that write a run folder (lm-distill
under torchrun) are not retried: a partial first attempt would change what the second one does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

GLOO_ABORT = "terminate called without an active exception"


def _gloo_abort(result: subprocess.CompletedProcess) -> bool:
    """Failed by gloo's C++ abort alone: the abort message, and no Python traceback but the launcher's own
    (torchrun reports a dead rank with one, ending in ChildFailedError)."""
    output = result.stdout + result.stderr
    launcher_tracebacks = 1 if "ChildFailedError" in output else 0
    return (result.returncode != 0 and GLOO_ABORT in output
            and output.count("Traceback (most recent call last)") <= launcher_tracebacks)


def run_stateless_script(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, re-run once after a gloo C++ abort."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if _gloo_abort(result):
        result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    return result
