"""Teacher-cache folders: write/read round trip, manifest, run checks, crashes and resume
(including kill -9 of a writer process), several writer processes, and the loss from a cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import (
    EXAMPLES,
    IDENTITY,
    PER_SHARD,
    TOP_K,
    capture,
    example_batch,
    example_records,
    make_writer,
)

from locakd.lm.cache import FORMAT, TeacherCache, TeacherCacheError, TokenRecords, value_levels
from locakd.losses.sparse import sparse_misinstruction_rate, sparse_token_distill_loss

HELPER = Path(__file__).with_name("cache_helpers.py")


def _shard_hashes(directory: Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_text())["sha256"] for p in sorted((directory / "shards").glob("*.json"))}


def _finalized(directory: Path) -> TeacherCache:
    assert make_writer(directory).finalize()
    return TeacherCache(directory)


def _run_writer(directory: Path, rank: int, world: int, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, str(HELPER), str(directory), str(rank), str(world), str(sleep)], env=env)


def _batch(indices):
    """Right-padded aligned labels [B, L] of the given examples."""
    rows = [example_batch(i)[1][0] for i in indices]
    width = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def test_write_read_round_trip_and_manifest(tmp_path):
    capture(tmp_path)
    cache = _finalized(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["complete"] is True
    assert manifest["identity"] == {**IDENTITY, "top_k": TOP_K, "temperature": 1.0}
    assert manifest["locakd_version"] and manifest["num_shards"] == len(manifest["shards"]) == -(-EXAMPLES // PER_SHARD)
    records = [example_records(i) for i in range(EXAMPLES)]
    assert cache.num_tokens == manifest["num_tokens"] == sum(r.num_tokens for r in records)
    mis = sum(int((r.label_logprob < r.topk_logprobs[:, 0]).sum()) for r in records)
    assert cache.misinstruction()["n_misinstructed"] == mis > 0
    for shard in manifest["shards"]:
        assert shard["sha256"] == json.loads((tmp_path / "shards" / f"shard-{shard['index']:05d}.json").read_text())["sha256"]

    order = [7, 0, 21, 3]
    labels = _batch(order)
    got = cache.batch_targets(order, labels)
    valid = labels != -100
    expected = TokenRecords.concat([records[i] for i in order])
    assert torch.equal(got["topk_ids"][valid].sort(1).values, expected.topk_ids.sort(1).values)  # bit for bit
    stored = (expected.topk_ids == expected.labels[:, None]).any(1)
    # values: within the quantisation steps (the codec test checks the exact bound); the label's
    # value is its stored entry's when stored
    step = float(np.diff(value_levels(128)[1:-1]).max())
    assert float((got["tail_logprob"][valid] - expected.tail_logprob).abs().max()) <= step
    label_err = (got["label_logprob"][valid] - expected.label_logprob).abs()
    assert float(label_err[stored].max()) < 0.2 and bool(torch.isfinite(label_err).all())
    # the sparse losses accept the reader's output as it is, also without labels (stored labels then come
    # from the entries)
    plain = cache.read(order)
    assert bool(torch.isneginf(plain.label_logprob[plain.label_stored]).all())
    assert sparse_misinstruction_rate(plain.topk_ids, plain.topk_logprobs, expected.labels,
                                      plain.label_logprob)[0] == sum(
        int((records[i].label_logprob < records[i].topk_logprobs[:, 0]).sum()) for i in order)


def test_loss_from_the_cache_is_close_to_the_loss_from_exact_records(tmp_path):
    capture(tmp_path)
    cache = _finalized(tmp_path)
    order = list(range(EXAMPLES))
    labels = _batch(order)
    got = cache.batch_targets(order, labels)
    exact = TokenRecords.concat([example_records(i) for i in order])
    valid = labels != -100
    student = torch.randn(*labels.shape, 300, generator=torch.Generator().manual_seed(0)) * 2
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for alpha in (None, 0.9):
            from_cache = sparse_token_distill_loss(
                student, got["topk_ids"], got["topk_logprobs"], labels, got["label_logprob"], divergence,
                tail_logprob=got["tail_logprob"], loca_alpha=alpha)
            full = torch.zeros(*labels.shape, TOP_K, dtype=torch.long)
            full[valid] = exact.topk_ids
            values = torch.zeros(*labels.shape, TOP_K)
            values[valid] = exact.topk_logprobs
            lab, tail = torch.zeros(labels.shape), torch.zeros(labels.shape)
            lab[valid], tail[valid] = exact.label_logprob, exact.tail_logprob
            reference = sparse_token_distill_loss(student, full, values, labels, lab, divergence,
                                                  tail_logprob=tail, loca_alpha=alpha)
            # ~200 tokens of a far-off random student: the quantisation error (measured ~1e-4 relative,
            # see BENCHMARKS) stays well inside 1e-2; a broken codec is off by far more.
            assert abs(float(from_cache) / float(reference) - 1) < 1e-2, (divergence, alpha)


def test_run_mismatch_names_the_field(tmp_path):
    capture(tmp_path)
    cache = _finalized(tmp_path)
    cache.check_matches({**IDENTITY, "temperature": 1.0, "top_k": TOP_K})  # the same run: fine
    for field, value in [("tokenizer_hash", "other"), ("data_files", {"train.jsonl": "beef"}),
                         ("template", "alpaca"), ("max_length", 99), ("max_prompt_length", 5),
                         ("temperature", 2.0), ("top_k", 64)]:
        with pytest.raises(TeacherCacheError, match=f"{field} is"):
            cache.check_matches({field: value})
    with pytest.raises(TeacherCacheError, match="does not record 'chat_template'"):
        cache.check_matches({"chat_template": "x"})
    # the data behind an example differs: counts, or labels, no longer fit
    labels = _batch([1, 2])
    shorter = labels.clone()
    shorter[1, int((shorter[1] != -100).nonzero()[0, 0])] = -100  # one response token less in example 2
    with pytest.raises(TeacherCacheError, match="example 2: the teacher cache holds"):
        cache.batch_targets([1, 2], shorter)
    shuffled = labels.clone()
    valid = shuffled != -100
    shuffled[valid] = (shuffled[valid] + 1) % 300
    with pytest.raises(TeacherCacheError, match="do not match the batch's labels"):
        cache.batch_targets([1, 2], shuffled)


def test_reopening_a_folder_of_another_run_is_an_error(tmp_path):
    make_writer(tmp_path)
    with pytest.raises(TeacherCacheError, match="template is"):
        make_writer(tmp_path, identity={**IDENTITY, "template": "alpaca"})
    with pytest.raises(TeacherCacheError, match="temperature is"):
        make_writer(tmp_path, temperature=2.0)
    with pytest.raises(TeacherCacheError, match="examples_per_shard"):
        make_writer(tmp_path, examples_per_shard=PER_SHARD + 1)


def test_incomplete_or_corrupt_caches_are_refused(tmp_path):
    writer = make_writer(tmp_path)
    shard = writer.pending_shards()[0]
    writer.write_shard(shard, TokenRecords.concat([example_records(i) for i in writer.shard_examples(shard)]))
    assert not writer.finalize()
    with pytest.raises(TeacherCacheError, match="incomplete \\(1 of 6 shards"):
        TeacherCache(tmp_path)
    capture(tmp_path)
    cache = _finalized(tmp_path)
    path = tmp_path / "shards" / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="checksum"):
        cache.read([2 * PER_SHARD])
    with pytest.raises(TeacherCacheError, match="not found"):
        TeacherCache(tmp_path / "nowhere")


def test_a_shard_without_its_commit_record_is_rewritten(tmp_path, monkeypatch):
    """A crash between the shard's rename and its record: the shard is not complete, and resuming rewrites it."""
    import locakd.lm.cache.store as store

    straight = tmp_path / "straight"
    capture(straight)
    crashed = tmp_path / "crashed"
    real = store._write_json

    def crash_on_records(path, value):
        if path.name.startswith("shard-00003"):
            raise KeyboardInterrupt
        real(path, value)

    monkeypatch.setattr(store, "_write_json", crash_on_records)
    with pytest.raises(KeyboardInterrupt):
        capture(crashed)
    monkeypatch.setattr(store, "_write_json", real)
    assert (crashed / "shards" / "shard-00003.safetensors").exists()
    writer = make_writer(crashed)
    assert writer.pending_shards() == [3, 4, 5]
    (crashed / "shards" / ".shard-00004.safetensors.abc.tmp").write_bytes(b"half a shard")
    capture(crashed)  # resume
    assert not list((crashed / "shards").glob(".*.tmp"))
    assert _shard_hashes(crashed) == _shard_hashes(straight)


