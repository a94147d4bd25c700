"""DKD, DKD+LoCa and the identity KD = TCKD + (1 - p_gt) * NCKD, against the float64 reference."""

from __future__ import annotations

import math

import loca_reference as ref
import pytest
import torch
from core_helpers import (
    DTYPES,
    EPS64,
    IGNORE,
    RTOL32,
    assert_grad_close,
    assert_loss_close,
    cases,
    logit_scale,
    loss_atol,
    make_case,
    rounding,
    std_floor,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from locakd import TARGET_TRANSFORMS, decompose_kd, dkd_loss, kd_loss

PROPERTY = settings(max_examples=125, deadline=None)
MODERATE = st.sampled_from([0.1, 1.0, 3.0])


def _log_probs32(logits, temperature):
    return torch.log_softmax(logits.float() / temperature, -1)


# --------------------------------------------------------------------------- decomposition
@PROPERTY
@given(case=cases(), loca=st.booleans())
def test_kd_equals_tckd_plus_nontarget_mass_times_nckd(case, loca):
    teacher, labels, t = case.teacher, case.labels, case.temperature
    if loca:
        target64 = ref.loca_log_target(teacher, labels, case.alpha, t)
    else:
        target64 = ref.log_softmax64(teacher, t)
    student64 = ref.log_softmax64(case.student, t)
    parts = decompose_kd(_log_probs32(case.student, t), target64.float(), labels)
    valid = labels != IGNORE
    tckd, nckd, mass = ref.tckd_nckd64(target64, student64, labels)
    kl = ref.kl64(target64, student64)
    zmax = logit_scale(case.student, case.teacher, temperature=t)
    # the conditional log-probs log p_i - log(1 - p_gt) carry the rounding of two log-probs
    atol = loss_atol(2 * zmax)
    # the identity, with the library's parts, against the float64 KL
    lhs = (parts.tckd + parts.teacher_nontarget_mass * parts.nckd).double()
    torch.testing.assert_close(lhs[valid], kl[valid], rtol=RTOL32, atol=atol)
    # and each part against its float64 definition
    torch.testing.assert_close(parts.tckd.double()[valid], tckd[valid], rtol=RTOL32, atol=atol)
    torch.testing.assert_close(parts.nckd.double()[valid], nckd[valid], rtol=RTOL32, atol=atol)
    torch.testing.assert_close(
        parts.teacher_nontarget_mass.double()[valid], mass[valid], rtol=RTOL32, atol=atol
    )
    # the reference satisfies the identity too (a check of the reference): float64 rounding of
    # the same log-probs, ULPS float64 ulps of (1 + 2 zmax)
    atol64 = rounding(1.0 + 2 * zmax, eps=EPS64)
    torch.testing.assert_close(tckd + mass * nckd, kl, rtol=rounding(1.0, eps=EPS64), atol=atol64)


@settings(max_examples=75, deadline=None)
@given(case=cases(dtype=torch.float32))
def test_identity_against_kd_loss_rows(case):
    """kd_loss(reduction='none') / T^2 == TCKD + (1 - p_gt) NCKD of decompose_kd, row by row."""
    t = case.temperature
    kd_rows = kd_loss(case.student, case.teacher, t, case.labels, reduction="none") / t**2
    parts = decompose_kd(_log_probs32(case.student, t), _log_probs32(case.teacher, t), case.labels)
    valid = case.labels != IGNORE
    zmax = logit_scale(case.student, case.teacher, temperature=t)
    torch.testing.assert_close(
        (parts.tckd + parts.teacher_nontarget_mass * parts.nckd)[valid],
        kd_rows[valid],
        rtol=RTOL32,
        atol=loss_atol(2 * zmax),  # two float32 computations, conditional log-probs: see above
    )


@PROPERTY
@given(case=cases())
def test_loca_leaves_nckd_unchanged_and_sets_binary_target(case):
    """LoCa keeps non-target ratios, so NCKD is unchanged; the teacher's binary distribution
    becomes [1 - s (1 - p_gt), s (1 - p_gt)]."""
    teacher, labels, t = case.teacher, case.labels, case.temperature
    log_student = _log_probs32(case.student, t)
    plain = decompose_kd(log_student, _log_probs32(teacher, t), labels)
    from locakd import loca_log_calibrate

    calibrated = decompose_kd(log_student, loca_log_calibrate(teacher, labels, case.alpha, t), labels)
    valid = labels != IGNORE
    zmax = logit_scale(case.student, teacher, temperature=t)
    atol = loss_atol(2 * zmax)  # conditional log-probs carry two log-probs' rounding (see above)
    torch.testing.assert_close(calibrated.nckd[valid], plain.nckd[valid], rtol=RTOL32, atol=atol)
    _, log_s, _, changed, log_rest, _ = ref.loca_terms(teacher, labels, case.alpha, t)
    expected_mass = torch.where(changed, torch.exp(log_s + log_rest), torch.exp(log_rest))
    torch.testing.assert_close(
        calibrated.teacher_nontarget_mass.double()[valid], expected_mass[valid], rtol=RTOL32, atol=atol
    )


def test_decompose_explicit_example():
    """Worked by hand: p = [0.5, 0.3, 0.2], q = [0.2, 0.5, 0.3], gt = 0."""
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    parts = decompose_kd(q.log(), p.log(), torch.tensor([0]))
    tckd = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    nckd = 0.6 * math.log(0.6 / 0.625) + 0.4 * math.log(0.4 / 0.375)
    # float64 throughout, log-probs of size < 2: ULPS float64 ulps of (1 + 2)
    atol = rounding(3.0, eps=EPS64)
    assert float(parts.tckd[0]) == pytest.approx(tckd, abs=atol)
    assert float(parts.nckd[0]) == pytest.approx(nckd, abs=atol)
    assert float(parts.teacher_nontarget_mass[0]) == pytest.approx(0.5, abs=atol)


# --------------------------------------------------------------------------- dkd_loss vs reference
def _run(
    case,
    *,
    transform="none",
    alpha=0.9,
    a=1.0,
    b=8.0,
    smoothing=0.1,
    standardize=False,
    reduction="mean",
    normalizer=None,
    via_alpha=False,
):
    weights = torch.rand(case.labels.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    student = case.student.clone().requires_grad_(True)
    kw = {} if via_alpha else {"target_transform": transform}
    if transform == "loca":
        kw["loca_alpha"] = alpha
    got = dkd_loss(
        student,
        case.teacher,
        case.labels,
        a,
        b,
        case.temperature,
        smoothing=smoothing,
        standardize=standardize,
        reduction=reduction,
        normalizer=normalizer,
        **kw,
    )
    (got * weights if reduction == "none" else got).sum().backward()
    student64 = case.student.double().requires_grad_(True)
    expected = ref.dkd_ref(
        student64,
        case.teacher,
        case.labels,
        a,
        b,
        case.temperature,
        transform,
        alpha,
        smoothing,
        IGNORE,
        standardize,
        reduction,
        normalizer,
    )
    (expected * weights if reduction == "none" else expected).sum().backward()
    return got.detach(), student.grad, expected.detach(), student64.grad


def _check(case, *, a=1.0, b=8.0, reduction="mean", normalizer=None, standardize=False, **kw):
    if standardize and std_floor(case.student, case.teacher) < 1e-3:
        # a (near-)constant row has no z-score (its Jacobian is ~1/eps): not a meaningful comparison
        assume(False)
    got, grad, expected, grad64 = _run(
        case, a=a, b=b, reduction=reduction, normalizer=normalizer, standardize=standardize, **kw
    )
    t = case.temperature
    zmax = logit_scale(case.student, case.teacher, temperature=t, standardize=standardize)
    rows = case.labels.numel() if reduction == "sum" else 1
    # DKD's conditional log-probs log p_i - log(1 - p_gt) carry two log-probs' rounding: 2 zmax
    zmax = 2 * zmax
    assert_loss_close(got, expected, zmax, scale=t**2 * (a + b) * rows)
    natural = 1.5 * t * (a + b)
    if reduction == "mean":
        natural /= normalizer or max(int((case.labels != IGNORE).sum()), 1)
    if standardize:
        natural /= std_floor(case.student)
    assert grad.dtype == case.dtype
    assert_grad_close(grad, grad64, zmax, natural)


@PROPERTY
@given(
    case=cases(scale=None),
    transform=st.sampled_from(TARGET_TRANSFORMS),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    standardize=st.booleans(),
    weights=st.sampled_from([(1.0, 8.0), (1.0, 2.0), (0.0, 1.0), (1.0, 0.0), (0.5, 6.0)]),
)
def test_dkd_loss_matches_reference(case, transform, reduction, standardize, weights):
    a, b = weights
    _check(
        case, a=a, b=b, transform=transform, alpha=case.alpha, reduction=reduction, standardize=standardize
    )


@settings(max_examples=75, deadline=None)
@given(case=cases(scale=MODERATE), normalizer=st.floats(0.5, 300.0))
def test_dkd_loca_via_loca_alpha_with_normalizer_matches_reference(case, normalizer):
    _check(case, transform="loca", alpha=case.alpha, normalizer=normalizer, via_alpha=True)


# --------------------------------------------------------------------------- zero, gradients, numerics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_identical_student_and_teacher_give_zero(dtype, temperature, standardize):
    case = make_case((4, 5), 11, seed=6, dtype=dtype)
    student = case.teacher.clone().requires_grad_(True)
    loss = dkd_loss(student, case.teacher, case.labels, temperature=temperature, standardize=standardize)
    assert abs(float(loss.detach())) <= 1e-6
    loss.backward()
    assert float(student.grad.double().abs().max()) <= 1e-6


def test_loca_on_identical_logits_is_positive_exactly_on_misinstructed_rows():
    case = make_case((24,), 7, seed=8)
    mis = ref.mis_mask(case.teacher, case.labels)
    assert bool(mis.any()) and bool((~mis & (case.labels != IGNORE)).any())
    loss = dkd_loss(case.teacher, case.teacher, case.labels, loca_alpha=0.9, reduction="none")
    assert bool((loss[mis] > 1e-4).all())
    assert float(loss[~mis].abs().max()) <= 1e-6


@pytest.mark.parametrize("transform", TARGET_TRANSFORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_reaches_student_never_teacher(transform, reduction):
    case = make_case((5, 4), 9, seed=13)
    student = case.student.clone().requires_grad_(True)
    teacher = case.teacher.clone().requires_grad_(True)
    loss = dkd_loss(student, teacher, case.labels, target_transform=transform, reduction=reduction)
    loss.sum().backward()
    assert teacher.grad is None
    assert bool(torch.isfinite(student.grad).all()) and float(student.grad.abs().sum()) > 0
    ignored = case.labels == IGNORE
    assert bool(ignored.any()) and float(student.grad[ignored].abs().max()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TARGET_TRANSFORMS)
@pytest.mark.parametrize("standardize", [False, True])
def test_logits_of_1e4_give_finite_values_and_gradients(dtype, transform, standardize):
    gen = torch.Generator().manual_seed(4)
    shape = (3, 8, 16)
    student = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    teacher = ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 16, shape[:-1], generator=gen)
    labels[1, :3] = IGNORE
    for temperature in (1.0, 4.0):
        for reduction in ("mean", "none"):
            loss = dkd_loss(
                student,
                teacher,
                labels,
                temperature=temperature,
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
    gen = torch.Generator().manual_seed(6)
    student = ((torch.randint(0, 2, (16, 10), generator=gen) * 2 - 1) * 1e4).to(dtype)
    teacher = ((torch.randint(0, 2, (16, 10), generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, 10, (16,), generator=gen)
    zmax = logit_scale(student, teacher, temperature=4.0)
    for kw, rkw in (({}, {}), ({"loca_alpha": 0.9}, {"transform": "loca"})):
        got = dkd_loss(student, teacher, labels, **kw)
        expected = ref.dkd_ref(student, teacher, labels, **rkw)
        # log-probs up to 2e4 / T in size, loss scaled by T^2 (a + b); conditional log-probs: 2 zmax
        assert_loss_close(got, expected, 2 * zmax, scale=16.0 * 9.0)


def test_one_hot_teacher_target_gives_finite_gradient():
    """ka_smooth with smoothing=0 (allowed: smoothing in [0, 1]) makes the teacher target an exact
    one-hot on mis-instructed rows, so the teacher has no non-target distribution there. DKD must
    still give a finite value AND a finite gradient (NCKD of such a row is 0)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=gen).requires_grad_(True)
    teacher = torch.randn(6, 5, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert bool(ref.mis_mask(teacher, labels).any())
    loss = dkd_loss(student, teacher, labels, target_transform="ka_smooth", smoothing=0.0)
    assert bool(torch.isfinite(loss))
    expected = ref.dkd_ref(student.detach(), teacher, labels, transform="ka_smooth", smoothing=0.0)
    zmax = logit_scale(student.detach(), teacher, temperature=4.0)
    assert_loss_close(loss.detach(), expected, 2 * zmax, scale=16.0 * 9.0)  # T^2 (a + b), see above
    loss.backward()
    assert bool(torch.isfinite(student.grad).all())


@pytest.mark.parametrize("loca_alpha", [None, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fixed_cases_at_plain_tight_tolerance(loca_alpha, temperature):
    """Ordinary logits ([64, 100], scale 2), fixed seeds: value and gradient within float32 rounding."""
    case = make_case((8, 8), 100, seed=321, scale=2.0, temperature=temperature)
    transform = "none" if loca_alpha is None else "loca"
    got, grad, expected, grad64 = _run(case, transform=transform, alpha=loca_alpha or 0.9)
    zmax = logit_scale(case.student, case.teacher, temperature=temperature)
    n_valid = int((case.labels != IGNORE).sum())
    # T^2 (a + b) scales the value; the gradient's entries are at most T (a + b) / rows in size
    assert_loss_close(got, expected, 2 * zmax, scale=temperature**2 * 9.0)
    assert_grad_close(grad, grad64, 2 * zmax, temperature * 9.0 / n_valid)
