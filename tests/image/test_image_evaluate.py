"""Top-k counting and the DDP-exact evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locakd.data import BatchLoader, TensorImageDataset
from locakd.image.evaluate import evaluate, topk_correct


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 3)).tolist() == [1.0, 2.0, 3.0]
    assert topk_correct(logits, labels, (1, 5)).tolist() == [1.0, 3.0]  # k > C counts everything
    valid = torch.tensor([True, False, True])
    assert topk_correct(logits, labels, (1, 3), valid).tolist() == [1.0, 2.0]


class _Lookup(nn.Module):
    """Returns stored logits for sample ids passed as inputs."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long().view(-1)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_evaluation_counts_each_sample_once(world_size):
    n, classes = 23, 7
    g = torch.Generator().manual_seed(0)
    table = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    model = _Lookup(table)
    data = TensorImageDataset(torch.arange(n).float().unsqueeze(1), labels)
    expected_top1 = 100.0 * float((table.argmax(1) == labels).sum()) / n
    expected_top5 = 100.0 * float(topk_correct(table, labels, (5,))[0]) / n
    expected_loss = float(nn.functional.cross_entropy(table, labels))
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0}
    for rank in range(world_size):  # no process group: each call sees its own shard only
        loader = BatchLoader(data, 4, shuffle=False, rank=rank, world_size=world_size)
        part = evaluate(model, loader, device=torch.device("cpu"), rank=rank, world_size=world_size)
        for key in ("top1", "top5", "loss"):
            totals[key] += part[key] * part["count"]
        totals["count"] += part["count"]
    assert totals["count"] == n
    assert totals["top1"] / n == pytest.approx(expected_top1)
    assert totals["top5"] / n == pytest.approx(expected_top5)
    # float32 per-sample CE (as in F.cross_entropy) summed per shard in float64: the mean of 23 terms
    # differs by a few ulps of the float32 terms, 8 ulps relative
    assert totals["loss"] / n == pytest.approx(expected_loss, rel=8 * torch.finfo(torch.float32).eps)


def test_evaluate_restores_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()
    data = TensorImageDataset(torch.randn(10, 3), torch.randint(0, 4, (10,)))
    stats = model[1].running_mean.clone()
    evaluate(model, BatchLoader(data, 4, shuffle=False), device=torch.device("cpu"))
    assert model.training and torch.equal(model[1].running_mean, stats)