def test_kill_9_mid_capture_keeps_complete_shards_and_resumes(tmp_path):
    straight = tmp_path / "straight"
    capture(straight)
    killed = tmp_path / "killed"
    proc = _run_writer(killed, 0, 1, sleep=0.5)
    try:
        deadline = time.time() + 120
        while len(list((killed / "shards").glob("shard-*.json"))) < 2:
            assert proc.poll() is None, "the writer ended before it could be killed"
            assert time.time() < deadline, "the writer wrote no shard in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    writer = make_writer(killed)
    done = [s for s in range(writer.num_shards) if writer.is_complete(s)]
    assert 2 <= len(done) < writer.num_shards
    assert all(_shard_hashes(killed)[f"shard-{s:05d}.json"] == _shard_hashes(straight)[f"shard-{s:05d}.json"]
               for s in done)
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(killed)
    capture(killed)
    assert _finalized(killed).num_tokens == _finalized(straight).num_tokens
    assert _shard_hashes(killed) == _shard_hashes(straight)


def test_two_writer_processes_write_disjoint_shards(tmp_path):
    procs = [_run_writer(tmp_path, rank, 2) for rank in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    ranks = {0: make_writer(tmp_path, 0, 2), 1: make_writer(tmp_path, 1, 2)}
    assert ranks[0].pending_shards() == ranks[1].pending_shards() == []
    cache = _finalized(tmp_path)
    order = list(range(EXAMPLES))
    teacher = cache.read(order)
    expected = TokenRecords.concat([example_records(i) for i in order])
    assert teacher.tokens_per_example.tolist() == expected.tokens_per_example.tolist()
    assert torch.equal(teacher.topk_ids.sort(1).values, expected.topk_ids.sort(1).values)
    with pytest.raises(Exception, match="belongs to rank 1"):
        ranks[0].write_shard(1, example_records(4))
