"""benchmarks/bench_losses.py keeps running: its --quick mode on tiny shapes, its memory path, its value check.

Nothing here asserts a speed: only that every row runs (or says why it cannot), that the
variants meant to equal their reference do, and that the outputs have their documented form.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_losses.py"


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_losses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_times_every_row_and_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "losses.json", tmp_path / "losses.md"
    proc = run_script("--quick", "--no-memory", "--threads", "1", "--repeats", "2", "--min-repeats", "1",
                      "--json", str(out_json), "--markdown", str(out_md))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    rows = report["rows"]
    assert {row["group"] for row in rows} == {"kd", "token", "linear"}
    timed = 0
    for row in rows:
        if row["status"] != "ok":  # only a missing peer or API may keep a row from running
            assert row["status"].startswith(("not importable here", "not available in this build")), row
            continue
        result = row["results"]["1"]
        assert result["status"] == "ok", (row["name"], result)
        assert result["n"] >= 1 and math.isfinite(result["ratio_median"]) and result["ratio_median"] > 0
        assert result["value_check"] in ("ok", "not compared (a different loss)"), (row["name"], result)
        timed += 1
    locakd_rows = [r for r in rows if r["name"].startswith(("kd/kd_loss", "kd/dkd_loss", "token/forward_kl"))]
    assert locakd_rows and all(r["status"] == "ok" for r in locakd_rows)
    assert timed >= len(locakd_rows)
    markdown = out_md.read_text()
    assert markdown.startswith("## Loss speed")
    assert "python benchmarks/bench_losses.py --quick" in markdown
    for title in ("### Image KD", "### Token-level divergences", "### Hidden states + lm_head"):
        assert title in markdown
    assert markdown.count("\n| `kd_loss` (plain KD, validation on) |") == 2  # one line per quick kd shape
    rendered = run_script("--render", str(out_json), timeout=120)
    assert rendered.returncode == 0 and rendered.stdout == markdown  # --render re-creates it from the JSON


def test_memory_column_comes_from_fresh_processes(tmp_path):
    out_json = tmp_path / "memory.json"
    proc = run_script("--quick", "--memory-only", "--threads", "1", "--rows", "token/forward_kl-chunk32",
                      "--token-shapes", "256x4096", "--json", str(out_json))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    (row,) = report["rows"]
    (reference,) = report["reference_memory"]
    assert row["results"] == {}  # --memory-only: nothing timed
    for memory in (row["memory"], reference):
        assert memory["status"] == "ok"
        # one float32 [256, 4096] copy is 4 MiB, and the input gradient alone is one: a loss that
        # produced it but showed no growth would mean the peak was not measured
        assert memory["extra_mib"] >= 0.9 * 4.0, memory
        assert memory["peak_mib"] > memory["baseline_mib"] > 0


def test_value_check_flags_a_loss_that_differs_from_its_reference(bench):
    cfg = bench.Config()
    x = bench.make_inputs("kd", (64, 100), cfg)
    T = cfg.temperature
    args = SimpleNamespace(clock="wall", warmup=1, repeats=1, min_repeats=1, row_seconds=0.0)

    def textbook(inputs):
        return bench.textbook_kd(inputs.student, inputs.teacher, T)

    def missing_t_squared(inputs):
        return bench.textbook_kd(inputs.student, inputs.teacher, T) / (T * T)

    def same_loss(inputs):
        import locakd

        return locakd.kd_loss(inputs.student, inputs.teacher, T)

    scale = bench._value_scale("kd", "kd/textbook-kd", cfg)
    assert bench.time_pair(textbook, same_loss, x, args, "equal", scale)["value_check"] == "ok"
    assert bench.time_pair(textbook, missing_t_squared, x, args, "equal", scale)["value_check"] == "MISMATCH"


def test_bad_row_pattern_is_a_clear_error():
    proc = run_script("--quick", "--rows", "no-such-row", timeout=120)
    assert proc.returncode != 0
    assert "matches no row" in proc.stderr
