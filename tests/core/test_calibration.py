"""LoCa calibration: every property of docs/loca-method.md section 3, against a float64 reference."""

from __future__ import annotations

import math

import loca_reference as ref
import numpy as np
import pytest
import torch
from core_helpers import (
    EPS64,
    IGNORE,
    alphas,
    cases,
    make_case,
    max_nontarget,
    prob_tol,
    rounding,
    seeds,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import locakd
from locakd import loca_calibrate, loca_log_calibrate, misinstruction_mask, misinstruction_rate

PROPERTY = settings(max_examples=100, deadline=None)
SMALL = settings(max_examples=60, deadline=None)


def _flat(case):
    c = case.num_classes
    return case.teacher.reshape(-1, c), case.labels.reshape(-1)


def _log_tol(logits, temperature, values):
    """Absolute tolerance on float32 log-probabilities: the rounding of z / T - lse (ULPS ulps of
    max|z / T| + log C) and of the calibration's own additions (ULPS ulps of max|log p_loca|)."""
    zmax = float(logits.double().abs().max()) / temperature + math.log(logits.shape[-1])
    vmax = float(values.double().abs().nan_to_num(posinf=0, neginf=0).max())
    return rounding(1.0 + zmax + vmax)


# --------------------------------------------------------------------------- worked example
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_example(dtype):
    # probabilities <= 1 from log-probs of size <= |log 0.0375| < 4: ULPS ulps of (1 + 4) in the dtype
    atol = rounding(5.0, eps=torch.finfo(dtype).eps)
    p = torch.tensor([0.50, 0.30, 0.15, 0.05], dtype=torch.float64)
    logits = torch.log(p).to(dtype)
    expected = torch.tensor([0.375, 0.475, 0.1125, 0.0375], dtype=torch.float64)
    out = loca_calibrate(logits.unsqueeze(0), torch.tensor([1]), alpha=0.9)
    torch.testing.assert_close(out[0].double(), expected, rtol=0, atol=atol)
    assert out[0, 1] - out[0, 0] == pytest.approx(0.1, abs=atol * 2)
    # The same row inside [B, T, V] next to a correct row (label 0) that must stay put.
    batch = torch.stack([logits, logits]).reshape(1, 2, 4)
    out3 = loca_calibrate(batch, torch.tensor([[1, 0]]), alpha=0.9)
    torch.testing.assert_close(out3[0, 0].double(), expected, rtol=0, atol=atol)
    torch.testing.assert_close(out3[0, 1].double(), p, rtol=0, atol=atol)


def test_worked_example_reference_self_check():
    """The references themselves reproduce sigma = 1/1.2, s = 0.75 and the documented vector."""
    p = np.array([[0.50, 0.30, 0.15, 0.05]])
    expected = np.array([0.375, 0.475, 0.1125, 0.0375])
    # float64 arithmetic on numbers <= 1: a few float64 ulps (2.2e-16) per value
    np.testing.assert_allclose(
        ref.calibrate_rows_numpy(p, np.array([1]), np.array([True]), 0.9)[0], expected, atol=rounding(1.0, eps=EPS64)
    )
    logits = torch.log(torch.tensor(p))
    _, log_s, _, changed, _, _ = ref.loca_terms(logits, torch.tensor([1]), 0.9)
    # log-space float64 (log-probs <= 4 in size): ULPS float64 ulps of (1 + 4)
    atol = rounding(5.0, eps=EPS64)
    assert bool(changed[0]) and math.exp(float(log_s[0])) == pytest.approx(0.75, abs=atol)
    out = ref.loca_log_target(logits, torch.tensor([1]), 0.9).exp()[0].numpy()
    np.testing.assert_allclose(out, expected, atol=atol)


@SMALL
@given(case=cases(dtype=torch.float32, max_rows=24), calibrate_correct=st.booleans())
def test_reference_implementations_agree(case, calibrate_correct):
    """The row-loop numpy reference and the vectorised log-space reference agree (float64)."""
    if case.num_classes > 1000:
        return  # the python loop is too slow there; the log-space one covers it
    teacher, labels = _flat(case)
    p = ref.softmax64(teacher, case.temperature).numpy()
    mis = ref.mis_mask(teacher, labels).numpy()
    loop = ref.calibrate_rows_numpy(p, labels.numpy(), mis, case.alpha, calibrate_correct)
    vec = ref.loca_log_target(
        teacher, labels, case.alpha, case.temperature, calibrate_correct=calibrate_correct
    )
    # both float64: the log-space one rounds log-probs of size <= max|z / T| + log C, the loop
    # sums up to C probabilities; ULPS float64 ulps of each (rtol: the values' own rounding)
    zmax = float(teacher.double().abs().max()) / case.temperature + math.log(case.num_classes)
    atol = rounding(1.0 + zmax, eps=EPS64, terms=case.num_classes)
    np.testing.assert_allclose(vec.exp().numpy(), loop, rtol=rounding(1.0, eps=EPS64), atol=atol)


# --------------------------------------------------------------------------- against the reference
@PROPERTY
@given(case=cases())
def test_matches_float64_reference(case):
    teacher, labels = case.teacher, case.labels
    out = loca_calibrate(teacher, labels, case.alpha, case.temperature)
    assert out.shape == teacher.shape and out.dtype == torch.float32
    expected = ref.loca_log_target(teacher, labels, case.alpha, case.temperature)
    torch.testing.assert_close(out.double(), expected.exp(), rtol=0, atol=prob_tol(teacher, case.temperature))
    log_out = loca_log_calibrate(teacher, labels, case.alpha, case.temperature)
    assert log_out.shape == teacher.shape and log_out.dtype == torch.float32
    torch.testing.assert_close(
        log_out.double(), expected, rtol=0, atol=_log_tol(teacher, case.temperature, expected)
    )


def test_float64_input_stays_float64_and_is_tight():
    case = make_case((5, 3), 11, seed=3, dtype=torch.float32, temperature=2.0)
    teacher = case.teacher.double()
    out = loca_calibrate(teacher, case.labels, 0.9, 2.0)
    assert out.dtype == torch.float64
    expected = ref.loca_log_target(teacher, case.labels, 0.9, 2.0).exp()
    # the same float64 prob_tol model: ULPS float64 ulps of (1 + max|z / T| + log C)
    zmax = float(teacher.abs().max()) / 2.0 + math.log(11)
    torch.testing.assert_close(out, expected, rtol=rounding(1.0, eps=EPS64), atol=rounding(1.0 + zmax, eps=EPS64))


# --------------------------------------------------------------------------- section 3 properties
@PROPERTY
@given(case=cases())
def test_rows_sum_to_one_and_entries_nonnegative(case):
    out = loca_calibrate(case.teacher, case.labels, case.alpha, case.temperature)
    assert bool((out >= 0).all())
    sums = out.double().sum(-1)
    tol = prob_tol(case.teacher, case.temperature) + 1e-6
    assert float((sums - 1).abs().max()) <= tol


@PROPERTY
@given(case=cases(alpha=None), alpha=st.floats(0.01, 0.999))
def test_argmax_is_label_on_calibrated_rows(case, alpha):
    """Margin 1 - alpha >= 1e-3 is far above float32 resolution, so the argmax must be gt."""
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    out = loca_calibrate(teacher, labels, alpha, case.temperature)
    assert torch.equal(out.argmax(-1)[mis], labels[mis])
    # and strictly: no other entry ties the label
    if bool(mis.any()):
        gt = out[mis].gather(-1, labels[mis].unsqueeze(-1)).squeeze(-1)
        assert bool((gt > max_nontarget(out[mis], labels[mis])).all())


@PROPERTY
@given(case=cases(), alpha=alphas | st.floats(0.999, 0.999999))
def test_margin_identity(case, alpha):
    """p_loca_gt - max_{i != gt} p_loca_i = 1 - alpha on every calibrated row."""
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    out = loca_calibrate(teacher, labels, alpha, case.temperature).double()
    if not bool(mis.any()):
        return
    gt = out[mis].gather(-1, labels[mis].unsqueeze(-1)).squeeze(-1)
    margin = gt - max_nontarget(out[mis], labels[mis])
    torch.testing.assert_close(
        margin, torch.full_like(margin, 1 - alpha), rtol=0, atol=prob_tol(teacher, case.temperature)
    )


@PROPERTY
@given(case=cases())
def test_closed_form_target_probability(case):
    """p_loca_gt = 1 - alpha (1 - p_gt) / (1 - p_gt + p_k), p from float64 softmax(z / T)."""
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    if not bool(mis.any()):
        return
    p = ref.softmax64(teacher, case.temperature)[mis]
    gt_labels = labels[mis]
    p_gt = p.gather(-1, gt_labels.unsqueeze(-1)).squeeze(-1)
    p_k = p.amax(-1)
    expected = 1 - case.alpha * (1 - p_gt) / (1 - p_gt + p_k)
    out = loca_calibrate(teacher, labels, case.alpha, case.temperature)[mis]
    got = out.gather(-1, gt_labels.unsqueeze(-1)).squeeze(-1).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=prob_tol(teacher, case.temperature))


