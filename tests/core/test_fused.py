"""The one-pass row-block kernels (locakd.losses._fused): the fast path is taken, the gradient is
computed once and handed over, memory stays within one gradient plus O(chunk x V), and the input
checks cost no pass over the logits on good input."""

from __future__ import annotations

import math

import loca_reference as ref
import pytest
import torch
from core_helpers import (
    IGNORE,
    RTOL32,
    assert_grad_close,
    assert_loss_close,
    logit_scale,
    loss_atol,
    make_case,
)

import locakd
from locakd import InputError
from locakd.losses import _common, _fused
from locakd.losses.token import DIVERGENCES

LOCA = [None, 0.9]


def _case(rows=(4, 9), vocab=37, seed=3, dtype=torch.float32):
    return make_case(rows, vocab, seed, dtype=dtype, scale=2.0)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if any row leaves the one-pass path for the log-space fallback."""

    def refuse(self, bad, step):
        raise AssertionError(f"{len(bad)} row(s) took the fallback path")

    monkeypatch.setattr(_fused._FixRows, "__call__", refuse)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", LOCA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ordinary_and_extreme_logits_take_the_one_pass_path(no_fallback, divergence, loca_alpha, dtype):
    """Finite logits, from ordinary to +-1e4 (no -inf mask), never need the log-space fallback for
    forward/reverse KL and TV; the mixtures may underflow at +-1e4 and are tested on ordinary logits."""
    case = _case(dtype=dtype)
    s = case.student.clone().requires_grad_(True)
    locakd.token_distill_loss(s, case.teacher, case.labels, divergence, loca_alpha=loca_alpha).backward()
    if divergence in ("forward_kl", "reverse_kl", "total_variation"):
        gen = torch.Generator().manual_seed(1)
        big = ((torch.randint(0, 2, (6, 24), generator=gen) * 2 - 1) * 1e4).to(dtype)
        labels = torch.randint(0, 24, (6,), generator=gen)
        x = big.clone().requires_grad_(True)
        locakd.token_distill_loss(x, big.flip(0), labels, divergence, loca_alpha=loca_alpha).backward()


@pytest.mark.parametrize("transform", ["none", "loca"])
def test_kd_plain_and_loca_take_the_one_pass_path(no_fallback, transform):
    case = _case()
    s = case.student.clone().requires_grad_(True)
    alpha = 0.9 if transform == "loca" else None
    locakd.kd_loss(s, case.teacher, 4.0, case.labels, loca_alpha=alpha).backward()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", LOCA)
def test_fallback_rows_equal_the_reference(divergence, loca_alpha):
    """Rows with a -inf mask go through the log-space fallback, the others through the fast path,
    in one call: both match the float64 reference (the masked class carries p = q = 0)."""
    case = _case()
    student, teacher = case.student.clone(), case.teacher.clone()
    flat_s, flat_t = student.view(-1, 37), teacher.view(-1, 37)
    labels = case.labels.clamp(max=35).masked_fill(case.labels == IGNORE, IGNORE)
    flat_s[::3, 36] = -math.inf  # every third row masks its last class in both models
    flat_t[::3, 36] = -math.inf
    s = student.clone().requires_grad_(True)
    got = locakd.token_distill_loss(s, teacher, labels, divergence, loca_alpha=loca_alpha)
    got.backward()
    s64 = student.double().requires_grad_(True)
    expected = ref.token_ref(s64, teacher, labels, divergence, loca_alpha)
    expected.backward()
    zmax = logit_scale(case.student, case.teacher, temperature=1.0)
    assert_loss_close(got.detach(), expected, zmax)
    n_valid = int((labels != IGNORE).sum())
    if divergence != "total_variation":  # |p - q| has kinks: compared on kink-free cases elsewhere
        assert_grad_close(s.grad, s64.grad, zmax, 2.0 / n_valid)
    assert float(s.grad.view(-1, 37)[::3, 36].abs().max()) == 0


def test_the_gradient_is_handed_over_once():
    case = _case()
    s = case.student.clone().requires_grad_(True)
    loss = locakd.token_distill_loss(s, case.teacher, case.labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("scale_by", [1.0, 0.25, -3.0])
def test_backward_scales_the_stored_gradient_by_grad_output(scale_by):
    case = _case()
    s1 = case.student.clone().requires_grad_(True)
    (scale_by * locakd.token_distill_loss(s1, case.teacher, case.labels, "jsd", loca_alpha=0.9)).backward()
    s2 = case.student.clone().requires_grad_(True)
    locakd.token_distill_loss(s2, case.teacher, case.labels, "jsd", loca_alpha=0.9).backward()
    # scaling by 0.25 is exact; by 1 it is skipped; by -3 it rounds once (one float32 ulp)
    torch.testing.assert_close(s1.grad, scale_by * s2.grad, rtol=RTOL32, atol=0.0)


def test_without_autograd_only_the_value_is_computed():
    case = _case()
    with_grad = locakd.token_distill_loss(case.student.clone().requires_grad_(True), case.teacher, case.labels)
    with torch.no_grad():
        value = locakd.token_distill_loss(case.student, case.teacher, case.labels)
    assert not value.requires_grad and torch.equal(value, with_grad.detach())
    assert torch.equal(locakd.token_distill_loss(case.student, case.teacher, case.labels), value)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_scratch_memory_is_one_block(monkeypatch, chunk_size):
    """Besides the stored gradient, the kernel allocates float32 scratch of at most chunk_size (and
    at most BLOCK_ELEMENTS / V) rows: O(chunk x V), whatever the number of rows."""
    shapes = []
    original = _fused.Scratch.__init__

    def record(self, rows, vocab, dtype, device):
        shapes.append((rows, vocab))
        original(self, rows, vocab, dtype, device)

    monkeypatch.setattr(_fused.Scratch, "__init__", record)
    monkeypatch.setattr(_fused, "BLOCK_ELEMENTS", 37 * 8)  # 8 rows of V = 37
    case = make_case((40,), 37, seed=2)
    s = case.student.clone().requires_grad_(True)
    locakd.token_distill_loss(s, case.teacher, case.labels, "jsd", chunk_size=chunk_size).backward()
    assert shapes and all(rows <= min(8, chunk_size or 8) and vocab == 37 for rows, vocab in shapes)


def test_good_input_costs_no_finiteness_pass(monkeypatch):
    """With validate on, NaN/+inf is found from the loss rows: good input is never scanned."""
    scans = []
    original = _fused.check_logits

    def spy(name, logits, **kw):
        if kw.get("check_finite", True):
            scans.append(name)
        return original(name, logits, **kw)

    monkeypatch.setattr(_fused, "check_logits", spy)
    monkeypatch.setattr(_common, "check_logits", spy)
    case = _case()
    for divergence in DIVERGENCES:
        locakd.token_distill_loss(case.student, case.teacher, case.labels, divergence, loca_alpha=0.9)
    locakd.kd_loss(case.student, case.teacher, 4.0, case.labels, loca_alpha=0.9)
    locakd.dkd_loss(case.student, case.teacher, case.labels, loca_alpha=0.9)
    assert scans == []
    bad = case.student.clone()
    bad.view(-1, 37)[1, 2] = math.nan
    with pytest.raises(InputError, match="student_logits contains 1 NaN"):
        locakd.token_distill_loss(bad, case.teacher, case.labels)
    assert scans == ["student_logits"]


def test_an_all_minus_inf_row_is_a_clear_error():
    case = _case()
    student = case.student.clone()
    row = int((case.labels.view(-1) != IGNORE).nonzero()[0])
    student.view(-1, 37)[row] = -math.inf
    with pytest.raises(InputError, match="all -inf"):
        locakd.token_distill_loss(student, case.teacher, case.labels)


def test_per_row_losses_and_upstream_weights():
    """kd_loss(reduction='none') returns T^2 KL per row; a weighted sum backpropagates each
    row's weight (the stored gradient is scaled row by row)."""
    case = _case()
    weights = torch.rand(case.labels.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    s = case.student.clone().requires_grad_(True)
    rows = locakd.kd_loss(s, case.teacher, 2.0, case.labels, reduction="none")
    (rows * weights).sum().backward()
    s64 = case.student.double().requires_grad_(True)
    expected = ref.kd_ref(s64, case.teacher, 2.0, case.labels, reduction="none")
    (expected * weights).sum().backward()
    zmax = logit_scale(case.student, case.teacher, temperature=2.0)
    torch.testing.assert_close(rows.detach().double(), expected.detach(), rtol=RTOL32, atol=loss_atol(zmax, 4.0))
    assert_grad_close(s.grad, s64.grad, zmax, 1.5 * 2.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_float16_gradient_survives_a_large_normaliser_and_loss_scaling(divergence):
    """fp16 logits, a mean over 1e6 tokens and a GradScaler-like factor 2^16: the fp16 gradient
    is fp16(2^16 * g) as in a plain autograd graph, not 0 (the stored gradient is pre-scaled by a
    power of two, so its entries never fall below float16's range before grad_output arrives)."""
    case = _case(dtype=torch.float16)
    s = case.student.clone().requires_grad_(True)
    (2.0**16 * locakd.token_distill_loss(s, case.teacher, case.labels, divergence, normalizer=1e6)).backward()
    s32 = case.student.float().requires_grad_(True)
    (2.0**16 * locakd.token_distill_loss(s32, case.teacher.float(), case.labels, divergence, normalizer=1e6)).backward()
    expected = s32.grad.to(torch.float16)
    assert float(expected.abs().max()) > 0 and float((expected != 0).float().mean()) > 0.5
    # float32 gradient rounded to float16, possibly twice (scaled, then unscaled): one ulp
    info = torch.finfo(torch.float16)
    torch.testing.assert_close(s.grad.float(), expected.float(), rtol=info.eps, atol=info.tiny * info.eps)
