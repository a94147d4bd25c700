"""DDP on the CPU (gloo) through torchrun: 2 processes == 1 process, resume under DDP, failing ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from image_helpers import tiny_config

from locakd.engine.io import load_checkpoint, save_config
from locakd.engine.logging import read_metrics
from locakd.image.trainer import distill

EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd, args, *, env=None, timeout=180, nproc=2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "locakd.cli.main",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _cfg(mnist_root, out, teacher_run, *, batch_size, epochs):
    # an MLP student: no BatchNorm, so per-rank batch statistics cannot break the equivalence;
    # input noise on: each sample's draw depends on (seed, epoch, sample) only, not on the rank split
    return tiny_config(
        mnist_root,
        out,
        student="mnist1d_mlp_32",
        teacher="mnist1d_cnn_16",
        checkpoint=teacher_run,
        method="kd+loca",
        epochs=epochs,
        batch_size=batch_size,
        optim={"milestones": [1]},
        data={"mnist1d_noise_std": 0.3},
    )


def test_two_processes_match_one_process_and_resume(tmp_path, mnist_root, teacher_run):
    # One process, global batch 32, two epochs.
    single = tmp_path / "single"
    distill(_cfg(mnist_root, single, teacher_run, batch_size=32, epochs=2))

    # Two processes x 16 = the same global batch: one epoch, then resumed (under DDP) to two.
    ddp = tmp_path / "ddp"
    cfg_path = tmp_path / "ddp.yaml"
    save_config(_cfg(mnist_root, ddp, teacher_run, batch_size=16, epochs=1), cfg_path)
    first = _torchrun(tmp_path, ["distill", str(cfg_path)])
    assert first.returncode == 0, first.stdout + first.stderr
    assert load_checkpoint(ddp / "last.pt")["epoch"] == 1
    second = _torchrun(tmp_path, ["distill", str(cfg_path), "run.epochs=2", "--resume"])
    assert second.returncode == 0, second.stdout + second.stderr

    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(ddp / "last.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    # Rounding only: each of the 16 SGD steps sums the global batch's gradient in another order (2 x 16
    # vs 32 terms) and rounds the update into w, a few ulps of max|w| per step; 4 ulps x 16 steps bounds
    # their sum (measured on one machine: about 1/4 ulp per step).
    steps = 2 * math.ceil(240 / 32)  # 2 epochs of 240 training samples in global batches of 32
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=4 * steps * EPS32 * float(value.abs().max()))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, ddp))
    assert sb["world_size"] == 2 and sb["global_batch_size"] == 32
    assert sb["teacher_top1"] == sa["teacher_top1"]  # sharded evaluation counts every test sample once
    assert sb["misinstruction_rate"] == pytest.approx(sa["misinstruction_rate"])
    assert abs(sb["last_top1"] - sa["last_top1"]) <= 100 / 60 + 1e-9  # at most one borderline test sample
    ra = [r for r in read_metrics(single / "metrics.jsonl") if r["tag"] == "epoch"]
    rb = [r for r in read_metrics(ddp / "metrics.jsonl") if r["tag"] == "epoch"]
    assert [r["step"] for r in rb] == [1, 2]  # rank 0 alone wrote; nothing duplicated by the resume
    for x, y in zip(ra, rb, strict=True):
        # per-batch float32 means of <= 32 terms (<= log2(32) + 3 = 8 ulps each) plus the tiny weight
        # differences above: 16 ulps relative
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=16 * EPS32)
        assert y["lr"] == x["lr"]
    # only one line per epoch and one teacher line: ranks > 0 wrote nothing
    assert len(read_metrics(ddp / "metrics.jsonl")) == 3
    # the one-line JSON summary is printed by rank 0 only
    assert second.stdout.count('"best_top1"') == 1


def test_a_failing_rank_stops_the_whole_run(tmp_path, mnist_root, teacher_run):
    cfg_path = tmp_path / "fail.yaml"
    save_config(_cfg(mnist_root, tmp_path / "run", teacher_run, batch_size=16, epochs=2), cfg_path)
    start = time.monotonic()
    proc = _torchrun(
        tmp_path,
        ["distill", str(cfg_path)],
        env={"LOCAKD_TEST_FAIL_RANK": "1", "LOCAKD_TEST_FAIL_STEP": "2"},
        timeout=150,
    )
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 2" in output
    assert elapsed < 120
    assert not (tmp_path / "run" / "summary.json").exists()
