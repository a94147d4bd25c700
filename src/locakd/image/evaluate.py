"""Top-k accuracy, exact under DDP sharding.

The distributed loaders pad each epoch's index list (wrapping around) to a multiple
of the world size, so a few samples would be counted twice; :func:`evaluate`
masks those padded positions out and sums counts over ranks, so the accuracy of
an N-process evaluation equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_reduce_sum
from ..engine.runtime import autocast_context

__all__ = ["evaluate", "topk_correct"]


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of rows whose label is among the top-k logits, for each k (float64 tensor ``[len(ks)]``).

    k larger than the number of classes counts every row as correct.
    """
    num_classes = logits.shape[-1]
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    if valid is not None:
        hits = hits & valid.unsqueeze(-1)
    cumulative = hits.cumsum(dim=-1).clamp(max=1)  # row hit within the first j+1 predictions
    out = [cumulative[:, min(k, num_classes) - 1].sum() for k in ks]
    return torch.stack(out).to(torch.float64)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    precision: str = "float32",
    rank: int = 0,
    world_size: int = 1,
    progress=None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    ``loader`` is a :class:`locakd.data.BatchLoader` / ``FolderLoader`` sharded with
    ``rank`` / ``world_size`` and ``shuffle=False``; counts are summed over ranks (call
    this on every rank). Pass the plain module, not a DDP wrapper. ``progress``
    optionally wraps the iterable (e.g. ``RunLogger.progress``).
    """
    was_training = model.training
    model.eval()
    n_total = len(loader.dataset)  # type: ignore[attr-defined]
    batch_size = loader.batch_size  # type: ignore[attr-defined]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    iterable = progress(loader) if progress is not None else loader
    for b, (images, labels) in enumerate(iterable):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        local = torch.arange(labels.shape[0], device=device) + b * batch_size
        valid = rank + local * world_size < n_total  # positions past n are wrap-around padding
        with autocast_context(device, precision):
            logits = model(images)
        logits = logits.float()
        sums[:2] += topk_correct(logits, labels, (1, 5), valid)
        loss = F.cross_entropy(logits, labels, reduction="none")
        sums[2] += loss[valid].sum().double()
        sums[3] += valid.sum()
    all_reduce_sum(sums)
    model.train(was_training)
    count = max(float(sums[3]), 1.0)
    return {
        "top1": 100.0 * float(sums[0]) / count,
        "top5": 100.0 * float(sums[1]) / count,
        "loss": float(sums[2]) / count,
        "count": int(sums[3]),
    }
