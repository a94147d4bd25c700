"""Deterministic synthetic teachers for the cache tests, and a writer entry point for subprocesses.

``python cache_helpers.py DIR RANK WORLD [SLEEP]`` writes this rank's shards of the synthetic cache
(sleeping SLEEP seconds after each shard, so a test can kill it mid-capture).
"""

from __future__ import annotations

import sys
import time

import torch

VOCAB, TOP_K, EXAMPLES, PER_SHARD, MAX_LEN = 300, 8, 22, 4, 12
IDENTITY = {"teacher": "synthetic", "tokenizer_hash": "abc123", "data_files": {"train.jsonl": "f00d"},
            "template": "compact", "max_length": MAX_LEN, "max_prompt_length": 4, "teacher_dtype": "float32"}


def example_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zipf-like teacher logits [1, L, V] and aligned labels [1, L] of example ``index`` (prompt = -100)."""
    gen = torch.Generator().manual_seed(1000 + index)
    length = 4 + index % (MAX_LEN - 4)
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    sharpness = torch.rand(length, 1, generator=gen) * 2 + 0.5
    logits = -sharpness * torch.log(ranks) * 2 + torch.randn(length, VOCAB, generator=gen) * 0.3
    logits = logits.gather(1, torch.argsort(torch.rand(length, VOCAB, generator=gen), dim=1))
    labels = torch.randint(0, VOCAB, (length,), generator=gen)
    take_top = torch.rand(length, generator=gen) < 0.5
    labels = torch.where(take_top, logits.argmax(dim=1), labels)
    labels[: 1 + index % 3] = -100
    return logits.unsqueeze(0), labels.unsqueeze(0)


def example_records(index: int, temperature: float = 1.0):
    from locakd.lm.cache import teacher_token_records

    logits, labels = example_batch(index)
    return teacher_token_records(logits, labels, top_k=TOP_K, temperature=temperature)


def make_writer(directory, rank: int = 0, world: int = 1, **over):
    from locakd.lm.cache import TeacherCacheWriter

    kw = dict(identity=IDENTITY, vocab_size=VOCAB, num_examples=EXAMPLES, top_k=TOP_K, temperature=1.0,
              examples_per_shard=PER_SHARD, rank=rank, world_size=world)
    kw.update(over)
    return TeacherCacheWriter(directory, **kw)


def capture(directory, rank: int = 0, world: int = 1, sleep: float = 0.0) -> None:
    from locakd.lm.cache import TokenRecords

    writer = make_writer(directory, rank, world)
    for shard in writer.pending_shards():
        writer.write_shard(shard, TokenRecords.concat([example_records(i) for i in writer.shard_examples(shard)]))
        if sleep:
            time.sleep(sleep)


if __name__ == "__main__":
    torch.set_num_threads(1)
    capture(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
