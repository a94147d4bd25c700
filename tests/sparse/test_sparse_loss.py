"""Sparse (top-k + label + tail bucket) token losses: against the dense loss where they must agree,
against an independent float64 reference everywhere, gradients, dtypes, masks and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_reference import IGNORE, sparse_inputs, sparse_ref

from locakd import DIVERGENCES, InputError, misinstruction_mask, token_distill_loss
from locakd.losses.sparse import (
    sparse_misinstruction_mask,
    sparse_misinstruction_rate,
    sparse_teacher_buckets,
    sparse_token_distill_loss,
)

EPS32 = torch.finfo(torch.float32).eps
LOCA = [None, 0.9]


def _logit_bound(*logits, temperature=1.0):
    """Bound on |log softmax(z / T)|: float32 log-probs carry a few ulps of it (absolute)."""
    finite = [z.detach().double()[torch.isfinite(z.detach().double())] for z in logits]
    return max(2 * float(f.abs().max()) / temperature + math.log(z.shape[-1]) for f, z in zip(finite, logits, strict=True))


def _close32(got, expected, zmax, scale=1.0):
    """float32 vs float64: relative 1e-5 (a few hundred ulps of accumulated sums) plus a few ulps of
    the log-prob magnitude ``zmax`` times the quantity's natural size ``scale``."""
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=scale * (1e-6 + 16 * EPS32 * zmax))


def _case(seed, rows=24, vocab=60, k=6, scale=3.0, label_mix=True):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if label_mix:  # some labels inside the top k (the top itself, a lower entry), some ignored
        top = teacher.topk(k, dim=-1).indices
        labels[:4] = top[:4, 0]
        labels[4:8] = top[4:8, k - 1]
        labels[8:10] = IGNORE
    return teacher, student, labels


def _sparse(student, teacher, labels, k, divergence, temperature=1.0, dtype=torch.float32, **kw):
    ids, top, label_lp, tail = sparse_inputs(teacher, labels, k, temperature, dtype)
    return sparse_token_distill_loss(student, ids, top, labels, label_lp, divergence, tail_logprob=tail,
                                     temperature=temperature, **kw)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", LOCA)
