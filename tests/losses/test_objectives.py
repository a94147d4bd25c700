"""The LM objective: ((1 - r) * CE_sum + r * divergence_sum) / N after the next-token shift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from locakd.errors import InputError
from locakd.losses.objectives import IGNORE_INDEX, LMObjective, crop_logits, summed_cross_entropy

EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class _Method:
    name: str
    divergence: str | None
    loca: bool


def _batch(seed=0, b=3, length=17, vocab=97):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, length, vocab, generator=g) * 2
    teacher = torch.randn(b, length, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    return student, teacher, labels


def _log_prob_tol(*logits: torch.Tensor) -> float:
    """Absolute float32 error of a per-token log-softmax term: a few ulps of max|z| + log V.

    Each log-probability loses ~2 ulps of (max|z| + log V) (the log-sum-exp); a CE or KL term combines
    two of them with weights summing to 1, and the mean over tokens does not grow it: 8 ulps is a margin.
    """
    zmax = max(float(z.abs().max()) for z in logits)
    return 8 * EPS32 * (zmax + math.log(logits[0].shape[-1]))


@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
def test_objective_matches_a_float64_reference(kd_ratio):
    s, t, labels = _batch()
    shifted = labels[:, 1:]
    valid = shifted != IGNORE_INDEX
    s64, t64, y = s[:, :-1][valid].double(), t[:, :-1][valid].double(), shifted[valid]
    ce = torch.nn.functional.cross_entropy(s64, y, reduction="sum")
    kl = torch.nn.functional.kl_div(s64.log_softmax(-1), t64.log_softmax(-1), log_target=True, reduction="sum")
    n = float(valid.sum())
    objective = LMObjective(spec=_Method("kd", "forward_kl", False), kd_ratio=kd_ratio, chunk_size=None)
    terms = objective(s, labels, t, n)
    assert terms.loss.dtype == torch.float32
    tol = _log_prob_tol(s, t)
    expected = ((1 - kd_ratio) * ce + kd_ratio * kl) / n
    torch.testing.assert_close(terms.loss.double(), expected, rtol=0, atol=tol)
    # the sums carry the per-token error n times
    torch.testing.assert_close(terms.ce_sum.double(), ce, rtol=0, atol=n * tol)
    torch.testing.assert_close(terms.kd_sum.double(), kl, rtol=0, atol=n * tol)


def test_sft_ignores_the_teacher_and_misaligned_labels_are_an_error():
    s, _, labels = _batch(1)
    terms = LMObjective(spec=_Method("sft", None, False), chunk_size=None)(s, labels, None, 10.0)
    assert float(terms.kd_sum) == 0.0 and torch.equal(terms.loss, terms.ce_sum / 10.0)
    with pytest.raises(InputError, match="do not align"):
        LMObjective(spec=_Method("sft", None, False))(s, labels[:, :-1], None, 1.0)


def test_cropped_vocabulary_compares_the_shared_logits():
    s, t, labels = _batch(2, vocab=97)
    labels = torch.where(labels == IGNORE_INDEX, labels, labels % 90)  # labels inside the shared vocabulary
    objective = LMObjective(spec=_Method("kd", "forward_kl", False), kd_ratio=1.0, chunk_size=None, vocab_size=90)
    padded = LMObjective(spec=_Method("kd", "forward_kl", False), kd_ratio=1.0, chunk_size=None)
    assert torch.equal(objective(s, labels, t, 1.0).kd_sum, padded(s[..., :90], labels, t[..., :90], 1.0).kd_sum)
    with pytest.raises(InputError, match="cannot crop"):
        crop_logits(s, 120)


def test_chunked_cross_entropy_same_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = -100
    labels[2, 10:] = -100
    one = summed_cross_entropy(logits, labels, None)
    (g_one,) = torch.autograd.grad(one, logits)
    chunked = summed_cross_entropy(logits, labels, 7)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    # Per-row terms and gradients are computed identically; only the order of the positive sum over
    # <= 51 rows changes: <= log2(51) ~ 6 ulps of the total, inside assert_close's float32 default
    # (rtol 1.3e-6 ~ 11 ulps). The gradients are row-wise softmax - one-hot, unaffected by the blocks.
    torch.testing.assert_close(one, chunked)
    torch.testing.assert_close(g_one, g_chunked, rtol=0, atol=0)
