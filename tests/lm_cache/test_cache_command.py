"""``locakd lm-cache-teacher`` end to end on a tiny GPT-2 teacher: the cache against the teacher run
directly, the manifest's identity, a finished cache reported without the teacher, kill -9 and resume,
two processes under torchrun, and opening the cache for a run (mismatches name the field; the
teacher is never needed)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import locakd
from locakd.config import from_dict
from locakd.errors import ConfigError
from locakd.lm.build import tokenize
from locakd.lm.cache import (
    TeacherCache,
    TeacherCacheError,
    file_sha256,
    json_hash,
    open_teacher_cache,
    teacher_cache_targets,
    tokenizer_hash,
    value_levels,
)
from locakd.lm.config import LMExperimentConfig
from locakd.lm.data import make_collate_fn
from locakd.lm.models import load_causal_lm
from locakd.losses.sparse import sparse_token_distill_loss

TIMEOUT_S = 300
# Two float32 forward passes of the same example (other batch padding, logits of the response
# positions only) agree to a few ulps per operation: logits |z| <~ 30, float32 eps 1.2e-7, about
# sqrt(32 * 2) accumulated roundings per logit -> ~3e-5; log-softmax adds as much. 1e-4 nats.
FWD_TOL = 1e-4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _capture_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "locakd.cli.main", "lm-cache-teacher", str(config), *extra]


def _files(cache_dir: Path) -> dict[str, bytes]:
    """Every shard file and manifest of both splits, by relative path."""
    out = {}
    for split in ("train", "valid"):
        for path in sorted((cache_dir / split).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(cache_dir))] = path.read_bytes()
    return out


def _config(cache_run, cache_dir, **sections) -> LMExperimentConfig:
    return from_dict(LMExperimentConfig, cache_run.config(cache_dir, **sections))


@pytest.fixture(scope="module")
def straight(cache_run, tmp_path_factory) -> Path:
    """A capture in one process (a subprocess, single-threaded like the torchrun and kill tests)."""
    root = tmp_path_factory.mktemp("straight")
    config = cache_run.write_config(root / "config.yaml", root / "cache")
    done = subprocess.run(_capture_cmd(config), capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "cache"


def _half_step(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Half the spacing of the quantisation levels around each x (as in test_cache_codec)."""
    inner = levels[1:-1]
    i = np.clip(np.searchsorted(inner, x), 1, len(inner) - 1)
    step = np.maximum(inner[i] - inner[i - 1], inner[np.minimum(i + 1, len(inner) - 1)] - inner[i])
    step = np.where(x < inner[0], inner[0] * 2, step)
    return np.where((x == 0) | np.isinf(x), 0.0, step / 2)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_capture_matches_the_teacher_run_directly(cache_run, tmp_path, monkeypatch):
    from locakd.cli.main import main

    cache_dir = tmp_path / "cache"
    config_path = cache_run.write_config(tmp_path / "config.yaml", cache_dir)
    assert main(["lm-cache-teacher", str(config_path)]) == 0
    config = _config(cache_run, cache_dir)
    tokenizer = cache_run.tokenizer
    examples = tokenize(config, [json.loads(line) for line in Path(cache_run.train).read_text().splitlines()],
                        tokenizer)

    # ---- manifest: the run's identity
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    identity = manifest["identity"]
    teacher_config = {k: v for k, v in json.loads((cache_run.teacher / "config.json").read_text()).items()
                      if k not in ("transformers_version", "_name_or_path", "architectures_version")}
    assert manifest["complete"] and manifest["num_examples"] == len(examples)
    assert identity["teacher"] == str(cache_run.teacher)
    assert identity["teacher_config_hash"] == json_hash(teacher_config)
    assert identity["tokenizer_hash"] == tokenizer_hash(tokenizer)
    assert identity["data_files"] == {"train": file_sha256(cache_run.train), "valid": file_sha256(cache_run.valid)}
    template = config.prompt_template()
    assert identity["template"]["with_context"] == template.with_context
    assert identity["template"]["without_context"] == template.without_context
    assert identity["data_layout"] == examples.stats.format
    assert (identity["max_length"], identity["max_prompt_length"]) == (48, 32)
    assert (identity["top_k"], identity["temperature"], identity["teacher_dtype"]) == (16, 1.0, "float32")
    assert identity["locakd_version"] == locakd.__version__ == manifest["locakd_version"]
    assert identity["split"] == "train" and identity["vocab_size"] == len(tokenizer)
    assert json.loads((cache_dir / "valid" / "manifest.json").read_text())["identity"]["split"] == "valid"
    report = json.loads((cache_dir / "capture.json").read_text())
    assert report["status"] == "complete" and set(report["splits"]) == {"train", "valid"}
    assert (cache_dir / "config.yaml").is_file()

    # ---- the rows against the teacher run directly (full forward, another batching)
    cache = TeacherCache(cache_dir / "train")
    teacher = load_causal_lm(cache_run.teacher, dtype="float32").eval()
    collate = make_collate_fn(tokenizer)
    levels = value_levels(cache.codec.num_levels)
    k = cache.top_k
    n_tokens = mis_direct = near_ties = 0
    for start in range(0, len(examples), 7):
        indices = list(range(start, min(start + 7, len(examples))))
        batch = collate([examples[i] for i in indices])
        got = teacher_cache_targets(cache, indices, batch["labels"])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = got.labels != -100
        lp = torch.log_softmax(logits[:, :-1][valid].double(), dim=-1).numpy()  # direct, [N, V]
        labels = got.labels[valid].numpy()
        ids = got.topk_ids[valid].numpy()
        dec = got.topk_logprobs[valid].double().numpy()
        n_tokens += len(labels)
        # ids: distinct, and each a genuine top-k member (ties at the k-th value within rounding aside)
        assert (np.diff(np.sort(ids, 1), axis=1) > 0).all()
        kth = np.sort(lp, axis=1)[:, -k]
        true_at = np.take_along_axis(lp, ids, 1)
        assert (true_at >= kth[:, None] - FWD_TOL).all()
        # values: the gap below the top within half a level step; the absolute value adds the
        # normaliser's error (the row's largest gap error plus that of log(1 - tail))
        gap = true_at.max(1, keepdims=True) - true_at
        bound = _half_step(gap, levels)
        tail_true = np.log(np.clip(1 - np.exp(true_at).sum(1) - np.where(
            (ids == labels[:, None]).any(1), 0, np.exp(lp[np.arange(len(labels)), labels])), 1e-300, None))
        tail_dec = got.tail_logprob[valid].double().numpy()
        finite = tail_true > -30  # a tail below e^-30 is beyond float32's 1 - sum: compared where meaningful
        assert (np.abs(tail_dec - tail_true)[finite] <= _half_step(-tail_true, levels)[finite] + 1e-3).all()
        stored_err = np.abs(np.log1p(-np.exp(tail_dec)) - np.log1p(-np.exp(tail_true)))
        anchor = bound.max(1) + stored_err + FWD_TOL
        assert (np.abs(dec - true_at) <= bound + anchor[:, None] + FWD_TOL).all()
        label_true = lp[np.arange(len(labels)), labels]
        label_dec = got.label_logprob[valid].double().numpy()
        label_gap = true_at.max(1) - label_true
        assert (np.abs(label_dec - label_true) <= _half_step(label_gap, levels) + anchor + FWD_TOL).all()
        top = lp.max(1)
        mis_direct += int((label_true < top).sum())
        near_ties += int((np.abs(label_true - top) <= FWD_TOL).sum())
    assert cache.num_tokens == n_tokens > 0
    assert abs(cache.misinstruction()["n_misinstructed"] - mis_direct) <= near_ties

    # ---- a finished cache is reported, not redone: the teacher is not even loaded
    before = _files(cache_dir)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a finished cache must not load the teacher")

    monkeypatch.setattr("locakd.lm.cache_command.load_teacher", no_teacher)
    assert main(["lm-cache-teacher", str(config_path)]) == 0
    report = json.loads((cache_dir / "capture.json").read_text())
    assert report["status"] == "already complete" and report["captured_tokens"] == 0
    assert _files(cache_dir) == before
    # another setting of the same folder is refused, naming the field
    from locakd.lm.cache_command import capture_teacher_cache

    with pytest.raises(TeacherCacheError, match="temperature is"):
        capture_teacher_cache(_config(cache_run, cache_dir, method={"temperature": 2.0}))


