"""Per response token records of a dense teacher: top-k ids and log-probabilities, the label's
log-probability and the tail mass (what an offline teacher cache stores, before compression)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import InputError

DEFAULT_TOP_K = 128
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------
# Records from dense teacher logits
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenRecords:
    """Per response token records (rows in example order, positions in order within an example).

    ``topk_ids``/``topk_logprobs`` ``[N, k]`` (largest first), ``labels`` ``[N]`` (the label token ids),
    ``label_logprob`` and ``tail_logprob`` ``[N]`` (log of the mass on every token that is neither
    stored nor the label), ``tokens_per_example`` ``[B]``. Log-probabilities are float32 at the
    capture temperature.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    labels: torch.Tensor
    label_logprob: torch.Tensor
    tail_logprob: torch.Tensor
    tokens_per_example: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(parts: Sequence[TokenRecords]) -> TokenRecords:
        if not parts:
            raise InputError("TokenRecords.concat needs at least one part")
        return TokenRecords(*(torch.cat([getattr(p, f) for p in parts]) for f in (
            "topk_ids", "topk_logprobs", "labels", "label_logprob", "tail_logprob", "tokens_per_example")))


def teacher_token_records(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 512,
) -> TokenRecords:
    """Records of every response token of a batch of dense teacher logits.

    ``teacher_logits`` ``[B, L, V]`` and ``labels`` ``[B, L]`` must be *aligned* (the logits at a
    position predict its label: apply :func:`locakd.shift_for_next_token` to causal-LM outputs);
    ``ignore_index`` marks positions that are not cached. The softmax runs in float32 (float64
    stays float64) over ``chunk_rows`` response rows at a time, so the float32 copy of the logits
    exists for one block only.
    """
    if teacher_logits.dim() != 3 or tuple(labels.shape) != tuple(teacher_logits.shape[:2]):
        raise InputError(
            f"teacher_logits must be [B, L, V] and labels [B, L] aligned with them, got "
            f"{tuple(teacher_logits.shape)} and {tuple(labels.shape)}"
        )
    vocab = teacher_logits.shape[-1]
    if not 1 <= top_k <= vocab:
        raise InputError(f"top_k must be in [1, {vocab}] (the vocabulary), got {top_k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InputError(f"temperature must be a finite number > 0, got {temperature}")
    valid = labels != ignore_index
    flat_labels = labels[valid]
    if flat_labels.numel() and (int(flat_labels.min()) < 0 or int(flat_labels.max()) >= vocab):
        raise InputError(f"labels must be token ids in [0, {vocab}) or {ignore_index}")
    rows = teacher_logits[valid]  # [N, V], example order then position order
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "top": [], "label": [], "tail": []}
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk_rows):
            log_p = torch.log_softmax(rows[start:start + chunk_rows].to(dtype) / temperature, dim=-1)
            block_labels = flat_labels[start:start + chunk_rows].unsqueeze(-1)
            top, ids = log_p.topk(top_k, dim=-1)
            parts["ids"].append(ids)
            parts["top"].append(top)
            parts["label"].append(log_p.gather(-1, block_labels).squeeze(-1))
            others = log_p.scatter_(-1, ids, -math.inf).scatter_(-1, block_labels, -math.inf)
            parts["tail"].append(others.logsumexp(dim=-1))
    empty_f = teacher_logits.new_zeros((0,), dtype=torch.float32)

    def cat(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if parts[name]:
            return torch.cat(parts[name]).to(dtype)
        return empty_f.new_zeros(shape, dtype=dtype)

    return TokenRecords(
        topk_ids=cat("ids", (0, top_k), torch.int64),
        topk_logprobs=cat("top", (0, top_k), torch.float32),
        labels=flat_labels.to(torch.int64),
        label_logprob=cat("label", (0,), torch.float32),
        tail_logprob=cat("tail", (0,), torch.float32),
        tokens_per_example=valid.sum(dim=1).to(torch.int64),
    )
