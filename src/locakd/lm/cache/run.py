"""A teacher cache and the LM run it serves: the run's identity, opening a cache for a run, batch targets.

``lm-cache-teacher`` records in each cache what the cached rows depend on (:func:`run_identity` plus the
teacher); ``lm-distill`` with ``model.teacher_cache`` opens the cache with :func:`open_teacher_cache`,
which compares the same identity computed for the run and names the first field that differs, then
asks :func:`teacher_cache_targets` for the sparse teacher of each micro-batch.

Identity fields (what a run is compared on; the teacher is recorded but not compared, the run does
not need it): ``tokenizer_hash`` (vocabulary, merges, special tokens), ``data_files`` (sha256 of
``data.train`` / ``data.valid``), ``data_selection`` (splits, ``max_train_examples``,
``valid_holdout``), ``data_layout``, ``template`` (the prompt strings and the tokenizer's chat
template), ``max_length``, ``max_prompt_length``, ``temperature`` (``method.temperature``: the cache
holds log-probabilities at that temperature), ``vocab_size`` (the softmax's size: the teacher's
output layer, cropped to the student's with ``model.crop_vocab``), ``split`` and, last, a hash of the
tokenised examples themselves, which catches whatever the named fields miss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, DataError
from ..config import LMExperimentConfig
from ..data import EXAMPLE_INDEX, TokenizedDataset, looks_like_hub_name
from .records import IGNORE_INDEX
from .store import MANIFEST, TeacherCache, TeacherCacheError, file_sha256, json_hash, tokenizer_hash

__all__ = [
    "SPLITS",
    "CachedTeacherTargets",
    "IndexedExamples",
    "cache_split_dir",
    "cached_misinstruction",
    "examples_sha256",
    "model_vocab_size",
    "open_teacher_cache",
    "run_identity",
    "teacher_cache_summary",
    "teacher_cache_targets",
    "teacher_identity",
]

SPLITS = ("train", "valid")
"""The cache folder holds one cache per split: ``DIR/train`` and (optionally) ``DIR/valid``."""

# transformers writes these into config.json; they do not change what the model computes
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures_version")


def cache_split_dir(directory: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ConfigError(f"a teacher cache split is one of {SPLITS}, got {split!r}")
    return Path(directory) / split


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def examples_sha256(examples: TokenizedDataset | Sequence[Mapping[str, Sequence[int]]]) -> str:
    """sha256 of tokenised examples (``input_ids`` and ``labels`` of each, in order)."""
    digest = hashlib.sha256()
    for example in examples:
        for key in ("input_ids", "labels"):
            values = np.asarray(example[key], dtype=np.int64)
            digest.update(np.int64(values.shape[0]).tobytes())
            digest.update(values.tobytes())
    return digest.hexdigest()


def _data_file_id(source: str | None) -> str | None:
    if not source:
        return None
    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    if looks_like_hub_name(str(source)):  # contents are covered by the examples' hash
        return f"hub:{source}"
    raise DataError(f"data file not found: {source}")


def _model_config(source: str) -> dict[str, Any]:
    """The model's config.json (or a LoRA adapter's adapter_config.json) as a dict, without its weights."""
    folder = Path(source)
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            try:
                return json.loads((folder / name).read_text())
            except json.JSONDecodeError as err:
                raise DataError(f"{folder / name} is not valid JSON ({err})") from None
    if folder.exists():
        raise DataError(f"{folder} holds no config.json: not a save_pretrained model folder")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except OSError as err:
        raise DataError(f"cannot read the model config of '{source}': {err}") from None


def model_vocab_size(source: str) -> int | None:
    """The output vocabulary size a model's config declares (None when it does not say)."""
    config = _model_config(source)
    for cfg in (config, config.get("text_config") or {}):
        size = cfg.get("vocab_size")
        if isinstance(size, int) and size > 0:
            return size
    return None


def teacher_identity(config: LMExperimentConfig) -> dict[str, Any]:
    """What the cache records about the teacher: name, config hash, dtype, output size (no weights loaded)."""
    source = config.model.teacher
    if not source:
        raise ConfigError("lm-cache-teacher runs model.teacher: set it (a folder or a hub name)")
    model_config = {k: v for k, v in _model_config(source).items() if k not in _VOLATILE_CONFIG_KEYS}
    return {"teacher": str(source), "teacher_config_hash": json_hash(model_config),
            "teacher_dtype": config.model.teacher_dtype, "teacher_vocab_size": model_vocab_size(source)}


def softmax_vocab_size(config: LMExperimentConfig, teacher_vocab: int, student_vocab: int | None) -> int:
    """The vocabulary the teacher's softmax runs over: the teacher's, or the shared one with ``model.crop_vocab``."""
    if config.model.crop_vocab and student_vocab is not None:
        return min(teacher_vocab, student_vocab)
    return teacher_vocab


