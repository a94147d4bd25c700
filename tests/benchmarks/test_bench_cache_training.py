"""benchmarks/cache/bench_cache_training.py keeps running: its --smoke mode, every part, on 96 records.

Nothing here asserts a speed or a quality: only that every part runs end to end through the locakd
commands and reports what it measured in its documented form, with the properties that hold whatever
the machine (cache sizes grow with k, the timed teacher is at least the asked multiple of the student,
the cache side really read the cache, the per-seed differences are the differences of the runs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cache" / "bench_cache_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cache_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_measures_every_part(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    parts = ["sizes", "steptime", "quality", "agreement"]
    assert bench.main(["--smoke", "--out", str(out), "--parts", ",".join(parts), "--threads", "1",
                       "--timing-teacher-ratio", "8"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "smoke" and set(results["parts"]) == set(parts)
    assert results["machine"]["cores"] >= 1 and results["machine"]["torch"]

    # sizes: one cache per k, written by lm-cache-teacher; bytes are the shard files' sizes on disk
    rows = results["parts"]["sizes"]["rows"]
    assert [r["k"] for r in rows] == [32, 64, 128]
    for r in rows:
        split = out / "instructions" / "caches" / f"teacher_k{r['k']}" / "train"
        manifest = json.loads((split / "manifest.json").read_text())
        assert r["num_tokens"] == manifest["num_tokens"] > 0
        assert r["shard_bytes"] == bench.shard_bytes(split) > 0
        assert r["bytes_per_token"] == r["shard_bytes"] / r["num_tokens"]
        assert r["bytes_per_token"] >= r["row_bytes"] > 0  # a row per token plus side table, offsets, header
        assert 0.0 <= r["labels_outside_topk"] <= 1.0
        assert r["capture_tokens_per_s"] > 0
    assert rows[0]["bytes_per_token"] < rows[1]["bytes_per_token"] < rows[2]["bytes_per_token"]
    synthetic = [r[f"row_bytes_v{bench.SYNTHETIC_VOCAB}"] for r in rows]
    assert synthetic[0] < synthetic[1] < synthetic[2] and synthetic[2] <= 320  # the codec's 320-byte target

    # step time: the teacher is at least the asked multiple of the student; every pair timed on both paths
    s = results["parts"]["steptime"]
    assert s["param_ratio"] >= 8 and s["teacher_params"] == pytest.approx(s["param_ratio"] * s["student_params"])
    assert s["pairs"] == len(s["ratios"]) == bench.SMOKE["timing_pairs"]
    assert all(r > 0 and math.isfinite(r) for r in s["ratios"])
    assert s["online_ms_median"] > 0 and s["cache_ms_median"] > 0 and s["capture_tokens_per_s"] > 0
    assert s["ratio_p25"] <= s["ratio_median"] <= s["ratio_p75"]

    # agreement: the decomposition is consistent (cache/dense = cache/topk * topk/dense, per batch, so the
    # signed means agree to the spread of the batches) and the losses were finite and non-zero
    a = results["parts"]["agreement"]
    assert a["k"] == 64 and a["batches"] == bench.SMOKE["agreement_batches"]
    table = a["students"]["initialisation (seed 0)"]
    assert set(table) == set(bench.AGREEMENT_METHODS)
    for r in table.values():
        assert r["dense_loss_per_token"] > 0
        for key in ("cache_vs_dense", "topk_vs_dense", "cache_vs_topk", "training_loss_cache_vs_dense"):
            assert math.isfinite(r[key]["mean"]) and r[key]["abs_max"] >= abs(r[key]["mean"])
        # the exact top-k (bucket) divergence never exceeds the dense one (data-processing inequality, per
        # token; LoCa scales the tail bucket like the tokens in it). Tolerance: float32 rounding of the two
        # sums, a few ulps (1.2e-7) of terms as large as the log-probabilities (up to ~10x the divergence
        # here) over ~1e3 tokens (sqrt: ~30): ~1e-4 relative
        assert r["topk_vs_dense"]["mean"] <= 1e-4

    # quality: both sources trained and scored per method and seed; the cache runs read the k = 64 cache and
    # never loaded a teacher; the paired difference is the difference of the two runs' scores
    q = results["parts"]["quality"]
    assert set(q["methods"]) == set(bench.DEFAULT_METHODS) and q["seeds"] == [0]
    cache_dir = out / "instructions" / "caches" / "teacher_k64"
    for method, m in q["methods"].items():
        (run,) = m["runs"]
        for source in ("dense", "cache"):
            assert 0.0 <= run[source]["rouge_l"] <= 100.0 and 0.0 <= run[source]["exact_match"] <= 100.0
            summary = json.loads((bench.student_dir(bench.Task(out, bench.SMOKE), source, method, 0)
                                  / "summary.json").read_text())
            assert summary["status"] == "finished" and summary["method"] == method
            if source == "cache":
                assert summary["teacher_params"] is None and summary["teacher_cache"]["dir"] == str(cache_dir)
            else:
                assert summary["teacher_params"] > 0 and summary.get("teacher_cache") is None
        assert m["rouge_l_diff"][0] == pytest.approx(run["cache"]["rouge_l"] - run["dense"]["rouge_l"])
        assert m["exact_match_diff"][0] == pytest.approx(run["cache"]["exact_match"] - run["dense"]["exact_match"])

    md = (out / "results.md").read_text()
    assert "Bytes per cached token" in md and "Step time" in md and "identical batches" in md
    assert "students from the cache" in md
    assert results["command"] in md
