"""Evaluation of instruction-following LMs: generation, ROUGE-L, exact match, teacher mis-instruction.

Scales: :func:`rouge_l` and :func:`exact_match` return fractions in [0, 1];
:func:`evaluate_generation` reports both in PERCENT (0-100), as papers do (e.g. "ROUGE-L 24.5").

The MiniLLM evaluation recipe (field notes) is
``evaluate_generation(..., do_sample=True, temperature=1.0, top_p=1.0, seeds=(10, 20, 30, 40, 50))``:
sampling, 5 seeds, mean ROUGE-L. Greedy decoding (the default) makes every seed identical.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locakd.calibration import misinstruction_mask
from locakd.errors import ConfigError, DataError, InputError
from locakd.lm.data import IGNORE_INDEX, PromptTemplate, encode_prompt, prompt_and_reference
from locakd.lm.fused_head import HeadTap, is_sharded
from locakd.losses.objectives import crop_head, crop_logits, head_misinstructed_count
from locakd.losses.token import shift_for_next_token


def _model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device(default)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    top_k: int = 0,
    max_prompt_length: int = 256,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate a continuation for each prompt with ``model.generate``; return the decoded continuations.

    Prompts are tokenised with :func:`locakd.lm.data.encode_prompt` (the same ids training used, cut from
    the left to ``max_prompt_length`` and, when the model has a position limit, to
    ``max_positions - max_new_tokens``), grouped by length into batches of ``batch_size`` and LEFT-padded,
    so generation continues right after each prompt. The output is cut at the first EOS and decoded
    without special tokens; the prompt is not included. Order matches ``prompts``.

    Sampling (``do_sample=True``) uses ``temperature``, ``top_p`` and ``top_k`` (0 = off; note that
    Hugging Face's own default would be 50). The RNG is seeded with ``seed`` inside a forked RNG state,
    so the global RNG is untouched and a fixed (seed, prompts, batch_size) gives the same outputs.
    The model is put in eval mode and restored afterwards.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; generation needs one to stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = max_prompt_length
    max_pos = _max_positions(model)
    if max_pos is not None:
        limit = min(limit, max_pos - max_new_tokens)
        if limit < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a model "
                              f"with {max_pos} positions")
    encoded = [encode_prompt(tokenizer, p, limit)[0] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise InputError(f"prompt {i} tokenises to nothing; generation needs at least one prompt token")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = _model_device(model)
    results: list[str] = [""] * len(encoded)
    sample_kwargs = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    was_training = model.training
    model.eval()
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attention = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = encoded[i]
                    input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
                    attention[row, width - len(ids):] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **sample_kwargs,
                    **generate_kwargs,
                )
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    tokens = new[row]
                    if eos in tokens:
                        tokens = tokens[:tokens.index(eos)]
                    results[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure in [0, 1] from ``rouge_score`` (as MiniLLM / Super-NaturalInstructions use it).

    The ``rouge_score`` tokenizer lower-cases and keeps only ``[a-z0-9]`` runs, so punctuation and
    case are ignored and non-Latin text scores 0. Identical strings give 1.0; no shared word gives 0.0.
    Two empty strings give 0.0 (rouge_score's convention).
    """
    return float(_scorer(use_stemmer).score(reference, prediction)["rougeL"].fmeasure)


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, case_sensitive: bool = True) -> float:
    """1.0 when the two strings are equal after whitespace normalisation (case-sensitive by default), else 0.0."""
    a, b = normalize_whitespace(prediction), normalize_whitespace(reference)
    if not case_sensitive:
        a, b = a.casefold(), b.casefold()
    return float(a == b)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: PromptTemplate | None = None,
    seeds: Sequence[int] = (0,),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    output_path: str | os.PathLike[str] | None = None,
    case_sensitive: bool = True,
) -> dict[str, Any]:
    """Generate a response for every record once per seed and score it against its reference.

    Prompt and reference come from :func:`locakd.lm.data.prompt_and_reference` (Dolly: the template's
    prompt and ``response``; chat and prompt/completion records: the prompt before the last assistant
    turn / the completion).

    Returns a dict (metrics in PERCENT, 0-100)::

        {"n_examples": N, "seeds": [...], "do_sample": bool,
         "per_seed": [{"seed": s, "rouge_l": .., "exact_match": ..}, ...],
         "rouge_l_mean", "rouge_l_std", "exact_match_mean", "exact_match_std",
         "per_category": {category: {"rouge_l": .., "exact_match": .., "n_examples": ..}}}

    ``*_std`` is the sample standard deviation over seeds (0.0 for a single seed). ``per_category``
    (mean over seeds and examples) is present when records carry a ``category`` field.

    When ``output_path`` is given, one JSON line per (seed, record) is written there with
    ``prompt``, ``reference``, ``output``, ``seed``, ``index``, ``category`` (if any), ``rouge_l`` and
    ``exact_match`` (both in [0, 1]).
    """
    if not records:
        raise DataError("evaluate_generation: no records to evaluate")
    if not seeds:
        raise ConfigError("evaluate_generation: seeds must contain at least one seed")
    template = template or PromptTemplate()
    pairs = [prompt_and_reference(r, tokenizer, template) for r in records]
    prompts, references = [p for p, _ in pairs], [ref for _, ref in pairs]
    categories = [r.get("category") for r in records]
    per_seed: list[dict[str, float]] = []
    by_category: dict[str, list[tuple[float, float]]] = {}
    lines: list[dict[str, Any]] = []
    for seed in seeds:
        outputs = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size,
            max_prompt_length=max_prompt_length,
        )
        rl_sum = em_sum = 0.0
        for i, (out, ref) in enumerate(zip(outputs, references, strict=True)):
            rl = rouge_l(out, ref)
            em = exact_match(out, ref, case_sensitive=case_sensitive)
            rl_sum += rl
            em_sum += em
            if categories[i] is not None:
                by_category.setdefault(str(categories[i]), []).append((rl, em))
            if output_path is not None:
                line = {"seed": seed, "index": i, "prompt": prompts[i], "reference": ref, "output": out,
                        "rouge_l": rl, "exact_match": em}
                if categories[i] is not None:
                    line["category"] = categories[i]
                lines.append(line)
        n = len(records)
        per_seed.append({"seed": seed, "rouge_l": 100.0 * rl_sum / n, "exact_match": 100.0 * em_sum / n})
    rl_mean, rl_std = _mean_std([s["rouge_l"] for s in per_seed])
    em_mean, em_std = _mean_std([s["exact_match"] for s in per_seed])
    result: dict[str, Any] = {
        "n_examples": len(records),
        "seeds": list(seeds),
        "do_sample": do_sample,
        "per_seed": per_seed,
        "rouge_l_mean": rl_mean,
        "rouge_l_std": rl_std,
        "exact_match_mean": em_mean,
        "exact_match_std": em_std,
    }
    if by_category:
        result["per_category"] = {
            cat: {
                "rouge_l": 100.0 * statistics.fmean(v[0] for v in vals),
                "exact_match": 100.0 * statistics.fmean(v[1] for v in vals),
                "n_examples": len(vals) // len(seeds),
            }
            for cat, vals in sorted(by_category.items())
        }
    if output_path is not None:
        path = Path(output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return result


# --------------------------------------------------------------------------------------------------
# Teacher mis-instruction
# --------------------------------------------------------------------------------------------------


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"the model output has no logits tensor (got {type(output).__name__})")
    return logits