def run_identity(config: LMExperimentConfig, tokenizer: Any, examples: TokenizedDataset, split: str, *,
                 vocab_size: int | None = None) -> dict[str, Any]:
    """The fields a cache of ``split`` is compared on (see the module docstring); ``vocab_size`` when known."""
    d = config.data
    template = config.prompt_template()
    chat_template = getattr(tokenizer, "chat_template", None)
    identity: dict[str, Any] = {
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data_files": {"train": _data_file_id(d.train), "valid": _data_file_id(d.valid)},
        "data_selection": {"train_split": d.train_split, "valid_split": d.valid_split if d.valid else None,
                           "max_train_examples": d.max_train_examples, "valid_holdout": d.valid_holdout},
        "data_layout": examples.stats.format if isinstance(examples, TokenizedDataset) else None,
        "template": {"with_context": template.with_context, "without_context": template.without_context,
                     "chat_template_sha256": json_hash(chat_template) if chat_template else None},
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
        "temperature": float(config.method.temperature),
        "split": split,
        "examples_sha256": examples_sha256(examples),
    }
    if vocab_size is not None:
        identity["vocab_size"] = int(vocab_size)
    return identity


# --------------------------------------------------------------------------------------------------
# Opening a cache for a run
# --------------------------------------------------------------------------------------------------


def _examples_for(config: LMExperimentConfig, tokenizer: Any, split: str) -> TokenizedDataset:
    from ..build import load_train_valid_records, tokenize

    records = load_train_valid_records(config)
    chosen = records.train if split == "train" else records.valid
    if split == "valid" and not chosen:
        raise ConfigError("the run has no validation records (data.valid / data.valid_holdout)")
    return tokenize(config, chosen, tokenizer)


def open_teacher_cache(config: LMExperimentConfig, tokenizer: Any, *, split: str = "train",
                       examples: TokenizedDataset | None = None,
                       student_vocab_size: int | None = None) -> TeacherCache:
    """Open the cache ``model.teacher_cache`` for this run and check that it was captured from it.

    ``examples``: the run's tokenised examples of ``split`` (tokenised from the config when None);
    the cache's example ``i`` is ``examples[i]``. ``student_vocab_size``: the student's output size,
    to check the cache's vocabulary the way ``lm-distill`` checks a teacher's (equal, or cropped to
    the shared size with ``model.crop_vocab``); the loss then uses ``cache.vocab_size`` logits.

    Raises :class:`~locakd.errors.ConfigError` naming the first identity field where the run
    differs from the cache (tokenizer, data files, template, lengths, temperature, ...), and
    :class:`TeacherCacheError` for a missing, incomplete or corrupt cache.
    """
    source = config.model.teacher_cache
    if not source:
        raise ConfigError("model.teacher_cache is not set: the folder lm-cache-teacher wrote")
    root = Path(source)
    directory = cache_split_dir(root, split)
    if not (directory / MANIFEST).is_file() and (root / MANIFEST).is_file():
        directory = root  # the folder of one split was given
    if not directory.is_dir():
        raise TeacherCacheError(
            f"model.teacher_cache: no {split} cache in {root} (expected {directory}); write one with "
            "`locakd lm-cache-teacher CONFIG cache.dir=...`"
        )
    cache = TeacherCache(directory)
    if examples is None:
        examples = _examples_for(config, tokenizer, split)
    vocab = None
    if student_vocab_size is not None:  # lm-distill's rule (check_vocab): equal sizes, or the shared one
        teacher_vocab = int(cache.identity.get("teacher_vocab_size") or cache.vocab_size)
        vocab = softmax_vocab_size(config, teacher_vocab, int(student_vocab_size)) if config.model.crop_vocab \
            else int(student_vocab_size)
    run = run_identity(config, tokenizer, examples, split, vocab_size=vocab)
    try:
        cache.check_matches(run)
    except TeacherCacheError as err:
        hint = (" (set model.crop_vocab: true if only padded embedding rows differ)"
                if "vocab_size is" in str(err) and not config.model.crop_vocab else "")
        raise ConfigError(f"{err}{hint}; capture a cache for this run with `locakd lm-cache-teacher`") from None
    if cache.num_examples != len(examples):  # covered by the examples' hash; said plainly here
        raise ConfigError(f"the teacher cache {directory} holds {cache.num_examples} examples, the run {len(examples)}")
    return cache


# --------------------------------------------------------------------------------------------------
# Targets of a micro-batch
# --------------------------------------------------------------------------------------------------