@PROPERTY
@given(case=cases())
def test_nontarget_ratios_unchanged_in_log_space(case):
    """log p_loca_i - log p_loca_j == log p_i - log p_j for all i, j != gt (tiny p included),
    i.e. log p_loca_i - log p_i is one constant per row: log s."""
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    if not bool(mis.any()):
        return
    log_out = loca_log_calibrate(teacher, labels, case.alpha, case.temperature)[mis].double()
    log_p = ref.log_softmax64(teacher, case.temperature)[mis]
    gt_labels = labels[mis]
    nontarget = ~ref.target_mask(gt_labels, teacher.shape[-1])
    diff = log_out - log_p
    tol = _log_tol(teacher, case.temperature, log_out)
    # pairwise: compare every non-target entry's ratio to a fixed non-target reference class j
    j = torch.where(gt_labels == 0, 1, 0).unsqueeze(-1)
    lhs = log_out - log_out.gather(-1, j)
    rhs = log_p - log_p.gather(-1, j)
    assert float((lhs - rhs)[nontarget].abs().max()) <= 2 * tol
    # and the common offset is log s = log alpha - log(1 - p_gt + p_k)
    _, log_s, _, _, _, _ = ref.loca_terms(teacher, labels, case.alpha, case.temperature)
    expected = log_s[mis].unsqueeze(-1).expand_as(diff)
    assert float((diff - expected)[nontarget].abs().max()) <= tol


