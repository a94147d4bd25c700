"""``locakd lm-cache-teacher``: run the teacher once over the training (and validation) examples and
write its top-k next-token log-probabilities to a cache folder (:mod:`locakd.lm.cache`).

The examples are exactly the ones ``lm-distill`` trains on: the same records, prompt template / chat
layout, lengths and tokenizer (:mod:`locakd.lm.build`), and the teacher is loaded the same way
(``model.teacher`` in ``model.teacher_dtype``, with the tokenizer identity check), its logits cropped
to the shared vocabulary with ``model.crop_vocab``, at temperature ``method.temperature``.

Layout of ``cache.dir``::

    train/     the cache of the training examples (manifest.json + shards/), example i = lm-distill's i
    valid/     the same for the validation examples (cache.valid)
    config.yaml, capture.json   the resolved config and what the last invocation did (rank 0)

Resuming: every shard is written atomically with a commit record, so an interrupted capture (``kill
-9``, a lost node) keeps its finished shards; running the same command again captures the others,
and a finished cache is reported without loading the teacher. Under ``torchrun --nproc_per_node N``
process ``r`` writes the shards ``s`` with ``s % N == r``; rank 0 lists them in the manifests after a
barrier. Shards are byte-identical however the capture was split or interrupted (each shard's
examples are batched the same way: sorted by length, ``cache.batch_size`` at a time).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..engine.distributed import all_reduce_sum, barrier, distributed_session, env_from_environment
from ..engine.io import atomic_write_text, save_config
from ..engine.runtime import resolve_device
from ..errors import ConfigError, DataError
from ..losses.token import shift_for_next_token
from .build import check_positions, load_run_tokenizer, load_teacher, load_train_valid_records, tokenize
from .cache import (
    TeacherCache,
    TeacherCacheWriter,
    TokenRecords,
    cache_split_dir,
    run_identity,
    teacher_identity,
    teacher_token_records,
)
from .cache.run import model_vocab_size, softmax_vocab_size
from .config import LMExperimentConfig, load_lm_config
from .data import TokenizedDataset, make_collate_fn
from .models import output_vocab_size

__all__ = ["capture_teacher_cache", "run_lm_cache_teacher"]

SUMMARY_FILE = "capture.json"


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_lm_cache_teacher(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``locakd lm-cache-teacher CONFIG [key=value ...]``: load the config and capture (see the module docstring)."""
    config = load_lm_config(config_path, overrides)
    return capture_teacher_cache(config)


