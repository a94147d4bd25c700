"""kd_loss (Hinton KD, KD+LoCa and the baselines) against the float64 reference."""

from __future__ import annotations

import math

import loca_reference as ref
import pytest
import torch
from core_helpers import (
    DTYPES,
    IGNORE,
    RTOL32,
    assert_grad_close,
    assert_loss_close,
    cases,
    grad_atol,
    logit_scale,
    loss_atol,
    make_case,
    std_floor,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from locakd import TARGET_TRANSFORMS, kd_loss

PROPERTY = settings(max_examples=150, deadline=None)
MODERATE = st.sampled_from([0.1, 1.0, 3.0])


def _run(
    case,
    *,
    transform="none",
    alpha=0.9,
    smoothing=0.1,
    standardize=False,
    calibrate_correct=False,
    calibrate_before_temperature=False,
    reduction="mean",
    normalizer=None,
    labels=True,
    via_alpha=False,
):
    """(library loss, library student grad, reference loss, reference student grad)."""
    labels_ = case.labels if labels else None
    weights = torch.rand(case.labels.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    student = case.student.clone().requires_grad_(True)
    kw = {"target_transform": transform} if not via_alpha else {}
    if transform == "loca":
        kw["loca_alpha"] = alpha
    got = kd_loss(
        student,
        case.teacher,
        case.temperature,
        labels_,
        smoothing=smoothing,
        standardize=standardize,
        calibrate_correct=calibrate_correct,
        calibrate_before_temperature=calibrate_before_temperature,
        reduction=reduction,
        normalizer=normalizer,
        **kw,
    )
    (got * weights if reduction == "none" else got).sum().backward()
    student64 = case.student.double().requires_grad_(True)
    expected = ref.kd_ref(
        student64,
        case.teacher,
        case.temperature,
        labels_,
        transform,
        alpha,
        smoothing,
        IGNORE,
        standardize,
        calibrate_correct,
        calibrate_before_temperature,
        reduction,
        normalizer,
    )
    (expected * weights if reduction == "none" else expected).sum().backward()
    return got.detach(), student.grad, expected.detach(), student64.grad


def _check(case, standardize=False, rows_factor=1.0, **kw):
    if standardize and std_floor(case.student, case.teacher) < 1e-3:
        # a (near-)constant row has no z-score (its Jacobian is ~1/eps): not a meaningful comparison
        assume(False)
    got, grad, expected, grad64 = _run(case, standardize=standardize, **kw)
    zmax = logit_scale(case.student, case.teacher, temperature=case.temperature, standardize=standardize)
    assert_loss_close(got, expected, zmax, scale=case.temperature**2 * rows_factor)
    assert grad.dtype == case.dtype
    natural = 1.5 * case.temperature  # d(T^2 KL(p || q)) / dz_s = T (q - p), times a weight <= 1.5
    if kw.get("reduction", "mean") == "mean":
        natural /= kw.get("normalizer") or max(int((case.labels != IGNORE).sum()), 1)
    if standardize:
        natural /= std_floor(case.student)
    assert_grad_close(grad, grad64, zmax, natural)


@PROPERTY
@given(
    case=cases(scale=None),
    transform=st.sampled_from(TARGET_TRANSFORMS),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    standardize=st.booleans(),
)
def test_kd_loss_matches_reference(case, transform, reduction, standardize):
    rows = case.labels.numel() if reduction == "sum" else 1
    _check(case, transform=transform, reduction=reduction, standardize=standardize, rows_factor=rows)


@settings(max_examples=75, deadline=None)
@given(case=cases(dtype=torch.float32, scale=MODERATE), normalizer=st.floats(0.5, 500.0))
def test_kd_loca_with_normalizer_matches_reference(case, normalizer):
    _check(case, transform="loca", alpha=case.alpha, normalizer=normalizer, via_alpha=True)


@settings(max_examples=75, deadline=None)
@given(
    case=cases(scale=MODERATE),
    calibrate_correct=st.booleans(),
    calibrate_before_temperature=st.booleans(),
)
def test_kd_loca_ablations_match_reference(case, calibrate_correct, calibrate_before_temperature):
    _check(
        case,
        transform="loca",
        alpha=case.alpha,
        calibrate_correct=calibrate_correct,
        calibrate_before_temperature=calibrate_before_temperature,
    )


@settings(max_examples=50, deadline=None)
@given(case=cases(scale=MODERATE), smoothing=st.just(0.0) | st.floats(1e-6, 1.0))
def test_kd_ka_smooth_any_smoothing_matches_reference(case, smoothing):
    _check(case, transform="ka_smooth", smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_without_labels_is_plain_kd_over_all_rows(reduction):
    case = make_case((4, 6), 13, seed=2, temperature=4.0)
    _check(case, labels=False, reduction=reduction, rows_factor=24 if reduction == "sum" else 1)


def test_kd_explicit_value():
    """A hand-computed value: T = 2, one row, KL with the teacher entropy included."""
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    p = torch.softmax(teacher.double() / 2, -1)[0]
    q = torch.softmax(student.double() / 2, -1)[0]
    expected = 4 * sum(float(p[i] * math.log(p[i] / q[i])) for i in range(3))
    zmax = logit_scale(student, teacher, temperature=2.0)
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(expected, abs=loss_atol(zmax, scale=4.0))


# --------------------------------------------------------------------------- zero, gradients
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_identical_student_and_teacher_give_zero(dtype, standardize, temperature):
    case = make_case((3, 5), 17, seed=4, dtype=dtype)
    student = case.teacher.clone().requires_grad_(True)
    for labels in (None, case.labels):
        loss = kd_loss(student, case.teacher, temperature, labels, standardize=standardize)
        assert abs(float(loss.detach())) <= 1e-6
        loss.backward()
        assert float(student.grad.double().abs().max()) <= 1e-6
        student.grad = None


@pytest.mark.parametrize("dtype", DTYPES)
def test_loca_on_identical_logits_is_zero_only_without_misinstruction(dtype):
    case = make_case((24,), 6, seed=9, dtype=dtype)
    mis = ref.mis_mask(case.teacher, case.labels)
    assert bool(mis.any())
    loss = kd_loss(case.teacher, case.teacher, 2.0, case.labels, loca_alpha=0.9, reduction="none")
    assert bool((loss[mis] > 1e-4).all())
    assert float(loss[~mis].abs().max()) <= 1e-6


@pytest.mark.parametrize("transform", TARGET_TRANSFORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("standardize", [False, True])
def test_gradient_reaches_student_never_teacher(transform, reduction, standardize):
    case = make_case((6, 3), 10, seed=1, temperature=4.0)
    student = case.student.clone().requires_grad_(True)
    teacher = case.teacher.clone().requires_grad_(True)
    loss = kd_loss(
        student,
        teacher,
        4.0,
        case.labels,
        target_transform=transform,
        reduction=reduction,
        standardize=standardize,
    )
    loss.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())
    assert float(student.grad.abs().sum()) > 0
    # ignored rows get no gradient
    ignored = case.labels == IGNORE
    assert bool(ignored.any())
    assert float(student.grad[ignored].abs().max()) == 0


def test_ignored_rows_do_not_change_the_value():
    case = make_case((5, 4), 8, seed=12)
    ignored = case.labels == IGNORE
    assert bool(ignored.any())
    other = case.student.clone()
    other[ignored] = torch.randn(int(ignored.sum()), 8) * 50
    teacher2 = case.teacher.clone()
    teacher2[ignored] = -teacher2[ignored]
    for kw in ({}, {"loca_alpha": 0.9}, {"target_transform": "ka_shift"}):
        a = kd_loss(case.student, case.teacher, 3.0, case.labels, **kw)
        b = kd_loss(other, teacher2, 3.0, case.labels, **kw)
        assert torch.equal(a, b), kw


def test_normalizer_splits_a_batch_into_micro_batches():
    """Two micro-batches each divided by the total valid count sum to the whole batch's mean."""
    case = make_case((10,), 7, seed=21, temperature=2.0)
    total_valid = int((case.labels != IGNORE).sum())
    s = case.student.clone().requires_grad_(True)
    whole = kd_loss(s, case.teacher, 2.0, case.labels, loca_alpha=0.9)
    whole.backward()
    grad_whole = s.grad.clone()
    s.grad = None
    parts = sum(
        kd_loss(s[sl], case.teacher[sl], 2.0, case.labels[sl], loca_alpha=0.9, normalizer=total_valid)
        for sl in (slice(0, 3), slice(3, 10))
    )
    parts.backward()
    # two float32 computations of the same rows: twice the rounding of each; the value is
    # T^2 KL, the gradient's entries T (q - p) / total_valid are at most T / total_valid
    zmax = logit_scale(case.student, case.teacher, temperature=2.0)
    torch.testing.assert_close(parts, whole, rtol=RTOL32, atol=2 * loss_atol(zmax, scale=4.0))
    torch.testing.assert_close(s.grad, grad_whole, rtol=RTOL32, atol=2 * grad_atol(zmax, 2.0 / total_valid))
    # a tensor normalizer behaves the same
    t = kd_loss(
        case.student,
        case.teacher,
        2.0,
        case.labels,
        loca_alpha=0.9,
        normalizer=torch.tensor(float(total_valid)),
    )
    torch.testing.assert_close(t, whole.detach(), rtol=RTOL32, atol=2 * loss_atol(zmax, scale=4.0))


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TARGET_TRANSFORMS)
@pytest.mark.parametrize("standardize", [False, True])
def test_logits_of_1e4_give_finite_values_and_gradients(dtype, transform, standardize):
    gen = torch.Generator().manual_seed(3)
    shape = (4, 6, 20)
    student = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    teacher = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 20, shape[:-1], generator=gen)
    labels[0, :2] = IGNORE
    for temperature in (1.0, 4.0):
        for reduction in ("mean", "none"):
            loss = kd_loss(
                student,
                teacher,
                temperature,
                labels,
                target_transform=transform,
                standardize=standardize,
                reduction=reduction,
            )
            assert bool(torch.isfinite(loss).all()), (temperature, reduction)
            loss.sum().backward()
            assert bool(torch.isfinite(student.grad).all()), (temperature, reduction)
            student.grad = None


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_values_match_reference(dtype):
    """Not only finite: at +-1e4 the (huge) value still equals the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    shape = (16, 12)
    student = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    teacher = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 12, (16,), generator=gen)
    zmax = logit_scale(student, teacher, temperature=4.0)
    for kw, rkw in (({}, {}), ({"loca_alpha": 0.9}, {"transform": "loca"})):
        got = kd_loss(student, teacher, 4.0, labels, **kw)
        expected = ref.kd_ref(student, teacher, 4.0, labels, **rkw)
        assert_loss_close(got, expected, zmax, scale=16.0)  # log-probs up to 2e4 / T, times T^2


@pytest.mark.parametrize("smoothing", [1e-300, 5e-324])
def test_ka_smooth_with_tiny_smoothing_does_not_crash(smoothing):
    """smoothing is accepted anywhere in [0, 1]; eps / C may underflow to 0.0, which must not
    raise a bare 'math domain error' from math.log (log(eps / C) = log eps - log C, or -inf)."""
    case = make_case((6,), 5, seed=1)
    assert bool(ref.mis_mask(case.teacher, case.labels).any())
    got = kd_loss(
        case.student, case.teacher, 2.0, case.labels, target_transform="ka_smooth", smoothing=smoothing
    )
    expected = ref.kd_ref(case.student, case.teacher, 2.0, case.labels, "ka_smooth", smoothing=smoothing)
    assert_loss_close(got, expected, logit_scale(case.student, case.teacher, temperature=2.0), scale=4.0)


@pytest.mark.parametrize("transform", TARGET_TRANSFORMS)
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fixed_cases_at_plain_tight_tolerance(transform, standardize, temperature):
    """Ordinary logits ([64, 100], scale 2), fixed seeds: value and gradient within float32 rounding."""
    case = make_case((8, 8), 100, seed=123, scale=2.0, temperature=temperature)
    _check(case, transform=transform, standardize=standardize)