@PROPERTY
@given(case=cases())
def test_unchanged_rows_are_bit_for_bit_softmax(case):
    """Correct rows, ties and ignore_index rows equal torch.softmax(z.float() / T) exactly."""
    teacher, labels = case.teacher, case.labels
    mis = ref.mis_mask(teacher, labels)
    out = loca_calibrate(teacher, labels, case.alpha, case.temperature)
    plain = torch.softmax(teacher.float() / case.temperature, -1)
    assert torch.equal(out[~mis], plain[~mis])
    log_out = loca_log_calibrate(teacher, labels, case.alpha, case.temperature)
    log_plain = torch.log_softmax(teacher.float() / case.temperature, -1)
    assert torch.equal(log_out[~mis], log_plain[~mis])


def test_unchanged_rows_exact_on_explicit_rows():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0], [5.0, 0.0, 1.0], [0.0, 1.0, 4.0]])
    labels = torch.tensor([1, 1, IGNORE, 2])  # right, tie, ignored, right
    for t in (1.0, 3.0):
        out = loca_calibrate(logits, labels, 0.9, t)
        assert torch.equal(out, torch.softmax(logits / t, -1))


@PROPERTY
@given(case=cases(), temperatures=st.lists(st.floats(0.1, 30.0), min_size=2, max_size=3))
def test_misinstructed_set_does_not_depend_on_temperature(case, temperatures):
    teacher, labels = case.teacher, case.labels
    expected = ref.mis_mask(teacher, labels)
    assert torch.equal(misinstruction_mask(teacher, labels), expected)
    for t in temperatures:
        out = loca_calibrate(teacher, labels, case.alpha, t)
        changed = (out != torch.softmax(teacher.float() / t, -1)).any(-1)
        assert torch.equal(changed, expected), t