# --------------------------------------------------------------------------------------------------
# The teacher over a set of examples
# --------------------------------------------------------------------------------------------------


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def teacher_records(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], *, vocab_size: int, top_k: int,
                    temperature: float, device: torch.device) -> TokenRecords:
    """Records of every response token of one collated batch (rows in example order).

    The teacher runs as in ``lm-distill`` (``input_ids``, ``attention_mask``, no autocast); models that
    take ``logits_to_keep`` project only the positions that predict a response token through the output
    layer (the others are never cached).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # what the logits at positions 0 .. L-2 predict
    columns = (targets != -100).any(dim=0).nonzero().squeeze(1)
    kwargs: dict[str, Any] = {}
    first, last = 0, targets.shape[1]
    if columns.numel() and _accepts_logits_to_keep(teacher):
        first, last = int(columns[0]), int(columns[-1]) + 1
        kwargs["logits_to_keep"] = torch.arange(first, last, device=device)
    output = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     use_cache=False, **kwargs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    if "logits_to_keep" in kwargs:
        aligned = targets[:, first:last]
    else:
        logits, aligned = shift_for_next_token(logits, labels.to(logits.device))
    return teacher_token_records(logits[..., :vocab_size], aligned.to(logits.device), top_k=top_k,
                                 temperature=temperature)


def _split_by_example(records: TokenRecords) -> list[TokenRecords]:
    counts = records.tokens_per_example.tolist()
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    out = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out.append(TokenRecords(records.topk_ids[start:stop], records.topk_logprobs[start:stop],
                                records.labels[start:stop], records.label_logprob[start:stop],
                                records.tail_logprob[start:stop], records.tokens_per_example[i:i + 1]))
    return out


def capture_examples(teacher: torch.nn.Module, examples: TokenizedDataset, indices: range, collate, *,
                     vocab_size: int, top_k: int, temperature: float, batch_size: int, device: torch.device,
                     on_batch=None) -> TokenRecords:
    """Records of the examples ``indices`` (one shard), in index order.

    Batches are the shard's examples sorted by length (less padding), ``batch_size`` at a time: a
    function of the shard alone, so the shard is the same whichever process captures it, and when.
    """
    order = sorted(indices, key=lambda i: (len(examples[i]["input_ids"]), i))
    per_example: dict[int, TokenRecords] = {}
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = collate([examples[i] for i in chosen])
        records = teacher_records(teacher, batch, vocab_size=vocab_size, top_k=top_k, temperature=temperature,
                                  device=device)
        per_example.update(zip(chosen, _split_by_example(records), strict=True))
        if on_batch is not None:
            on_batch(records.num_tokens)
    return TokenRecords.concat([per_example[i] for i in indices])


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _response_tokens(example: dict[str, list[int]]) -> int:
    return sum(label != -100 for label in example["labels"][1:])


def capture_teacher_cache(config: LMExperimentConfig) -> dict[str, Any]:
    """Write (or complete) the teacher cache ``cache.dir`` for ``config``; returns the report (rank 0).

    Runs unchanged under ``torchrun`` (processes write disjoint shards; rank 0 finalises). The
    report lists, per split, examples, tokens, bytes per token and the teacher's token-level
    mis-instruction rate (read from the cache, exact), and this invocation's capture throughput.
    """
    c = config.cache
    if not c.dir:
        raise ConfigError("cache.dir is required: the folder to write the teacher cache to")
    teacher_info = teacher_identity(config)  # reads the teacher's config only; ConfigError without model.teacher
    root = Path(c.dir)
    env = env_from_environment()
    device = resolve_device(config.run.device, env.local_rank)
    with distributed_session(device, config.run.dist_timeout_s) as env:
        tokenizer = load_run_tokenizer(config)
        records = load_train_valid_records(config)
        datasets = {"train": tokenize(config, records.train, tokenizer)}
        if c.valid and records.valid:
            datasets["valid"] = tokenize(config, records.valid, tokenizer)
        for split, dataset in datasets.items():
            if len(dataset) == 0:
                raise ConfigError(f"no {split} example survived tokenisation ({dataset.stats.summary()}); "
                                  "raise data.max_length or check the records")

        teacher = None
        teacher_vocab = teacher_info["teacher_vocab_size"]
        if teacher_vocab is None:  # the config does not say (e.g. an adapter folder): ask the model itself
            teacher = load_teacher(config, device, tokenizer)
            teacher_vocab = teacher_info["teacher_vocab_size"] = output_vocab_size(teacher)
        student_vocab = None
        if config.model.crop_vocab and config.model.student:
            student_vocab = model_vocab_size(config.model.student)
        vocab = softmax_vocab_size(config, teacher_vocab, student_vocab)
        if len(tokenizer) > vocab:
            raise DataError(f"the teacher's output layer covers {vocab} tokens but the tokenizer has {len(tokenizer)}")
        if not 1 <= c.top_k <= vocab:
            raise ConfigError(f"cache.top_k must be in [1, {vocab}] (the vocabulary), got {c.top_k}")

        writers: dict[str, TeacherCacheWriter] = {}
        for split, dataset in datasets.items():
            identity = {**run_identity(config, tokenizer, dataset, split, vocab_size=vocab), **teacher_info,
                        "locakd_version": _version()}
            writers[split] = TeacherCacheWriter(
                cache_split_dir(root, split), identity=identity, vocab_size=vocab, num_examples=len(dataset),
                top_k=c.top_k, temperature=config.method.temperature, examples_per_shard=c.examples_per_shard,
                num_levels=c.num_levels, rank=env.rank, world_size=env.world_size)
        pending = {split: writer.pending_shards() for split, writer in writers.items()}
        total_tokens = sum(_response_tokens(datasets[split][i]) for split, shards in pending.items()
                           for s in shards for i in writers[split].shard_examples(s))

        started = time.perf_counter()
        if any(pending.values()):
            if teacher is None:
                teacher = load_teacher(config, device, tokenizer)  # checks the tokenizers first
            check_positions(teacher, config.data.max_length, "teacher")
            if output_vocab_size(teacher) != teacher_vocab:
                raise DataError(f"the teacher's output layer has {output_vocab_size(teacher)} rows, its config says "
                                f"{teacher_vocab}")
            if env.is_main:
                _info(f"lm-cache-teacher: {config.model.teacher} ({config.model.teacher_dtype}) on "
                      + ", ".join(f"{len(datasets[s])} {s} examples" for s in datasets)
                      + f"; top_k {c.top_k}, T = {config.method.temperature}, {env.world_size} process(es)")
            captured = _capture(teacher, tokenizer, datasets, writers, pending, config, device, total_tokens,
                                progress=config.run.progress and env.is_main)
        else:
            captured = 0
        # [tokens captured, shards that were pending] over all processes; the wall time is rank 0's,
        # from the start of the capture to the barrier every process reaches when its shards are written
        totals = all_reduce_sum(torch.tensor([float(captured), float(sum(map(len, pending.values())))],
                                             dtype=torch.float64))
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {}
        if env.is_main:
            already = totals[1] == 0 and all(_is_complete(cache_split_dir(root, s)) for s in writers)
            complete = already or all([writers[s].finalize() for s in writers])
            report = _report(config, root, list(writers), complete, bool(already), int(totals[0]), seconds,
                             env.world_size)
        barrier()
    return report


def _capture(teacher, tokenizer, datasets, writers, pending, config, device, total_tokens: int, *,
             progress: bool) -> int:
    from tqdm.auto import tqdm

    c = config.cache
    collate = make_collate_fn(tokenizer)
    captured = 0
    with tqdm(total=total_tokens, unit="tok", desc="lm-cache-teacher", disable=not progress,
              dynamic_ncols=True) as bar:
        for split, shards in pending.items():
            writer, dataset = writers[split], datasets[split]
            for shard in shards:
                records = capture_examples(
                    teacher, dataset, writer.shard_examples(shard), collate, vocab_size=writer.codec.vocab_size,
                    top_k=c.top_k, temperature=config.method.temperature, batch_size=c.batch_size, device=device,
                    on_batch=bar.update)
                writer.write_shard(shard, records)
                captured += records.num_tokens
    return captured


def _version() -> str:
    from .. import __version__

    return __version__


def _is_complete(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "manifest.json").read_text()).get("complete"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _report(config: LMExperimentConfig, root: Path, splits: list[str], complete: bool, already: bool,
            captured: int, seconds: float, world_size: int) -> dict[str, Any]:
    """Rank 0: what the cache holds (read back from it) and what this invocation did; written to capture.json."""
    report: dict[str, Any] = {
        "cache_dir": str(root),
        "status": "already complete" if already else ("complete" if complete else "incomplete"),
        "teacher": config.model.teacher,
        "teacher_dtype": config.model.teacher_dtype,
        "top_k": config.cache.top_k,
        "num_levels": config.cache.num_levels,
        "temperature": config.method.temperature,
        "processes": world_size,
        "captured_tokens": captured,
        "capture_seconds": round(seconds, 3),
        "tokens_per_s": captured / seconds if captured and seconds > 0 else None,
        "splits": {},
    }
    if complete:
        for split in splits:
            cache = TeacherCache(cache_split_dir(root, split))
            report["splits"][split] = {
                "num_examples": cache.num_examples, "num_tokens": cache.num_tokens,
                "bytes": cache.manifest["bytes"], "bytes_per_token": cache.bytes_per_token,
                "row_bytes": cache.codec.row_bytes, "vocab_size": cache.vocab_size,
                "teacher_misinstruction": cache.misinstruction(),
            }
        train = report["splits"]["train"]
        mis = train["teacher_misinstruction"]
        _info(f"lm-cache-teacher: {root} {'was already complete' if already else 'is complete'}: "
              + ", ".join(f"{s} {v['num_examples']} examples / {v['num_tokens']} tokens"
                          for s, v in report["splits"].items())
              + f", {train['bytes_per_token']:.1f} bytes per token; teacher token-level mis-instruction rate on "
              f"the training responses {100 * mis['misinstruction_rate']:.2f}% ({mis['n_misinstructed']} of "
              f"{mis['n_tokens']})")
        if captured:
            _info(f"lm-cache-teacher: captured {captured} tokens in {seconds:.1f}s "
                  f"({report['tokens_per_s']:.0f} tokens/s, {world_size} process(es))")
    else:
        _info(f"lm-cache-teacher: {root} is incomplete; run the same command again to finish it")
    save_config(config, root / "config.yaml")
    atomic_write_text(root / SUMMARY_FILE, json.dumps(report, indent=2) + "\n")
    return report