@dataclass
class CachedTeacherTargets:
    """The sparse teacher of one micro-batch, aligned with the *shifted* labels.

    ``labels`` ``[B, L - 1]`` are the batch's labels after the next-token shift (``labels[:, 1:]``),
    ``topk_ids`` / ``topk_logprobs`` ``[B, L - 1, k]``, ``label_logprob`` / ``tail_logprob``
    ``[B, L - 1]``: the arguments of :func:`locakd.losses.sparse.sparse_token_distill_loss` for the
    student's shifted logits ``logits[:, :-1]``. Ignored positions hold zeros.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    label_logprob: torch.Tensor
    tail_logprob: torch.Tensor
    labels: torch.Tensor


def teacher_cache_targets(cache: TeacherCache, example_indices: Sequence[int], labels: torch.Tensor, *,
                          ignore_index: int = IGNORE_INDEX) -> CachedTeacherTargets:
    """The cached teacher of a collated micro-batch.

    ``example_indices``: the dataset index of each row of the batch (the positions in the run's
    tokenised examples, which are the cache's); ``labels`` ``[B, L]``: the collated labels as
    :func:`locakd.lm.data.collate_examples` returns them (before the shift; any padding side).
    Tensors come back on ``labels.device``. A row whose response tokens or labels do not fit the
    cached example raises :class:`TeacherCacheError` (the cache was made from other data).

    Usage in a training step (``student_logits`` ``[B, L, V]``)::

        t = teacher_cache_targets(cache, indices, batch["labels"])
        kd_sum = sparse_token_distill_loss(student_logits[:, :-1, :cache.vocab_size], t.topk_ids,
                                           t.topk_logprobs, t.labels, t.label_logprob, "forward_kl",
                                           tail_logprob=t.tail_logprob, loca_alpha=0.9,
                                           temperature=cache.temperature, reduction="sum")
    """
    if labels.dim() != 2:
        raise DataError(f"labels must be [B, L] (a collated micro-batch), got shape {tuple(labels.shape)}")
    shifted = labels[:, 1:]
    targets = cache.batch_targets(list(example_indices), shifted, ignore_index)
    return CachedTeacherTargets(labels=shifted, **targets)


# --------------------------------------------------------------------------------------------------
# Training from a cache: example indices through the data pipeline, the teacher's mis-instruction
# --------------------------------------------------------------------------------------------------


class IndexedExamples:
    """A tokenised dataset whose example ``i`` also holds ``EXAMPLE_INDEX: i`` (its cache row key).

    Samplers, shuffling, DDP sharding and resumed data positions pick *which* examples form a batch;
    each example carries its own position in the (un-shuffled) tokenised dataset, which is the
    cache's example index, so the lookup is right whatever the order. :func:`locakd.lm.data.collate_examples`
    collates the key into a ``[B]`` tensor; no model forward receives it.
    """

    def __init__(self, examples: TokenizedDataset | Sequence[Mapping[str, Any]]) -> None:
        self.examples = examples
        self.stats = getattr(examples, "stats", None)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(i)
        if index < 0:
            index += len(self.examples)
        return {**self.examples[index], EXAMPLE_INDEX: index}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def cached_misinstruction(cache: TeacherCache, examples: TokenizedDataset | Sequence[Mapping[str, Any]], *,
                          max_examples: int | None = None, batch_examples: int = 64) -> dict[str, Any]:
    """The teacher's token-level mis-instruction rate on the first ``max_examples`` of ``examples``, from the cache.

    The same tokens the online rate (:func:`locakd.lm.build.teacher_misinstruction`) counts: every
    response token of those examples, mis-instructed when the label's teacher probability is below the
    top one (a tie counts as right). The cache reads that exactly: a stored value's code is 0 only for an
    exact tie with the row's top, and a label outside the top k is below it. ``examples`` are the run's
    tokenised examples of the cache's split (their labels find the label among the stored ids).
    """
    count = len(examples) if max_examples is None else min(int(max_examples), len(examples))
    if count > cache.num_examples:
        raise ConfigError(f"the teacher cache {cache.directory} holds {cache.num_examples} examples, the run more")
    n_tokens = n_mis = 0
    for start in range(0, count, batch_examples):
        indices = list(range(start, min(start + batch_examples, count)))
        labels = [label for i in indices for label in examples[i]["labels"][1:] if label != IGNORE_INDEX]
        rows = cache.read(indices, labels=torch.tensor(labels, dtype=torch.int64))
        n_mis += int((rows.label_logprob < rows.topk_logprobs[:, 0]).sum())
        n_tokens += len(labels)
    rate = n_mis / max(n_tokens, 1)
    return {"misinstruction_rate": rate, "top1_accuracy": 1.0 - rate, "n_tokens": n_tokens,
            "n_misinstructed": n_mis, "n_examples": count, "measured_on": "teacher cache"}


def teacher_cache_summary(directory: str | None, cache: TeacherCache | None) -> dict[str, Any] | None:
    """What a run's summary.json says about the cache it trained from (None without one)."""
    if cache is None:
        return None
    return {"dir": directory, "top_k": cache.top_k, "num_levels": cache.codec.num_levels,
            "num_tokens": cache.num_tokens, "bytes_per_token": cache.bytes_per_token,
            "teacher": cache.identity.get("teacher")}
