"""Test-data generators and hypothesis strategies shared by the tests in tests/core.

The random tensors come from a seeded torch.Generator (hypothesis draws the seed and
the parameters), so examples stay fast even at 50k classes and still shrink well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

IGNORE = -100
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps


@dataclass
class Case:
    teacher: torch.Tensor  # [..., C] in ``dtype``
    student: torch.Tensor  # [..., C] in ``dtype``
    labels: torch.Tensor  # [...] int64, some ignore_index, some correct, some ties, most others wrong
    temperature: float
    alpha: float
    dtype: torch.dtype

    @property
    def num_classes(self) -> int:
        return self.teacher.shape[-1]


def make_logits(shape, num_classes, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, num_classes, generator=gen) * scale).to(dtype)


def make_labels(teacher, seed, *, correct=0.3, ties=0.15, ignored=0.1, ignore_index=IGNORE):
    """Labels with a mix of rows: teacher right, gt tied with the top logit, ignored, and random
    (mis-instructed unless the random label happens to be the argmax). Ties are made by copying
    the top logit onto the label's entry, so ``teacher`` is modified in place for those rows."""
    gen = torch.Generator().manual_seed(seed + 1)
    shape, num_classes = teacher.shape[:-1], teacher.shape[-1]
    labels = torch.randint(0, num_classes, shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    top = teacher.float().argmax(dim=-1)
    is_correct = u < correct
    labels = torch.where(is_correct, top, labels)
    is_tie = (u >= correct) & (u < correct + ties) & (labels != top)
    if bool(is_tie.any()):
        top_val = teacher.amax(dim=-1, keepdim=True)
        tie_rows = teacher.gather(-1, labels.unsqueeze(-1))
        tie_rows = torch.where(is_tie.unsqueeze(-1), top_val, tie_rows)
        teacher.scatter_(-1, labels.unsqueeze(-1), tie_rows)
    is_ignored = (u >= correct + ties) & (u < correct + ties + ignored)
    return torch.where(is_ignored, torch.full_like(labels, ignore_index), labels)


def make_case(shape, num_classes, seed, *, scale=3.0, dtype=torch.float32, temperature=1.0, alpha=0.9, **kw):
    teacher = make_logits(shape, num_classes, seed, scale, dtype)
    labels = make_labels(teacher, seed, **kw)
    student = make_logits(shape, num_classes, seed + 7, scale, dtype)
    return Case(teacher, student, labels, temperature, alpha, dtype)


def prob_tol(logits: torch.Tensor, temperature: float) -> float:
    """Absolute tolerance for float32 probabilities of softmax(z / T) against float64.

    log p carries an absolute float32 error of a few ulps of max|z / T|, which is a
    relative error of the same size on every p (<= 1)."""
    zmax = float(logits.double().abs().max()) / temperature
    return 2e-6 + 16 * EPS32 * zmax


# --------------------------------------------------------------------------- strategies
temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0]) | st.floats(0.25, 8.0)
alphas = st.sampled_from([0.5, 0.9, 0.99]) | st.floats(0.01, 0.999)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.1, 1.0, 3.0, 8.0])


@st.composite
def shapes_and_classes(draw, max_rows=64):
    """(leading shape, C): [N, C], [B, T, V] and deeper, C from 2 to 50k (few rows when C is big)."""
    bucket = draw(st.integers(0, 11))  # mostly small C; about one example in 12 has a big C
    if bucket < 6:
        num_classes = draw(st.integers(2, 12))
    elif bucket < 11:
        num_classes = draw(st.integers(13, 300))
    else:
        num_classes = draw(st.sampled_from([1000, 32000, 50000]))
    if num_classes >= 1000:
        max_rows = 3 if num_classes > 1000 else 8
    ndim = draw(st.integers(1, 3))
    shape = []
    budget = max_rows
    for _ in range(ndim):
        d = draw(st.integers(1, max(1, min(budget, 16))))
        shape.append(d)
        budget = max(1, budget // d)
    return tuple(shape), num_classes


def _pick(draw, value, default):
    """``value`` may be None (use ``default`` strategy), a strategy, or a fixed value."""
    if value is None:
        return draw(default)
    if isinstance(value, st.SearchStrategy):
        return draw(value)
    return value


@st.composite
def cases(draw, dtype=None, max_rows=64, temperature=None, alpha=None, scale=None):
    shape, num_classes = draw(shapes_and_classes(max_rows=max_rows))
    return make_case(
        shape,
        num_classes,
        draw(seeds),
        scale=_pick(draw, scale, scales),
        dtype=_pick(draw, dtype, dtypes),
        temperature=_pick(draw, temperature, temperatures),
        alpha=_pick(draw, alpha, alphas),
    )


def max_nontarget(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max over i != gt of values[..., i] (labels must be valid)."""
    masked = values.double().scatter(-1, labels.unsqueeze(-1), -math.inf)
    return masked.amax(dim=-1)


def logit_scale(*logits: torch.Tensor, temperature: float, standardize: bool = False) -> float:
    """Bound on |log softmax(z / T)| over the given logits (after z-scoring when ``standardize``)."""
    out = 0.0
    for z in logits:
        z = z.double()
        if standardize:
            std = z.std(-1, keepdim=True).clamp(min=1e-7)
            # float32 z-scoring loses ~eps * max|z| / std (cancellation in z - mean): count it too
            out = max(out, float((z.abs().amax(-1, keepdim=True) / std).max()))
            z = (z - z.mean(-1, keepdim=True)) / std
        # |log p| <= 2 max|z / T| + log C bounds what float32 log-probs lose (a few ulps of it)
        out = max(out, 2 * float(z.abs().max()) / temperature + math.log(z.shape[-1]))
    return out


def assert_loss_close(got: torch.Tensor, expected: torch.Tensor, zmax: float, scale: float = 1.0):
    """float32 loss vs float64 reference: rtol 1e-5, atol 1e-6 plus a few ulps of the log-prob
    magnitude (the only error source when logits are large), times ``scale`` (e.g. T^2)."""
    assert got.dtype == torch.float32, got.dtype
    atol = scale * (1e-6 + 16 * EPS32 * zmax)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=atol)


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, zmax: float, natural: float = 0.0):
    """Student gradient (in the input dtype) vs the float64 reference gradient.

    ``natural`` is the gradient's natural size (e.g. T / rows for a KD mean): float32 rounding
    of the log-probs leaves errors relative to it even where the true gradient is ~0."""
    expected = expected.detach()
    big = max(float(expected.abs().max()) if expected.numel() else 0.0, natural)
    if got.dtype == torch.float32:
        rtol, atol = 1e-5, big * (1e-6 + 16 * EPS32 * zmax) + 1e-9
    else:  # the gradient is rounded to the half-precision input dtype
        eps = torch.finfo(got.dtype).eps
        rtol, atol = eps, big * eps + 1e-7
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)


def std_floor(*logits: torch.Tensor) -> float:
    """Smallest per-row standard deviation (the z-score's Jacobian scales with its inverse)."""
    return min(float(z.double().std(-1).min()) for z in logits)