def teacher_misinstruction_rate(
    teacher: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    max_batches: int | None = None,
    *,
    fused_lm_head: bool = False,
    chunk_size: int | None = 1024,
) -> dict[str, float | int]:
    """Token-level mis-instruction rate and top-1 accuracy of a teacher over response tokens.

    Each batch is a dict with ``input_ids``, ``labels`` (aligned with ``input_ids``, ``-100`` on prompt
    and padding, as :func:`locakd.lm.data.collate_examples` makes them) and optionally
    ``attention_mask``. The teacher is called as ``teacher(input_ids=..., attention_mask=...)`` and
    may return a tensor, a tuple, or an object with ``.logits``.

    Next-token shift: the logits at position ``t`` predict ``labels[t + 1]``, so the comparison is
    ``logits[:, :-1]`` vs ``labels[:, 1:]`` (:func:`locakd.losses.token.shift_for_next_token`), counting only
    positions whose shifted label is not ``ignore_index``. A position is mis-instructed when the
    teacher's top token is not the label (a tie with the label counts as right, as in the calibration,
    :func:`locakd.calibration.misinstruction_mask`); ``top1_accuracy = 1 - misinstruction_rate``.

    ``vocab_size``: crop the logits to this many entries first (see :func:`locakd.lm.models.check_vocab`).

    ``fused_lm_head``: never build the ``[B, L, V]`` logits; compare the label's logit with the row maximum
    from the teacher's final hidden states and output layer, ``chunk_size`` rows at a time
    (:class:`~locakd.lm.fused_head.HeadTap`, :func:`~locakd.losses.objectives.head_misinstructed_count`).

    Returns ``{"misinstruction_rate", "top1_accuracy", "n_tokens", "n_misinstructed"}`` (rates in [0, 1]).
    """
    was_training = teacher.training
    teacher.eval()
    device = _model_device(teacher)
    n_tokens = 0
    n_mis = 0
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                input_ids = batch["input_ids"].to(device)
                labels = batch["labels"].to(device)
                mask = batch.get("attention_mask")
                kwargs = {"input_ids": input_ids}
                if mask is not None:
                    kwargs["attention_mask"] = mask.to(device)
                if fused_lm_head:
                    with HeadTap(teacher, "teacher", copy_weights=is_sharded(teacher)) as tap:
                        teacher(**kwargs)
                    head = tap.inputs(input_ids)
                    hidden, targets = shift_for_next_token(head.hidden, labels)
                    weight, bias = (head.weight, head.bias) if vocab_size is None else \
                        crop_head(head, vocab_size, "teacher")
                    rows = torch.where(targets == ignore_index, torch.full_like(targets, IGNORE_INDEX), targets)
                    n_mis += int(head_misinstructed_count(hidden, weight, rows, bias, chunk_size))
                else:
                    logits = _logits_of(teacher(**kwargs))
                    if vocab_size is not None:
                        logits = crop_logits(logits, vocab_size)
                    logits, targets = shift_for_next_token(logits, labels)
                    mis = misinstruction_mask(logits, targets, ignore_index=ignore_index)
                    n_mis += int(mis.sum())
                n_tokens += int((targets != ignore_index).sum())
    finally:
        teacher.train(was_training)
    if n_tokens == 0:
        raise DataError("teacher_misinstruction_rate: the batches contain no response tokens (all labels -100)")
    rate = n_mis / n_tokens
    return {"misinstruction_rate": rate, "top1_accuracy": 1.0 - rate, "n_tokens": n_tokens,
            "n_misinstructed": n_mis}
