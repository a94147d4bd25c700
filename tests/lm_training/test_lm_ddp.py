"""DDP (gloo, CPU) through torchrun: same weights as one process, resume, failing rank stops the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from locakd.config import from_dict
from locakd.lm.config import LMExperimentConfig
from locakd.lm.trainer import train_lm

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

TIMEOUT_S = 240


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)


def test_two_processes_match_one_process_and_resume(lm_env, tmp_path):
    # one process: 4 examples per micro-batch x 2 accumulation steps = global batch 8
    one = from_dict(LMExperimentConfig, lm_env.config(
        tmp_path / "one", optim={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 4}))
    train_lm(one)
    # two processes: 2 per micro-batch x 2 accumulation steps x 2 ranks = the same global batch,
    # stopped after 2 steps and resumed (torchrun again)
    cfg = lm_env.write_config(tmp_path / "two.yaml", tmp_path / "two",
                              optim={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 4})
    first = _torchrun(["-m", "locakd.cli.main", "lm-distill", str(cfg), "--stop-after-steps", "2"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["status"] == "stopped"
    second = _torchrun(["-m", "locakd.cli.main", "lm-distill", str(cfg), "--resume"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["step"] == 4
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["tokens_trained"] == one_summary["tokens_trained"]
    assert summary["teacher_misinstruction"] == one_summary["teacher_misinstruction"]
    assert summary["last_train"]["loss"] == pytest.approx(one_summary["last_train"]["loss"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


FAILING_RANK = textwrap.dedent("""
    import os
    import sys

    import locakd.lm.trainer as trainer

    original = trainer.accumulate_gradients
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if os.environ.get("RANK") == "1" and len(calls) == 2:
            raise RuntimeError("injected failure on rank 1")
        return original(*args, **kwargs)

    trainer.accumulate_gradients = failing
    from locakd.cli.main import main

    sys.exit(main(sys.argv[1:]))
""")


def test_a_failing_rank_stops_the_run(lm_env, tmp_path):
    script = tmp_path / "fail_rank.py"
    script.write_text(FAILING_RANK)
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run",
                              optim={"micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 6})
    started = time.time()
    result = _torchrun([str(script), "lm-distill", str(cfg)], tmp_path)  # raises TimeoutExpired if it hangs
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "injected failure on rank 1" in output
    assert time.time() - started < TIMEOUT_S
    assert not (tmp_path / "run" / "final").exists()
