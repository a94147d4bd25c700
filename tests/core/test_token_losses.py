"""Token-level divergences (LM distillation), with and without LoCa, against the float64 reference."""

from __future__ import annotations

import math

import loca_reference as ref
import pytest
import torch
from core_helpers import (
    DTYPES,
    EPS32,
    IGNORE,
    RTOL32,
    assert_grad_close,
    assert_loss_close,
    cases,
    grad_atol,
    logit_scale,
    loss_atol,
    make_case,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import locakd
from locakd import DIVERGENCES, shift_for_next_token, token_distill_loss

PROPERTY = settings(max_examples=150, deadline=None)
NAMED = {
    "forward_kl": locakd.forward_kl_loss,
    "reverse_kl": locakd.reverse_kl_loss,
    "jsd": locakd.jsd_loss,
    "skew_forward_kl": locakd.skew_forward_kl_loss,
    "skew_reverse_kl": locakd.skew_reverse_kl_loss,
    "total_variation": locakd.total_variation_loss,
}


def _run(
    case,
    divergence,
    *,
    loca_alpha=None,
    normalizer=None,
    reduction="mean",
    jsd_beta=0.5,
    skew_lambda=0.1,
    chunk_size=None,
    named=False,
):
    student = case.student.clone().requires_grad_(True)
    kw = dict(
        loca_alpha=loca_alpha,
        temperature=case.temperature,
        normalizer=normalizer,
        jsd_beta=jsd_beta,
        skew_lambda=skew_lambda,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    if named:
        got = NAMED[divergence](student, case.teacher, case.labels, **kw)
    else:
        got = token_distill_loss(student, case.teacher, case.labels, divergence, **kw)
    got.backward()
    student64 = case.student.double().requires_grad_(True)
    expected = ref.token_ref(
        student64,
        case.teacher,
        case.labels,
        divergence,
        loca_alpha,
        case.temperature,
        normalizer,
        IGNORE,
        jsd_beta,
        skew_lambda,
        reduction,
    )
    expected.backward()
    return got.detach(), student.grad, expected.detach(), student64.grad


def _check(case, divergence, **kw):
    # a batch without any valid token is the subject of its own test (see
    # test_micro_batch_with_no_valid_token_gives_zero_loss_that_backpropagates)
    assume(bool((case.labels != IGNORE).any()))
    _compare(case, divergence, **kw)


def _compare(case, divergence, **kw):
    """Library value and student gradient against the float64 reference, within float32 rounding."""
    got, grad, expected, grad64 = _run(case, divergence, **kw)
    zmax = logit_scale(case.student, case.teacher, temperature=case.temperature)
    n_valid = max(int((case.labels != IGNORE).sum()), 1)
    reduction = kw.get("reduction", "mean")
    rows = n_valid if reduction == "sum" else 1
    assert got.shape == ()
    assert_loss_close(got, expected, zmax, scale=rows)
    natural = 2.0 / case.temperature
    if reduction == "mean":
        natural /= kw.get("normalizer") or n_valid
    assert grad.dtype == case.dtype and grad.shape == case.student.shape
    if divergence == "total_variation" and _near_kink(case, kw.get("loca_alpha")):
        return  # sign(p_i - q_i) is decided by rounding there: the gradient is not comparable
    assert_grad_close(grad, grad64, zmax, natural)


def _near_kink(case, loca_alpha) -> bool:
    """True if some valid p_i - q_i is within float32 rounding of 0 (|.| has a kink there)."""
    t = case.temperature
    if loca_alpha is None:
        log_p = ref.log_softmax64(case.teacher, t)
    else:
        log_p = ref.loca_log_target(case.teacher, case.labels, loca_alpha, t)
    diff = (log_p.exp() - ref.softmax64(case.student, t))[case.labels != IGNORE]
    zbound = logit_scale(case.student, case.teacher, temperature=t)
    return bool((diff.abs() <= 64 * EPS32 * zbound).any())


# --------------------------------------------------------------------------- against the reference
@PROPERTY
@given(
    case=cases(scale=None, temperature=st.sampled_from([1.0, 1.0, 0.5, 2.0])),
    divergence=st.sampled_from(DIVERGENCES),
    loca=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    named=st.booleans(),
)
def test_divergence_matches_reference(case, divergence, loca, reduction, named):
    _check(case, divergence, loca_alpha=case.alpha if loca else None, reduction=reduction, named=named)


@settings(max_examples=75, deadline=None)
@given(
    case=cases(scale=st.sampled_from([0.1, 1.0, 3.0])),
    divergence=st.sampled_from(["jsd", "skew_forward_kl", "skew_reverse_kl"]),
    mix=st.floats(0.01, 0.99),
    loca=st.booleans(),
    normalizer=st.none() | st.floats(0.5, 1000.0),
)
def test_mixing_weights_and_normalizer_match_reference(case, divergence, mix, loca, normalizer):
    _check(
        case,
        divergence,
        loca_alpha=case.alpha if loca else None,
        normalizer=normalizer,
        jsd_beta=mix,
        skew_lambda=mix,
    )


def test_explicit_values():
    """Hand-computed p = [0.5, 0.5], q = [0.25, 0.75] at T = 1, one position."""
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    labels = torch.tensor([0])
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    expected = {"forward_kl": fkl, "reverse_kl": rkl, "jsd": jsd, "total_variation": 0.25}
    zmax = logit_scale(student, teacher, temperature=1.0)
    for name, value in expected.items():
        got = float(token_distill_loss(student, teacher, labels, name))
        assert got == pytest.approx(value, abs=loss_atol(zmax)), name


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_skew_and_jsd_limits(divergence):
    """skew KL with lambda -> 0 is the plain KL; JSD is symmetric at beta = 0.5."""
    case = make_case((3, 4), 9, seed=31, scale=1.0)
    kw = dict(temperature=1.0)
    lam = 1e-7
    zmax = logit_scale(case.student, case.teacher, temperature=1.0)
    rounding_tol = 2 * loss_atol(zmax)  # two float32 computations
    p, q = ref.softmax64(case.teacher), ref.softmax64(case.student)
    valid = case.labels != IGNORE
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        plain = "forward_kl" if divergence == "skew_forward_kl" else "reverse_kl"
        a = token_distill_loss(case.student, case.teacher, case.labels, divergence, skew_lambda=lam, **kw)
        b = token_distill_loss(case.student, case.teacher, case.labels, plain, **kw)
        # the math moves the value by lam * |d KL(x || lam x + (1 - lam) y) / d lam| at 0, which is
        # lam * |1 - sum x^2 / y| per row (x, y = p, q or q, p), plus the rounding
        x, y = (p, q) if plain == "forward_kl" else (q, p)
        slope = float((1 - (x * x / y).sum(-1))[valid].abs().max())
        torch.testing.assert_close(a, b, rtol=RTOL32, atol=lam * slope + rounding_tol)
    elif divergence in ("jsd", "total_variation"):
        a = token_distill_loss(case.student, case.teacher, case.labels, divergence, **kw)
        b = token_distill_loss(case.teacher, case.student, case.labels, divergence, **kw)
        torch.testing.assert_close(a, b, rtol=RTOL32, atol=rounding_tol)


# --------------------------------------------------------------------------- zero, gradients
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_student_and_teacher_give_zero(divergence, dtype):
    case = make_case((2, 7), 19, seed=3, dtype=dtype)
    student = case.teacher.clone().requires_grad_(True)
    for temperature in (1.0, 2.0):
        loss = token_distill_loss(student, case.teacher, case.labels, divergence, temperature=temperature)
        assert abs(float(loss.detach())) <= 1e-6
        loss.backward()
        assert bool(torch.isfinite(student.grad).all())
        if divergence != "total_variation":  # |p - q| has a kink at 0: its subgradient may be anything
            assert float(student.grad.double().abs().max()) <= 1e-6
        student.grad = None


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", [None, 0.9])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradient_reaches_student_never_teacher(divergence, loca_alpha, chunk_size):
    case = make_case((2, 6), 12, seed=17)
    student = case.student.clone().requires_grad_(True)
    teacher = case.teacher.clone().requires_grad_(True)
    loss = token_distill_loss(
        student, teacher, case.labels, divergence, loca_alpha=loca_alpha, chunk_size=chunk_size
    )
    loss.backward()
    assert teacher.grad is None
    assert bool(torch.isfinite(student.grad).all()) and float(student.grad.abs().sum()) > 0
    ignored = case.labels == IGNORE
    assert bool(ignored.any()) and float(student.grad[ignored].abs().max()) == 0


# --------------------------------------------------------------------------- chunking
@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    vocab=st.sampled_from([2, 5, 37, 300]),
    chunk_size=st.integers(1, 40),
    divergence=st.sampled_from(DIVERGENCES),
    loca=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    ignored_block=st.booleans(),
)
def test_chunked_equals_one_shot_in_value_and_gradient(
    seed, batch, length, vocab, chunk_size, divergence, loca, dtype, ignored_block
):
    case = make_case((batch, length), vocab, seed, dtype=dtype, scale=2.0)
    labels = case.labels.clone()
    if ignored_block:  # a whole chunk of ignored positions (the first chunk_size flat rows)
        flat = labels.view(-1)
        flat[: min(chunk_size, flat.numel())] = IGNORE
    assume(bool((labels != IGNORE).any()))  # the all-ignored batch has its own test
    kw = dict(loca_alpha=0.9 if loca else None, temperature=1.5)
    s1 = case.student.clone().requires_grad_(True)
    one_shot = token_distill_loss(s1, case.teacher, labels, divergence, **kw)
    one_shot.backward()
    s2 = case.student.clone().requires_grad_(True)
    chunked = token_distill_loss(s2, case.teacher, labels, divergence, chunk_size=chunk_size, **kw)
    chunked.backward()
    # two float32 computations of the same rows: twice the rounding of each
    zmax = logit_scale(case.student, case.teacher, temperature=1.5)
    torch.testing.assert_close(chunked, one_shot, rtol=RTOL32, atol=2 * loss_atol(zmax))
    assert s2.grad.dtype == dtype
    natural = 2.0 / (1.5 * int((labels != IGNORE).sum()))  # |dL/dz| <= 2 / (T * valid rows)
    atol = 2 * grad_atol(zmax, natural)
    rtol = RTOL32
    if dtype != torch.float32:
        # each side rounds its gradient to the input dtype (the chunked one possibly before the
        # upstream 1 / normalizer scaling): one ulp of the dtype, or the subnormal spacing
        info = torch.finfo(dtype)
        rtol, atol = rtol + info.eps, atol + natural * info.eps + info.tiny * info.eps
    torch.testing.assert_close(s2.grad.float(), s1.grad.float(), rtol=rtol, atol=atol)


def test_chunked_with_all_ignored_chunks_and_upstream_gradient_scale():
    """A chunk with no valid token contributes nothing; the backward honours the upstream grad."""
    case = make_case((4, 5), 23, seed=1)
    labels = case.labels.clone()
    labels[0] = IGNORE  # first 5 flat rows
    labels[2] = IGNORE
    s1 = case.student.clone().requires_grad_(True)
    (3.0 * token_distill_loss(s1, case.teacher, labels, loca_alpha=0.9)).backward()
    s2 = case.student.clone().requires_grad_(True)
    (3.0 * token_distill_loss(s2, case.teacher, labels, loca_alpha=0.9, chunk_size=5)).backward()
    # two float32 computations; entries at most 3 * 2 / valid rows in size (T = 1)
    zmax = logit_scale(case.student, case.teacher, temperature=1.0)
    natural = 6.0 / int((labels != IGNORE).sum())
    torch.testing.assert_close(s2.grad, s1.grad, rtol=RTOL32, atol=2 * grad_atol(zmax, natural))
    assert float(s2.grad[0].abs().max()) == 0 and float(s2.grad[2].abs().max()) == 0


# --------------------------------------------------------------------------- normalizer, ignore_index
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_micro_batches_with_global_normalizer_sum_to_the_whole_batch(divergence, chunk_size):
    case = make_case((5, 6), 29, seed=41, temperature=1.0)
    total_valid = int((case.labels != IGNORE).sum())
    s = case.student.clone().requires_grad_(True)
    whole = token_distill_loss(s, case.teacher, case.labels, divergence, loca_alpha=0.9)
    whole.backward()
    grad_whole = s.grad.clone()
    s.grad = None
    total = 0.0
    for sl in (slice(0, 2), slice(2, 5)):  # micro-batches with different valid counts
        part = token_distill_loss(
            s[sl],
            case.teacher[sl],
            case.labels[sl],
            divergence,
            loca_alpha=0.9,
            normalizer=total_valid,
            chunk_size=chunk_size,
        )
        part.backward()
        total = total + part.detach()
    # two float32 computations of the same rows: twice the rounding of each; the gradient's
    # entries are at most 2 / (T * total_valid) in size (T = 1)
    zmax = logit_scale(case.student, case.teacher, temperature=1.0)
    torch.testing.assert_close(total, whole.detach(), rtol=RTOL32, atol=2 * loss_atol(zmax))
    torch.testing.assert_close(s.grad, grad_whole, rtol=RTOL32, atol=2 * grad_atol(zmax, 2.0 / total_valid))
    # the default normalizer is this call's own valid count (per-micro-batch mean)
    own = token_distill_loss(case.student[:2], case.teacher[:2], case.labels[:2], divergence, loca_alpha=0.9)
    count = int((case.labels[:2] != IGNORE).sum())
    summed = token_distill_loss(
        case.student[:2], case.teacher[:2], case.labels[:2], divergence, loca_alpha=0.9, reduction="sum"
    )
    torch.testing.assert_close(own, summed / count, rtol=RTOL32, atol=2 * loss_atol(zmax))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_ignored_positions_do_not_affect_the_value(divergence, chunk_size):
    case = make_case((3, 7), 15, seed=5)
    ignored = case.labels == IGNORE
    assert bool(ignored.any())
    student2, teacher2 = case.student.clone(), case.teacher.clone()
    student2[ignored] = torch.randn(int(ignored.sum()), 15) * 30
    teacher2[ignored] = torch.randn(int(ignored.sum()), 15) * 30
    kw = dict(loca_alpha=0.9, chunk_size=chunk_size)
    a = token_distill_loss(case.student, case.teacher, case.labels, divergence, **kw)
    s = student2.requires_grad_(True)
    b = token_distill_loss(s, teacher2, case.labels, divergence, **kw)
    # two float32 computations of the same valid rows: twice the rounding of each
    atol = 2 * loss_atol(logit_scale(case.student, case.teacher, temperature=1.0))
    torch.testing.assert_close(a, b.detach(), rtol=RTOL32, atol=atol)
    b.backward()
    assert float(s.grad[ignored].abs().max()) == 0
    # NaN-free garbage in the ignored positions' teacher rows does not leak either
    kept = ~ignored
    torch.testing.assert_close(
        a,
        token_distill_loss(case.student[kept], case.teacher[kept], case.labels[kept], divergence, **kw),
        rtol=RTOL32,
        atol=atol,
    )


# --------------------------------------------------------------------------- alignment
def test_shift_for_next_token_alignment():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, :2] = IGNORE  # prompt
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    assert shifted_logits.shape == (2, 4, 7) and shifted_labels.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            assert torch.equal(shifted_logits[b, t], logits[b, t])  # the logits at t ...
            assert shifted_labels[b, t] == labels[b, t + 1]  # ... predict the token at t + 1
    # the loss over shifted tensors equals an explicit per-position loop
    teacher = torch.randn(2, 5, 7, generator=gen)
    st_, tl_ = shift_for_next_token(logits, labels)[0], shift_for_next_token(teacher, labels)[0]
    got = token_distill_loss(st_, tl_, shifted_labels, loca_alpha=0.9)
    rows = [
        ref.token_ref(
            logits[b, t : t + 1],
            teacher[b, t : t + 1],
            labels[b, t + 1 : t + 2],
            loca_alpha=0.9,
            reduction="sum",
        )
        for b in range(2)
        for t in range(4)
        if labels[b, t + 1] != IGNORE
    ]
    assert_loss_close(got, sum(rows) / len(rows), logit_scale(logits, teacher, temperature=1.0))