def test_equals_dense_when_teacher_tail_is_proportional_to_students(divergence, loca_alpha):
    """Merging tokens on which p/q is constant loses nothing (f-divergences): exact in float64."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab, k = 20, 50, 5
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = student + 0.7  # tail proportional to the student's ...
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    teacher.scatter_(1, ids, torch.randn(rows, k, generator=gen, dtype=torch.float64) + 12)  # ... stored on top
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[:5] = ids[:5, 1]  # inside the top k
    labels[5:7] = IGNORE
    s_sparse = student.clone().requires_grad_(True)
    s_dense = student.clone().requires_grad_(True)
    got = _sparse(s_sparse, teacher, labels, k, divergence, dtype=torch.float64, loca_alpha=loca_alpha, chunk_size=7)
    expected = token_distill_loss(s_dense, teacher, labels, divergence, loca_alpha=loca_alpha)
    got.backward()
    expected.backward()
    assert got.dtype == torch.float64
    # float64 both ways: a few ulps of the log-prob magnitude (~20) per term.
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d != "reverse_kl"])
@pytest.mark.parametrize("loca_alpha", LOCA)
def test_equals_dense_float32_when_teacher_has_no_mass_outside_topk(divergence, loca_alpha):
    """A teacher whose mass outside the top k is zero: the sparse loss *is* the dense loss.

    (Reverse KL against such a teacher is infinite wherever the student has tail mass, in both.)
    """
    teacher, student, labels = _case(5)
    k = 6
    top_ids = teacher.topk(k, dim=-1).indices
    masked = torch.full_like(teacher, -math.inf).scatter(1, top_ids, teacher.gather(1, top_ids)).float()
    student = student.float()
    ids, top, label_lp, _ = sparse_inputs(masked, labels, k)
    tail = torch.full_like(label_lp, -math.inf)
    s_sparse = student.clone().requires_grad_(True)
    s_dense = student.clone().requires_grad_(True)
    got = sparse_token_distill_loss(s_sparse, ids, top, labels, label_lp, divergence, tail_logprob=tail,
                                    loca_alpha=loca_alpha)
    expected = token_distill_loss(s_dense, masked, labels, divergence, loca_alpha=loca_alpha)
    got.backward()
    expected.backward()
    zmax = _logit_bound(masked, student)
    _close32(got, expected, zmax)
    big = float(s_dense.grad.abs().max())
    _close32(s_sparse.grad, s_dense.grad, zmax, scale=big)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", LOCA)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_reference(divergence, loca_alpha, temperature):
    teacher, student, labels = _case(11)
    k = 6
    student32 = student.float().requires_grad_(True)
    got = _sparse(student32, teacher, labels, k, divergence, temperature, loca_alpha=loca_alpha)
    got.backward()
    student64 = student.float().double().requires_grad_(True)
    expected = sparse_ref(student64, teacher, labels, k, divergence, loca_alpha=loca_alpha, temperature=temperature)
    expected.backward()
    assert got.dtype == torch.float32
    zmax = _logit_bound(teacher, student, temperature=temperature)
    _close32(got, expected, zmax)
    big = max(float(student64.grad.abs().max()), 1.0 / (temperature * labels.numel()))
    _close32(student32.grad, student64.grad, zmax, scale=big)
    # float64 input stays float64 and matches to float64 rounding.
    got64 = _sparse(student.float().double(), teacher, labels, k, divergence, temperature, dtype=torch.float64,
                    loca_alpha=loca_alpha)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_half_precision_student(dtype, divergence):
    teacher, student, labels = _case(17)
    k = 6
    half = student.to(dtype).requires_grad_(True)
    got = _sparse(half, teacher, labels, k, divergence, loca_alpha=0.9)
    got.backward()
    exact = half.detach().double().requires_grad_(True)  # the half values, exactly
    expected = sparse_ref(exact, teacher, labels, k, divergence, loca_alpha=0.9)
    expected.backward()
    assert got.dtype == torch.float32 and half.grad.dtype == dtype
    _close32(got, expected, _logit_bound(teacher, exact))
    # the gradient is rounded to the half dtype once: one half-precision ulp of its size.
    eps = torch.finfo(dtype).eps
    big = float(exact.grad.abs().max())
    torch.testing.assert_close(half.grad.double(), exact.grad, rtol=eps, atol=big * eps + 1e-7)


def test_labels_inside_and_outside_topk_and_loca_scaling_of_the_tail():
    teacher, _, labels = _case(23)
    k = 6
    ids, top, label_lp, tail = sparse_inputs(teacher, labels, k, dtype=torch.float64)
    valid = labels != IGNORE
    plain, outside = sparse_teacher_buckets(ids[valid], top[valid], labels[valid], label_lp[valid], tail[valid])
    calibrated, _ = sparse_teacher_buckets(ids[valid], top[valid], labels[valid], label_lp[valid], tail[valid],
                                           loca_alpha=0.9)
    inside = (ids[valid] == labels[valid, None]).any(1)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(outside, ~inside)
    assert bool(torch.isneginf(plain[inside, k]).all()) and bool(torch.isfinite(plain[~inside, k]).all())
    torch.testing.assert_close(plain.logsumexp(-1), torch.zeros(int(valid.sum()), dtype=torch.float64))
    torch.testing.assert_close(calibrated.logsumexp(-1), torch.zeros(int(valid.sum()), dtype=torch.float64))
    # LoCa moves the tail and every stored non-label entry by the same log s.
    mis = misinstruction_mask(teacher[valid], labels[valid])
    shift = calibrated[:, k + 1] - plain[:, k + 1]
    assert bool((shift[mis] < 0).all()) and bool((shift[~mis] == 0).all())
    not_label = ids[valid] != labels[valid, None]
    torch.testing.assert_close((calibrated[:, :k] - plain[:, :k])[not_label],
                               shift.unsqueeze(1).expand(-1, k)[not_label])


def test_chunks_ignored_rows_normalizer_and_sum():
    teacher, student, labels = _case(29, rows=40)
    k = 6
    labels = labels.reshape(4, 10)
    student = student.float().reshape(4, 10, -1)
    teacher = teacher.reshape(4, 10, -1)
    ids, top, label_lp, tail = sparse_inputs(teacher, labels, k)
    ids[labels == IGNORE] = 10**6  # ignored rows may hold anything
    args = (ids, top, labels, label_lp, "jsd")
    s_one = student.clone().requires_grad_(True)
    s_chunked = student.clone().requires_grad_(True)
    one = sparse_token_distill_loss(s_one, *args, tail_logprob=tail, reduction="sum")
    chunked = sparse_token_distill_loss(s_chunked, *args, tail_logprob=tail, reduction="sum", chunk_size=3)
    one.backward()
    chunked.backward()
    n = int((labels != IGNORE).sum())
    # Blocks only reorder a float32 sum of n positive terms: at most n ulps of the total.
    torch.testing.assert_close(chunked, one, rtol=n * EPS32, atol=0)
    # Rows are independent, but vectorised kernels may round a row differently in another block shape.
    _close32(s_chunked.grad, s_one.grad, _logit_bound(teacher, student), scale=float(s_one.grad.abs().max()))
    assert bool((s_one.grad[labels == IGNORE] == 0).all())
    one = one.detach()
    mean = sparse_token_distill_loss(student, *args, tail_logprob=tail)
    torch.testing.assert_close(mean, one / n)
    assert n == 38  # two ignored rows
    torch.testing.assert_close(sparse_token_distill_loss(student, *args, tail_logprob=tail, normalizer=100.0),
                               one / 100.0)


def test_all_ignored_batch_is_a_zero_that_backpropagates():
    student = torch.randn(2, 3, 20, requires_grad=True)
    labels = torch.full((2, 3), IGNORE)
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    loss = sparse_token_distill_loss(student, ids, torch.zeros(2, 3, 4), labels, torch.zeros(2, 3), "reverse_kl")
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((student.grad == 0).all())


def test_tail_derived_when_not_given():
    teacher, student, labels = _case(31)
    ids, top, label_lp, tail = sparse_inputs(teacher, labels, 6, dtype=torch.float64)
    student = student.clone()
    given = sparse_token_distill_loss(student, ids, top, labels, label_lp, "reverse_kl", tail_logprob=tail)
    derived = sparse_token_distill_loss(student, ids, top, labels, label_lp, "reverse_kl")
    # float64: 1 - (stored mass) loses ~1e-16 absolute on a tail of size >~ 1e-3 here
    assert float(tail.exp().min()) > 1e-3
    torch.testing.assert_close(derived, given, rtol=1e-9, atol=1e-12)


def test_misinstruction_from_topk_equals_dense():
    teacher, _, labels = _case(37, rows=60)
    teacher[12, labels[12]] = teacher[12].max()  # a tie with the top counts as right
    ids, top, label_lp, _ = sparse_inputs(teacher, labels, 6)
    got = sparse_misinstruction_mask(ids, top, labels, label_lp)
    assert torch.equal(got, misinstruction_mask(teacher, labels))
    assert not bool(got[12])
    assert sparse_misinstruction_rate(ids, top, labels, label_lp) == (int(got.sum()), int((labels != IGNORE).sum()))


def test_bad_input_is_named():
    teacher, student, labels = _case(41)
    ids, top, label_lp, tail = sparse_inputs(teacher, labels, 6)
    student = student.float()

    def call(**over):
        kw = dict(student_logits=student, topk_ids=ids, topk_logprobs=top, labels=labels, label_logprob=label_lp,
                  tail_logprob=tail)
        kw.update(over)
        return sparse_token_distill_loss(**kw)

    with pytest.raises(InputError, match="sorted"):
        call(topk_logprobs=top.flip(-1))
    dup = ids.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(InputError, match="repeats"):
        call(topk_ids=dup)
    with pytest.raises(InputError, match="out of range"):
        call(student_logits=student[:, :5])
    with pytest.raises(InputError, match="topk_ids shape"):
        call(topk_ids=ids[:, :3])
    with pytest.raises(InputError, match="label_logprob shape"):
        call(label_logprob=label_lp[:3])
    with pytest.raises(InputError, match="NaN"):
        call(tail_logprob=torch.full_like(tail, float("nan")))
    with pytest.raises(InputError, match="unknown divergence"):
        sparse_token_distill_loss(student, ids, top, labels, label_lp, "kl")