@SMALL
@given(case=cases(scale=None))
def test_alpha_to_zero_gives_one_hot_label(case):
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    alpha = 1e-6
    out = loca_calibrate(teacher, labels, alpha, case.temperature)[mis].double()
    one_hot = ref.target_mask(labels[mis], teacher.shape[-1]).double()
    # p_loca is within alpha of the one-hot label (1 - p_loca_gt = s (1 - p_gt) < alpha), plus rounding
    torch.testing.assert_close(out, one_hot, rtol=0, atol=alpha + prob_tol(teacher, case.temperature))


@SMALL
@given(case=cases())
def test_alpha_to_one_ties_label_with_former_top_class(case):
    teacher, labels = _flat(case)
    mis = ref.mis_mask(teacher, labels)
    if not bool(mis.any()):
        return
    alpha = 1 - 1e-6
    out = loca_calibrate(teacher, labels, alpha, case.temperature)[mis].double()
    top = teacher[mis].double().argmax(-1, keepdim=True)
    gt = out.gather(-1, labels[mis].unsqueeze(-1)).squeeze(-1)
    former_top = out.gather(-1, top).squeeze(-1)
    tol = prob_tol(teacher, case.temperature)
    # the margin is 1 - alpha = 1e-6 exactly, plus the float32 rounding of both entries
    assert float((gt - former_top).abs().max()) <= 1e-6 + 2 * tol
    # the limit alpha = 1 of the closed form: p_loca_gt = p_k / (1 - p_gt + p_k)
    p = ref.softmax64(teacher[mis], case.temperature)
    p_gt = p.gather(-1, labels[mis].unsqueeze(-1)).squeeze(-1)
    p_k = p.amax(-1)
    # alpha = 1 - 1e-6 instead of the limit 1 moves p_loca_gt by < 1e-6 (d p_loca_gt / d alpha
    # = -(1 - p_gt) / (1 - p_gt + p_k), at most 1 in size), plus the float32 rounding
    torch.testing.assert_close(gt, p_k / (1 - p_gt + p_k), rtol=0, atol=1e-6 + tol)


# --------------------------------------------------------------------------- no parameters, no gradient
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_no_gradient_into_teacher_and_teacher_not_modified(dtype, temperature):
    case = make_case((6, 4), 9, seed=11, dtype=dtype)
    teacher = case.teacher.clone().requires_grad_(True)
    before = teacher.detach().clone()
    for fn in (loca_calibrate, loca_log_calibrate):
        for kw in ({}, {"calibrate_correct": True}, {"calibrate_before_temperature": True}):
            out = fn(teacher, case.labels, 0.9, temperature, **kw)
            assert not out.requires_grad and out.grad_fn is None
            assert torch.equal(teacher.detach(), before), (fn.__name__, kw)
    assert teacher.grad is None


def test_no_trainable_parameters_and_stateless():
    mod = locakd.calibration
    assert not [k for k, v in vars(mod).items() if isinstance(v, (torch.nn.Module, torch.nn.Parameter))]
    assert not isinstance(loca_calibrate, torch.nn.Module)
    case = make_case((4, 5), 7, seed=5)
    first = loca_calibrate(case.teacher, case.labels, 0.9, 2.0)
    loca_calibrate(case.teacher * 3, case.labels, 0.5, 1.0)  # an unrelated call in between
    assert torch.equal(first, loca_calibrate(case.teacher, case.labels, 0.9, 2.0))


