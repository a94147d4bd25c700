"""The retry of tests/distributed_helpers.py fires on gloo's C++ abort only, never on a failing check."""

import subprocess
import sys

from distributed_helpers import _gloo_abort, run_distributed

LAUNCHER = ('Traceback (most recent call last):\n  File "torch/distributed/elastic/multiprocessing/errors/__init__.py"'
            '\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  traceback : Signal 6 (SIGABRT)')


def _done(code: int, out: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, stdout="", stderr=out)


def test_only_a_bare_gloo_abort_is_retried():
    assert _gloo_abort(_done(1, "rank 1 ok\nterminate called without an active exception\n" + LAUNCHER))
    assert not _gloo_abort(_done(0, "terminate called without an active exception"))  # it passed
    failing_check = "Traceback (most recent call last):\nAssertionError: rank 0 gpt2\n"
    assert not _gloo_abort(_done(1, failing_check + "terminate called without an active exception\n" + LAUNCHER))
    assert not _gloo_abort(_done(1, failing_check + LAUNCHER))
    # a rank killed by SIGABRT after its run finished, the abort message cut from the captured tail
    assert _gloo_abort(_done(1, '{"status": "finished"}\nExtension modules: torch._C\n' + LAUNCHER))


def test_a_failure_that_is_no_abort_runs_once(tmp_path):
    counter = tmp_path / "runs"
    script = f"import pathlib; p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x'); raise SystemExit(3)"
    result = run_distributed([sys.executable, "-c", script])
    assert result.returncode == 3 and counter.read_text() == "x"
    abort = script.replace("raise SystemExit(3)", "import sys; sys.stderr.write('terminate called without an active exception'); raise SystemExit(6)")
    counter.unlink()
    written = tmp_path / "run"
    written.mkdir()
    (written / "summary.json").write_text("{}")
    # the retry removes what the first attempt wrote (the script counts its runs outside that folder)
    assert run_distributed([sys.executable, "-c", abort], clean=[written]).returncode == 6
    assert counter.read_text() == "xx" and not written.exists()