def test_kill_9_mid_capture_then_rerun_gives_identical_shards(cache_run, straight, tmp_path):
    cache_dir = tmp_path / "cache"
    config = cache_run.write_config(tmp_path / "config.yaml", cache_dir)
    marker = tmp_path / "paused"
    # pause inside the write of the third training shard (data in its temp file, not yet renamed)
    env = {**_env(), "LOCAKD_TEST_PAUSE_IN_WRITE": "shard-00002.safetensors:1", "LOCAKD_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(_capture_cmd(config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the capture never reached the third shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    shards = cache_dir / "train" / "shards"
    assert {p.name for p in shards.glob("shard-*.json")} == {"shard-00000.json", "shard-00001.json"}
    assert list(shards.glob(".shard-00002.safetensors.*.tmp"))  # killed inside the write
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(cache_dir / "train")
    done = subprocess.run(_capture_cmd(config), capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(shards.glob(".*.tmp"))
    assert _files(cache_dir) == _files(straight)  # byte for byte, manifests included


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_under_torchrun_write_the_same_cache(cache_run, straight, tmp_path):
    cache_dir = tmp_path / "cache"
    config = cache_run.write_config(tmp_path / "config.yaml", cache_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "locakd.cli.main", "lm-cache-teacher", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((cache_dir / "capture.json").read_text())
    assert report["processes"] == 2 and report["status"] == "complete"
    assert report["captured_tokens"] == sum(s["num_tokens"] for s in report["splits"].values())
    assert _files(cache_dir) == _files(straight)


def test_missing_settings_are_config_errors(cache_run, tmp_path):
    from locakd.lm.cache_command import capture_teacher_cache

    with pytest.raises(ConfigError, match="cache.dir"):
        capture_teacher_cache(_config(cache_run, None))
    with pytest.raises(ConfigError, match="model.teacher"):
        capture_teacher_cache(_config(cache_run, tmp_path / "c", model={"teacher": None}))
    with pytest.raises(ConfigError, match="cache.top_k"):
        capture_teacher_cache(_config(cache_run, tmp_path / "c", cache={"top_k": 100000}))
    with pytest.raises(ConfigError, match="cache.batch_size"):
        _config(cache_run, tmp_path / "c", cache={"batch_size": 0})


# --------------------------------------------------------------------------------------------------
# A run that reads the cache
# --------------------------------------------------------------------------------------------------


def test_cache_mismatches_name_the_field(cache_run, straight, tmp_path):
    from locakd.lm.fixtures import train_bpe_tokenizer

    tokenizer = cache_run.tokenizer

    config = _config(cache_run, None, model={"teacher_cache": str(straight)})
    assert open_teacher_cache(config, tokenizer).num_examples == json.loads((straight / "train" / "manifest.json").read_text())["num_examples"]
    other_tokenizer = train_bpe_tokenizer([line for line in Path(cache_run.train).read_text().splitlines()], 290)
    with pytest.raises(ConfigError, match="tokenizer_hash is"):
        open_teacher_cache(_config(cache_run, None, model={"teacher_cache": str(straight)}), other_tokenizer)
    records = Path(cache_run.train).read_text().splitlines()
    changed = tmp_path / "train.jsonl"
    first = json.loads(records[0])
    changed.write_text("\n".join([json.dumps({**first, "response": first["response"] + " x"}), *records[1:]]) + "\n")
    for sections, field in [({"data": {"train": str(changed)}}, "data_files"),
                            ({"data": {"template": "alpaca"}}, "template"),
                            ({"data": {"max_length": 40}}, "max_length"),
                            ({"data": {"max_prompt_length": 30}}, "max_prompt_length"),
                            ({"method": {"temperature": 2.0}}, "temperature"),
                            ({"data": {"max_train_examples": 12}}, "data_selection")]:
        base = cache_run.config(None, model={"teacher_cache": str(straight)})
        for name, values in sections.items():
            base[name] = {**base[name], **values}
        with pytest.raises(ConfigError, match=f"{field} is"):
            open_teacher_cache(from_dict(LMExperimentConfig, base), tokenizer)
    # the student's vocabulary: lm-distill's rule (equal, or the shared size with crop_vocab)
    assert open_teacher_cache(config, tokenizer, student_vocab_size=len(tokenizer)).vocab_size == len(tokenizer)
    with pytest.raises(ConfigError, match="vocab_size is .*crop_vocab"):
        open_teacher_cache(config, tokenizer, student_vocab_size=len(tokenizer) + 64)
    cropped = _config(cache_run, None, model={"teacher_cache": str(straight), "crop_vocab": True})
    assert open_teacher_cache(cropped, tokenizer, student_vocab_size=len(tokenizer) + 64).vocab_size == len(tokenizer)
    # the validation cache, and a folder without one
    assert open_teacher_cache(config, tokenizer, split="valid").identity["split"] == "valid"
    with pytest.raises(TeacherCacheError, match="no train cache"):
        open_teacher_cache(_config(cache_run, None, model={"teacher_cache": str(tmp_path)}), tokenizer)


def test_a_run_uses_the_cache_without_its_teacher(cache_run, straight, tmp_path):
    config = _config(cache_run, None, model={"teacher": str(tmp_path / "no-such-teacher"),
                                             "teacher_cache": str(straight)})
    tokenizer = cache_run.tokenizer
    examples = tokenize(config, [json.loads(line) for line in Path(cache_run.train).read_text().splitlines()],
                        tokenizer)
    cache = open_teacher_cache(config, tokenizer, examples=examples, student_vocab_size=len(tokenizer))
    indices = [5, 0, 3]
    batch = make_collate_fn(tokenizer)([examples[i] for i in indices])
    targets = teacher_cache_targets(cache, indices, batch["labels"])
    batch_size, length = batch["labels"].shape
    assert targets.topk_ids.shape == (batch_size, length - 1, cache.top_k)
    assert torch.equal(targets.labels, batch["labels"][:, 1:])
    student = torch.randn(batch_size, length, len(tokenizer), requires_grad=True)
    for divergence, alpha in (("forward_kl", 0.9), ("reverse_kl", None)):
        loss = sparse_token_distill_loss(student[:, :-1], targets.topk_ids, targets.topk_logprobs, targets.labels,
                                         targets.label_logprob, divergence, tail_logprob=targets.tail_logprob,
                                         loca_alpha=alpha, temperature=cache.temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0 and bool(torch.isfinite(grad).all())
    # another example's labels do not fit its cached rows
    with pytest.raises(TeacherCacheError):
        teacher_cache_targets(cache, [6, 1, 4], batch["labels"])
