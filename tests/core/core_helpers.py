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
EPS64 = torch.finfo(torch.float64).eps

# --------------------------------------------------------------------------- tolerances
# Every tolerance in the core tests follows from floating-point rounding of the quantities
# compared, never from what one CPU printed (float32 results differ in the last bits between
# Intel and AMD machines: vectorised exp/log/sum kernels round differently).
#
# Model: a float32 chain of a few elementwise ops, an exp/log and a reduction loses at most
# ULPS units in the last place of the largest magnitude it handles; for log-probabilities
# that magnitude is bounded by ``logit_scale`` (2 max|z / T| + log C), and a probability-
# weighted sum (a KL row, a softmax gradient) inherits the same absolute error since the
# weights sum to 1. Independently rounded terms of a sum add like a random walk (sqrt(terms)).
ULPS = 16
RTOL32 = ULPS * EPS32  # relative rounding of one float32 chain (about 1.9e-6)


def rounding(magnitude: float, *, eps: float = EPS32, terms: int = 1) -> float:
    """ULPS ulps (of machine epsilon ``eps``) of ``magnitude``, for a sum of ``terms`` rounded parts."""
    return ULPS * eps * magnitude * math.sqrt(max(terms, 1))


def loss_atol(zmax: float, scale: float = 1.0, *, eps: float = EPS32) -> float:
    """Absolute float32 error of a loss built from log-probs bounded by ``zmax``: ULPS ulps of
    (1 + zmax) per row (probabilities are <= 1, log-probs <= zmax), times ``scale`` (T^2, the
    number of summed rows, the loss weights). ``eps``: float64 computations use EPS64."""
    return scale * rounding(1.0 + zmax, eps=eps)


def grad_atol(zmax: float, natural: float, *, eps: float = EPS32) -> float:
    """Absolute float32 error of a softmax gradient whose entries are at most ``natural`` in size
    (e.g. 2 / (T * rows) for a token-loss mean): the log-prob rounding relative to that size."""
    return natural * rounding(1.0 + zmax, eps=eps)


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

    p = exp(z / T - lse): the shared log-sum-exp carries ULPS ulps of (max|z / T| + log C), a
    relative error on every p <= 1; the entry's own z / T - max loses ULPS ulps of |log p|,
    and p |log p| <= 1/e < 1."""
    zmax = float(logits.double().abs().max()) / temperature + math.log(logits.shape[-1])
    return rounding(1.0 + zmax)


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
    """float32 loss vs float64 reference: :func:`loss_atol` (the log-prob rounding, times
    ``scale``, e.g. T^2) plus one chain's relative rounding of the value itself."""
    assert got.dtype == torch.float32, got.dtype
    torch.testing.assert_close(got.double(), expected.detach(), rtol=RTOL32, atol=loss_atol(zmax, scale))


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, zmax: float, natural: float = 0.0):
    """Student gradient (in the input dtype) vs the float64 reference gradient.

    ``natural`` is the gradient's natural size (e.g. T / rows for a KD mean): float32 rounding
    of the log-probs leaves errors relative to it even where the true gradient is ~0."""
    expected = expected.detach()
    big = max(float(expected.abs().max()) if expected.numel() else 0.0, natural)
    rtol, atol = RTOL32, grad_atol(zmax, big)
    if got.dtype != torch.float32:
        # then rounded once more, to the half-precision input dtype: half an ulp relative, and
        # below the smallest normal number half the subnormal spacing (finfo.tiny * eps)
        info = torch.finfo(got.dtype)
        rtol, atol = rtol + info.eps, atol + big * info.eps + info.tiny * info.eps
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)


def std_floor(*logits: torch.Tensor) -> float:
    """Smallest per-row standard deviation (the z-score's Jacobian scales with its inverse)."""
    return min(float(z.double().std(-1).min()) for z in logits)
