"""DDP (gloo, CPU) through torchrun: same weights as one process, resume, failing rank stops the run."""

from __future__ import annotations

import json
import math
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
EPS32 = torch.finfo(torch.float32).eps


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
    tokens = one_summary["tokens_trained"] / 4  # response tokens summed into each step's loss
    # a mean over `tokens` float32 terms summed in other groupings: a few ulps x sqrt(tokens), relative
    assert summary["last_train"]["loss"] == pytest.approx(one_summary["last_train"]["loss"],
                                                          rel=16 * EPS32 * math.sqrt(tokens))
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    tolerance = _adam_rounding_tolerance(tmp_path / "one", tokens)
    for name in a:
        excess = (a[name] - b[name]).abs() - tolerance[name]
        assert bool((excess <= 0).all()), (name, float(excess.max()), float(tolerance[name].min()))


def _adam_rounding_tolerance(run_dir, tokens: float) -> dict[str, torch.Tensor]:
    """Per-element bound on how far float32 rounding can move AdamW weights between two batch splits.

    The split changes only the order in which each step's gradient is summed: an error of about
    rho * G (rho = 16 ulps x sqrt(tokens), G = the tensor's gradient scale sqrt(max v)). Adam divides
    the gradient by sqrt(v) + eps, so element i's update moves by <= 2 * lr * rho * G / (sqrt(v_i) + eps)
    per step (more where the true gradient is ~0, e.g. the attention key bias: capped at the 2 * lr a
    normalised update can change by). Summed over the steps' learning rates.
    """
    from transformers import AutoModelForCausalLM

    from locakd.engine.io import load_checkpoint
    from locakd.lm.build import lr_factor, warmup_steps_of

    state = load_checkpoint(run_dir / "last.pt")
    config = from_dict(LMExperimentConfig, state["config"])
    o, steps = config.optim, state["step"]
    lr_sum = sum(o.lr * lr_factor(t, steps, warmup_steps_of(config, steps), o.schedule, o.min_lr_ratio)
                 for t in range(steps))
    rho = 16 * EPS32 * math.sqrt(tokens)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the optimizer's parameter order (locakd.lm.build.make_optimizer): matrices first, then vectors
    ordered = [n for n, p in params if p.ndim >= 2] + [n for n, p in params if p.ndim < 2]
    out = {}
    for index, name in enumerate(ordered):
        adam = state["optimizer"]["state"][index]
        scale = (adam["exp_avg_sq"] / (1 - o.betas[1] ** int(adam["step"]))).sqrt()
        out[name] = 2 * lr_sum * torch.clamp(rho * scale.max() / (scale + o.eps), max=1.0)
    return out


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