# --------------------------------------------------------------------------- ablation options
@PROPERTY
@given(case=cases(), alpha=st.floats(0.01, 0.999))
def test_calibrate_correct_gives_margin_one_minus_alpha_on_every_valid_row(case, alpha):
    teacher, labels = _flat(case)
    valid = labels != IGNORE
    out = loca_calibrate(teacher, labels, alpha, case.temperature, calibrate_correct=True)
    expected = ref.loca_log_target(teacher, labels, alpha, case.temperature, calibrate_correct=True).exp()
    tol = prob_tol(teacher, case.temperature)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
    if bool(valid.any()):
        v = out[valid].double()
        gt = v.gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1)
        margin = gt - max_nontarget(v, labels[valid])
        torch.testing.assert_close(margin, torch.full_like(margin, 1 - alpha), rtol=0, atol=tol)
        assert torch.equal(out[valid].argmax(-1), labels[valid])
    # ignored rows untouched
    plain = torch.softmax(teacher.float() / case.temperature, -1)
    assert torch.equal(out[~valid], plain[~valid])


@PROPERTY
@given(case=cases())
def test_calibrate_before_temperature(case):
    teacher, labels = case.teacher, case.labels
    # identical to the default at T = 1: the same computation, bit for bit
    at_one = loca_calibrate(teacher, labels, case.alpha, 1.0, calibrate_before_temperature=True)
    assert torch.equal(at_one, loca_calibrate(teacher, labels, case.alpha, 1.0))
    # p_loca ** (1 / T), renormalised, otherwise
    out = loca_calibrate(teacher, labels, case.alpha, case.temperature, calibrate_before_temperature=True)
    expected = ref.loca_log_target(
        teacher, labels, case.alpha, case.temperature, calibrate_before_temperature=True
    ).exp()
    tol = prob_tol(teacher, min(case.temperature, 1.0))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
    mis = ref.mis_mask(teacher, labels)
    # a power keeps the order, so the label still wins ...
    assert torch.equal(out[mis].argmax(-1), labels[mis])
    # ... and rows that are not calibrated are softmax(z / T)
    assert torch.equal(out[~mis], torch.softmax(teacher.float() / case.temperature, -1)[~mis])


def test_calibrate_before_temperature_explicit():
    p = torch.tensor([[0.50, 0.30, 0.15, 0.05]], dtype=torch.float64)
    out = loca_calibrate(torch.log(p), torch.tensor([1]), 0.9, 2.0, calibrate_before_temperature=True)
    base = torch.tensor([0.375, 0.475, 0.1125, 0.0375], dtype=torch.float64) ** 0.5
    # float64 log-space, log-probs of size < 4: ULPS float64 ulps of (1 + 4)
    atol = rounding(5.0, eps=EPS64)
    torch.testing.assert_close(out[0], base / base.sum(), rtol=0, atol=atol)


