"""kill -9 at random points (and inside checkpoint writes), then --resume: the uninterrupted run, bitwise.

Both pipelines run as real ``locakd`` processes that are killed with SIGKILL:

* inside a write (the ``LOCAKD_TEST_PAUSE_IN_WRITE`` hook of :mod:`locakd.engine.io` pauses after the
  data is in the temporary file, before the rename): e.g. after an epoch's metrics row is written but
  before its checkpoint, or in the middle of ``best.pt`` / the ``best/`` model folder;
* at a random time once the process has set up and begins to train (seeded delays within the time
  the training takes; where that lands depends on the machine's speed).

After each kill the run is continued the way a user would: ``--resume`` when ``last.pt`` exists,
otherwise a fresh start in the same folder. The finished run must equal an uninterrupted one bit for
bit (weights, optimizer state), hold exactly one metrics row (and one TensorBoard scalar) per epoch /
step, and no file left by an interrupted write.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from locakd.config import from_dict, to_dict
from locakd.engine.io import PAUSE_IN_WRITE_ENV, PAUSE_MARKER_ENV, load_checkpoint
from locakd.engine.logging import read_metrics

pytestmark = pytest.mark.slow

VOLATILE = {"time", "epoch_time_s", "tokens_per_s", "wall_time_s", "run_dir"}
TIMEOUT_S = 240


def _one_thread_env() -> dict[str, str]:
    # the uninterrupted reference runs in this process on one thread; so do the killed processes
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_with_kills(tmp_path: Path, command: list[str], run_dir: Path, plans: list) -> list[str]:
    """Run ``command`` (``locakd ...`` args) once per plan, killing it as the plan says, then to the end.

    A plan is ``("write", "NAME:K")`` (kill inside the K-th write of NAME in that process) or
    ``("random", seconds)`` (kill that long after the process printed its first line, i.e. finished
    setting up). Returns what happened, for assertion messages.
    """
    history = []
    for plan in [*plans, None]:
        resume = (run_dir / "last.pt").is_file()
        args = [sys.executable, "-m", "locakd.cli.main", *command, *(["--resume"] if resume else [])]
        env = _one_thread_env()
        marker = tmp_path / f"paused{len(history)}"
        if plan is not None and plan[0] == "write":
            env.update({PAUSE_IN_WRITE_ENV: plan[1], PAUSE_MARKER_ENV: str(marker)})
        log = (tmp_path / f"session{len(history)}.log").open("w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        what = f"{'resume' if resume else 'start'} {plan}"
        try:
            if plan is None:
                assert proc.wait(timeout=TIMEOUT_S) == 0, (history, log.name, Path(log.name).read_text()[-3000:])
            elif plan[0] == "write":
                deadline = time.monotonic() + TIMEOUT_S
                while not marker.exists():
                    assert proc.poll() is None, (what, "ended before the write", Path(log.name).read_text()[-3000:])
                    assert time.monotonic() < deadline, (what, "never reached the write")
                    time.sleep(0.05)
                proc.kill()
                what += " killed inside the write"
            else:
                deadline = time.monotonic() + TIMEOUT_S
                while not Path(log.name).read_text().strip() and proc.poll() is None:
                    assert time.monotonic() < deadline, (what, "printed nothing")
                    time.sleep(0.02)
                try:
                    proc.wait(timeout=plan[1])
                    what += " finished before the kill"
                except subprocess.TimeoutExpired:
                    proc.kill()
                    what += f" killed {plan[1]:.2f}s into training"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
        history.append(what)
    return history


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".old")))


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir / "metrics.jsonl")]


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), (what, key)


# ---------------------------------------------------------------------------------------------- image


def test_image_run_killed_at_random_points_resumes_bitwise(tmp_path):
    pytest.importorskip("mnist1d")
    pytest.importorskip("tensorboard")
    from locakd.image.config import ImageExperimentConfig
    from locakd.image.trainer import train_teacher

    def config(out: Path):
        return from_dict(ImageExperimentConfig, {
            "data": {"name": "mnist1d", "root": str(tmp_path / "mnist1d"), "batch_size": 32,
                     "eval_batch_size": 64, "mnist1d_samples": 300, "mnist1d_noise_std": 0.3},
            "student": {"name": "mnist1d_mlp_32"},
            "method": {"name": "ce", "ce_weight": 1.0},
            "optim": {"lr": 0.05, "milestones": [2]},
            "run": {"epochs": 4, "seed": 0, "device": "cpu", "out_dir": str(out), "progress": False,
                    "tensorboard": True},
        })

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_teacher(config(tmp_path / "straight"))
    finally:
        torch.set_num_threads(before)

    run_dir = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(config(run_dir))))
    rng = random.Random(20260101)
    plans = [
        ("write", "best.pt:1"),  # epoch 1: its metrics row is written, no last.pt yet -> a fresh start
        ("write", "last.pt:2"),  # epoch 2's row is written, its checkpoint is not -> resume after epoch 1
        ("random", rng.uniform(0.0, 1.5)),  # 4 epochs take about 1 s here
        ("random", rng.uniform(0.0, 1.5)),
    ]
    history = _run_with_kills(tmp_path, ["train-teacher", str(cfg_path)], run_dir, plans)

    straight = tmp_path / "straight"
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(run_dir / name)
        _assert_same_tensors(a["model"], b["model"], f"{name} after {history}")
        assert a["epoch"] == b["epoch"] and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for pid, state in a["optimizer"]["state"].items():
            _assert_same_tensors(state, b["optimizer"]["state"][pid], f"{name} optimizer after {history}")
    assert _rows(run_dir) == _rows(straight), history  # one row per epoch, the same values
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    assert _tensorboard_steps(run_dir, "epoch/train_loss") == [1, 2, 3, 4], history
    assert _leftovers(run_dir) == [], history
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, run_dir))
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}


# ---------------------------------------------------------------------------------------------- LM


def test_lm_run_killed_at_random_points_resumes_bitwise(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from safetensors.torch import load_file

    from locakd.lm.config import LMExperimentConfig
    from locakd.lm.data import PromptTemplate
    from locakd.lm.fixtures import make_instruction_suite, train_bpe_tokenizer, write_jsonl
    from locakd.lm.models import create_causal_lm, tiny_gpt2_config
    from locakd.lm.trainer import train_lm

    train, test = make_instruction_suite(48, 8, seed=5)
    template = PromptTemplate.from_config("compact")
    tokenizer = train_bpe_tokenizer([template.format(r) + r["response"] for r in train + test], 300)
    vocab = len(tokenizer)
    student_init = tmp_path / "student_init"  # dropout on: the restored RNG state matters
    tiny_gpt2_config(vocab, n_layer=1, n_embd=32, n_positions=96, dropout=0.1).save_pretrained(student_init)
    tokenizer.save_pretrained(student_init)
    teacher = tmp_path / "teacher"
    create_causal_lm(tiny_gpt2_config(vocab, n_layer=1, n_embd=32, n_positions=96), seed=1).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)  # the tokenizer check (model.check_tokenizer) reads it from there

    def config(out: Path) -> dict:
        return {
            "model": {"student": str(student_init), "init": "scratch", "teacher": str(teacher)},
            "data": {"train": str(write_jsonl(train, tmp_path / "train.jsonl")),
                     "valid": str(write_jsonl(test, tmp_path / "valid.jsonl")),
                     "template": "compact", "max_length": 64, "max_prompt_length": 48},
            "method": {"name": "kd+loca", "chunk_size": 37},
            "optim": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 6, "warmup_steps": 1},
            "run": {"device": "cpu", "out_dir": str(out), "progress": False, "tensorboard": True,
                    "log_every": 2, "eval_every": 3, "save_every": 1},  # checkpoints inside a log window
            "eval": {"max_new_tokens": 4, "do_sample": False, "seeds": [3], "batch_size": 8,
                     "valid_max_examples": 4, "misinstruction_max_examples": 8},
        }

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_lm(from_dict(LMExperimentConfig, config(tmp_path / "straight")))
    finally:
        torch.set_num_threads(before)

    run_dir = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(config(run_dir)))
    rng = random.Random(20260102)
    plans = [
        ("write", "best:1"),  # step 3's validation writes best/; last.pt still holds step 2
        ("write", "last.pt:3"),  # the 3rd checkpoint of the resumed session, after its rows
        ("random", rng.uniform(0.0, 6.0)),  # 6 steps with 3 validations take a few seconds here
    ]
    history = _run_with_kills(tmp_path, ["lm-distill", str(cfg_path)], run_dir, plans)

    straight = tmp_path / "straight"
    for which in ("final", "best"):
        a = load_file(str(straight / which / "model.safetensors"))
        b = load_file(str(run_dir / which / "model.safetensors"))
        _assert_same_tensors(a, b, f"{which}/ after {history}")
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(run_dir / "last.pt")
    for pid, state in a["optimizer"]["state"].items():
        _assert_same_tensors(state, b["optimizer"]["state"][pid], f"optimizer after {history}")
    assert _rows(run_dir) == _rows(straight), history
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if r["tag"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in rows if r["tag"] == "valid"] == [3, 6]
    assert _tensorboard_steps(run_dir, "train/loss") == [2, 4, 6], history
    assert _leftovers(run_dir) == [], history
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, run_dir))
    for summary in (a, b):
        summary["best"].pop("path")
        summary["last_train"].pop("tokens_per_s")
    assert {k: v for k, v in a.items() if k not in VOLATILE | {"final_model"}} == {
        k: v for k, v in b.items() if k not in VOLATILE | {"final_model"}
    }