def test_shift_for_next_token_on_flat_sequence():
    logits = torch.arange(12.0).reshape(4, 3)
    labels = torch.tensor([5, 6, 7, 8])
    sl, slab = shift_for_next_token(logits, labels)
    assert torch.equal(sl, logits[:3]) and slab.tolist() == [6, 7, 8]


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", [None, 0.9])
def test_logits_of_1e4_give_finite_values_and_gradients(dtype, divergence, loca_alpha):
    gen = torch.Generator().manual_seed(7)
    shape = (2, 6, 24)
    student = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    teacher = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 24, shape[:-1], generator=gen)
    labels[0, :2] = IGNORE
    for temperature in (1.0, 4.0):
        for chunk_size in (None, 5):
            loss = token_distill_loss(
                student,
                teacher,
                labels,
                divergence,
                loca_alpha=loca_alpha,
                temperature=temperature,
                chunk_size=chunk_size,
            )
            assert bool(torch.isfinite(loss)), (temperature, chunk_size)
            loss.backward()
            assert bool(torch.isfinite(student.grad).all()), (temperature, chunk_size)
            student.grad = None


# --------------------------------------------------------------------------- big vocabulary
@settings(max_examples=10, deadline=None)
@given(
    case=cases(dtype=torch.bfloat16, max_rows=3, scale=3.0, temperature=1.0),
    divergence=st.sampled_from(DIVERGENCES),
)
def test_bf16_inputs_match_reference(case, divergence):
    _check(case, divergence, loca_alpha=0.9)


def test_large_vocabulary_chunked_matches_reference():
    """V = 32000 (a LLaMA-size vocabulary), [B, T, V] bfloat16, LoCa, chunked."""
    case = make_case((2, 3), 32000, seed=77, dtype=torch.bfloat16, scale=2.0)
    assert bool((case.labels != IGNORE).any())
    got, grad, expected, grad64 = _run(case, "forward_kl", loca_alpha=0.9, chunk_size=2)
    zmax = logit_scale(case.student, case.teacher, temperature=1.0)
    assert_loss_close(got, expected, zmax)
    assert_grad_close(grad, grad64, zmax, 2.0 / max(int((case.labels != IGNORE).sum()), 1))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", [None, 0.9])
def test_fixed_cases_at_plain_tight_tolerance(divergence, loca_alpha):
    """Ordinary logits ([4, 16, 100], scale 2), fixed seeds: value and gradient within float32 rounding."""
    case = make_case((4, 16), 100, seed=99, scale=2.0, temperature=1.0)
    _compare(case, divergence, loca_alpha=loca_alpha)