# --------------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize(
    "kw",
    [{}, {"calibrate_correct": True}, {"calibrate_before_temperature": True}],
    ids=["default", "cc", "cbt"],
)
def test_logits_of_1e4_stay_finite(dtype, temperature, kw):
    gen = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (3, 8, 50), generator=gen) * 2 - 1
    teacher = (sign * 1e4).to(dtype)
    labels = torch.randint(0, 50, (3, 8), generator=gen)
    labels[0, 0] = IGNORE
    mis = ref.mis_mask(teacher, labels)
    assert bool(mis.any()) and bool((~mis).any())
    out = loca_calibrate(teacher, labels, 0.9, temperature, **kw)
    log_out = loca_log_calibrate(teacher, labels, 0.9, temperature, **kw)
    assert bool(torch.isfinite(out).all()) and not bool(torch.isnan(log_out).any())
    assert bool((log_out < math.inf).all())
    assert bool((out >= 0).all())
    # logits are exactly +-1e4: z / T and z - max are exact (0 or -2e4 / T), so the log-probs
    # carry only the rounding of log(#ties) <= log C and of the calibration (ULPS ulps of
    # 1 + log C each); a row sums C such probabilities
    tol = rounding(1.0 + math.log(50), terms=50)
    torch.testing.assert_close(out.double().sum(-1), torch.ones(3, 8, dtype=torch.float64), rtol=0, atol=tol)
    assert torch.equal(out.argmax(-1)[mis], labels[mis])
    if kw.get("calibrate_before_temperature") and temperature != 1.0:
        return  # tempering after calibrating changes the margin
    margin = out[mis].double().gather(-1, labels[mis].unsqueeze(-1)).squeeze(-1) - max_nontarget(
        out[mis], labels[mis]
    )
    torch.testing.assert_close(margin, torch.full_like(margin, 0.1), rtol=0, atol=2 * rounding(1.0 + math.log(50)))


def test_minus_inf_teacher_entries_are_masked_classes():
    """-inf logits (masked classes) keep probability 0; a masked label still gets margin 1 - alpha."""
    teacher = torch.tensor(
        [[2.0, -math.inf, 0.5, 1.0], [-math.inf, 3.0, 1.0, -math.inf], [1.0, 0.0, -math.inf, 2.0]]
    )
    labels = torch.tensor([2, 0, 1])  # row 1: the label's own logit is -inf
    out = loca_calibrate(teacher, labels, 0.9, 2.0)
    assert bool(torch.isfinite(out).all())
    expected = ref.loca_log_target(teacher, labels, 0.9, 2.0).exp()
    # prob_tol's model with max|z| = 3, T = 2, C = 4: ULPS ulps of (1 + 3 / 2 + log 4)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=rounding(1.0 + 1.5 + math.log(4)))
    assert out[0, 1] == 0 and out[1, 3] == 0 and out[2, 2] == 0
    assert torch.equal(out.argmax(-1), labels)


# --------------------------------------------------------------------------- mis-instruction mask / rate
def test_misinstruction_mask_ties_count_as_right_and_ignored_rows_false():
    logits = torch.tensor(
        [[1.0, 3.0, 3.0], [2.0, 2.0, 1.0], [0.0, 5.0, 1.0], [1.0, 2.0, 3.0], [9.0, 0.0, 0.0]]
    )
    labels = torch.tensor([1, 0, 0, IGNORE, 0])
    assert misinstruction_mask(logits, labels).tolist() == [False, False, True, False, False]
    assert misinstruction_rate(logits, labels) == (1, 4)
    # a different ignore_index
    labels2 = torch.tensor([1, 0, 0, -1, 1])
    assert misinstruction_mask(logits, labels2, ignore_index=-1).tolist() == [False, False, True, False, True]
    assert misinstruction_rate(logits, labels2, ignore_index=-1) == (2, 4)
    # every row ignored
    assert misinstruction_rate(logits, torch.full((5,), IGNORE)) == (0, 0)


@PROPERTY
@given(case=cases())
def test_misinstruction_mask_and_rate_match_reference(case):
    expected = ref.mis_mask(case.teacher, case.labels)
    mask = misinstruction_mask(case.teacher, case.labels)
    assert mask.dtype == torch.bool and mask.shape == case.labels.shape
    assert torch.equal(mask, expected)
    assert misinstruction_rate(case.teacher, case.labels) == (
        int(expected.sum()),
        int((case.labels != IGNORE).sum()),
    )


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_misinstruction_mask_same_in_every_input_dtype(seed):
    """float16 -> float32 is exact, so the mask of the float16 logits equals that of their float32 copy."""
    case = make_case((32,), 6, seed, dtype=torch.float16, scale=1.0)
    assert torch.equal(
        misinstruction_mask(case.teacher, case.labels), misinstruction_mask(case.teacher.float(), case.labels)
    )
