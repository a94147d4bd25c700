"""The fused linear path (hidden states + lm-head weights -> loss, no [tokens, V] logits) against
the float64 reference: values and the gradients of hidden states, weight and bias."""

from __future__ import annotations

import math

import loca_reference as ref
import pytest
import torch
from core_helpers import EPS32, IGNORE, RTOL32, grad_atol, logit_scale, loss_atol, rounding

import locakd
from locakd import InputError
from locakd.losses import linear as linear_module
from locakd.losses.linear import linear_distill_objective
from locakd.losses.token import DIVERGENCES

TOKENS, HIDDEN_S, HIDDEN_T, VOCAB = 29, 12, 9, 41


def _inputs(seed=0, dtype=torch.float32, tokens=TOKENS, vocab=VOCAB, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, HIDDEN_S, generator=gen)
    ws = torch.randn(vocab, HIDDEN_S, generator=gen) * 0.6
    ht = torch.randn(tokens, HIDDEN_T, generator=gen)
    wt = torch.randn(vocab, HIDDEN_T, generator=gen) * 0.6
    bs = torch.randn(vocab, generator=gen) if bias else None
    bt = torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::5] = IGNORE
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return [cast(t) for t in (hs, ws, bs, ht, wt, bt)], labels


def _logits64(h, w, b):
    z = h.double() @ w.double().T
    return z if b is None else z + b.double()


def _projection_error(h, w, b, eps) -> float:
    """Logits h @ W.T + b in precision eps: ULPS ulps per logit of the size of its H products,
    which round independently (a random walk: the root of the sum of squares), and of |b|."""
    size = (h.double() ** 2 @ (w.double() ** 2).T).sqrt()
    if b is not None:
        size = size + b.double().abs()
    return rounding(float(size.max()), eps=eps)


def _tolerances(tensors, labels, temperature, natural_per_row):
    """(value tol, dL/dz tol per entry) for the fused float32 path against float64.

    On top of the log-prob rounding (loss_atol / grad_atol), each float32 logit may be off by the
    projection error e: that moves every log-prob by at most 2 e / T, hence each row's value by
    2 e / T and each softmax-gradient entry by its size times 2 e / T."""
    hs, ws, bs, ht, wt, bt = tensors
    eps = torch.finfo(hs.dtype).eps if hs.dtype == torch.float64 else EPS32  # half inputs: float32 math
    zs, zt = _logits64(hs, ws, bs), _logits64(ht, wt, bt)
    zmax = logit_scale(zs, zt, temperature=temperature)
    shift = 2 * (_projection_error(hs, ws, bs, eps) + _projection_error(ht, wt, bt, eps)) / temperature
    n = max(int((labels != IGNORE).sum()), 1)
    value_tol = loss_atol(zmax, eps=eps) + shift
    dz_tol = grad_atol(zmax, natural_per_row / n, eps=eps) + natural_per_row / n * shift
    return value_tol, dz_tol, eps


def _assert_head_grads(got, expected64, dz_tol, tensors, dz64, eps=EPS32):
    """dL/dh = dZ W, dL/dW = dZ^T h, dL/db = sum dZ: each entry's error is at most the dZ error
    times the matching absolute sum of the other factor, plus the rounding of the product's sum."""
    hs, ws = tensors[0], tensors[1]
    rtol = rounding(1.0, eps=eps)
    bounds = (
        dz_tol * float(ws.double().abs().sum(0).max()) + rtol * float((dz64.abs() @ ws.double().abs()).max()),
        dz_tol * float(hs.double().abs().sum(0).max()) + rtol * float((dz64.abs().T @ hs.double().abs()).max()),
        dz_tol * hs.shape[0] + rtol * float(dz64.abs().sum(0).max()),
    )
    for name, g, e, bound in zip(("hidden", "weight", "bias"), got, expected64, bounds, strict=True):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=bound, msg=lambda m, name=name: f"{name}: {m}")


def _fused_and_reference(tensors, labels, divergence, loca_alpha, chunk_size, temperature=1.0):
    hs, ws, bs, ht, wt, bt = (None if t is None else t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors))
    got = locakd.linear_token_distill_loss(
        hs, ws, ht, wt, labels, divergence, loca_alpha=loca_alpha, temperature=temperature,
        chunk_size=chunk_size, student_bias=bs, teacher_bias=bt,
    )
    got.backward()
    copy64 = lambda t: t.detach().to(torch.float64, copy=True).requires_grad_(True)  # noqa: E731
    h64, w64 = copy64(tensors[0]), copy64(tensors[1])
    b64 = None if tensors[2] is None else copy64(tensors[2])
    zs64 = _logits64(h64, w64, b64)
    zs64.retain_grad()
    expected = ref.token_ref(zs64, _logits64(tensors[3], tensors[4], tensors[5]), labels, divergence,
                             loca_alpha, temperature)
    expected.backward()
    grads = (hs.grad, ws.grad, None if bs is None else bs.grad)
    grads64 = (h64.grad, w64.grad, None if b64 is None else b64.grad)
    return got.detach(), grads, expected.detach(), grads64, zs64.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", [None, 0.9])
@pytest.mark.parametrize("chunk_size", [1024, 4], ids=["one-shot", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference_in_value_and_every_gradient(divergence, loca_alpha, chunk_size, dtype):
    """float32 within its rounding; float64 input runs the same kernels in float64, where the
    bound is ~1e-13: a wrong term in any closed form would show."""
    tensors, labels = _inputs(seed=3, dtype=dtype)
    got, grads, expected, grads64, dz64 = _fused_and_reference(tensors, labels, divergence, loca_alpha, chunk_size)
    value_tol, dz_tol, eps = _tolerances(tensors, labels, 1.0, natural_per_row=2.0)
    torch.testing.assert_close(got.double(), expected, rtol=rounding(1.0, eps=eps), atol=value_tol)
    _assert_head_grads(grads, grads64, dz_tol, tensors, dz64, eps)
    assert float(grads[0][labels == IGNORE].abs().max()) == 0  # skipped rows: no gradient


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_temperature_and_no_bias(divergence):
    tensors, labels = _inputs(seed=5, bias=False)
    got, grads, expected, grads64, dz64 = _fused_and_reference(tensors, labels, divergence, 0.9, 6, temperature=2.0)
    value_tol, dz_tol, _ = _tolerances(tensors, labels, 2.0, natural_per_row=1.0)  # |dL/dz| <= 2 / T
    torch.testing.assert_close(got.double(), expected, rtol=RTOL32, atol=value_tol)
    _assert_head_grads(grads, grads64, dz_tol, tensors, dz64)


@pytest.mark.parametrize("loca_alpha", [None, 0.9])
def test_objective_combines_divergence_and_cross_entropy(loca_alpha):
    """(kd_w D + ce_w CE) / n from one pass, the student head wider than the shared vocabulary
    (CE over all of it, the divergence over the first V rows), against float64 autograd."""
    tensors, labels = _inputs(seed=8, vocab=VOCAB + 6)
    hs, ws, bs, ht, wt, bt = tensors
    wt, bt = wt[:VOCAB], bt[:VOCAB]  # the teacher knows the shared vocabulary only
    labels = labels.clamp(max=VOCAB - 1).masked_fill(labels == IGNORE, IGNORE)
    h, w, b = (t.clone().requires_grad_(True) for t in (hs, ws, bs))
    terms = linear_distill_objective(h, w, ht, wt, labels, "reverse_kl", kd_weight=0.3, ce_weight=0.7,
                                     loca_alpha=loca_alpha, chunk_size=5, student_bias=b, teacher_bias=bt)
    terms.loss.backward()
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hs, ws, bs))
    zs64 = _logits64(h64, w64, b64)
    zs64.retain_grad()
    n = int((labels != IGNORE).sum())
    kd64 = ref.token_ref(zs64[:, :VOCAB], _logits64(ht, wt, bt), labels, "reverse_kl", loca_alpha, reduction="sum")
    ce64 = torch.nn.functional.cross_entropy(zs64, labels, ignore_index=IGNORE, reduction="sum")
    ((0.3 * kd64 + 0.7 * ce64) / n).backward()
    value_tol, dz_tol, _ = _tolerances((hs, ws, bs, ht, wt, bt), labels, 1.0, natural_per_row=2.0)
    torch.testing.assert_close(terms.loss.detach().double(), ((0.3 * kd64 + 0.7 * ce64) / n).detach(),
                               rtol=RTOL32, atol=value_tol)
    torch.testing.assert_close(terms.divergence_sum.double(), kd64.detach(), rtol=RTOL32, atol=n * value_tol)
    torch.testing.assert_close(terms.ce_sum.double(), ce64.detach(), rtol=RTOL32, atol=n * value_tol)
    _assert_head_grads((h.grad, w.grad, b.grad), (h64.grad, w64.grad, b64.grad), dz_tol, (hs, ws, bs), zs64.grad)


def test_tied_head_and_cropped_vocabulary():
    """The student head is its (tied) embedding matrix, cropped to the teacher's vocabulary: the
    embedding's gradient gets both uses; rows past the shared vocabulary get none from the loss."""
    tensors, labels = _inputs(seed=11, vocab=VOCAB, bias=False)
    _, _, _, ht, wt, _ = tensors
    gen = torch.Generator().manual_seed(4)
    embedding = torch.nn.Embedding(VOCAB + 3, HIDDEN_S)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(VOCAB + 3, HIDDEN_S, generator=gen) * 0.5)
    tokens = torch.randint(0, VOCAB + 3, (TOKENS,), generator=gen)
    hidden = torch.tanh(embedding(tokens))  # a tiny "model" on top of the embedding
    loss = locakd.linear_token_distill_loss(hidden, embedding.weight[:VOCAB], ht, wt, labels, chunk_size=7)
    loss.backward()
    fused_grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    hidden = torch.tanh(embedding(tokens))
    unfused = locakd.token_distill_loss(hidden @ embedding.weight[:VOCAB].T, ht @ wt.T, labels)
    unfused.backward()
    # two float32 computations of the same math: the fused one's dZ error (see _tolerances) through
    # W and the embedding lookup (each embedding row gets the sum over its tokens' rows)
    value_tol, dz_tol, _ = _tolerances(tensors, labels, 1.0, natural_per_row=2.0)
    torch.testing.assert_close(loss.detach(), unfused.detach(), rtol=RTOL32, atol=2 * value_tol)
    bound = 2 * dz_tol * (float(embedding.weight.detach().abs().sum(0).max()) + TOKENS)
    torch.testing.assert_close(fused_grad, embedding.weight.grad, rtol=RTOL32, atol=bound)


def test_no_logit_tensor_larger_than_a_chunk(monkeypatch):
    shapes = []
    original = linear_module._Head.project

    def spy(self, rows, start, stop, weight32, bias32, out):
        shapes.append(tuple(out.shape))
        return original(self, rows, start, stop, weight32, bias32, out)

    monkeypatch.setattr(linear_module._Head, "project", spy)
    tensors, labels = _inputs(tokens=60)
    hs, ws, bs, ht, wt, bt = (None if t is None else t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors))
    locakd.linear_token_distill_loss(hs, ws, ht, wt, labels, chunk_size=8, student_bias=bs, teacher_bias=bt).backward()
    assert shapes and all(rows <= 8 for rows, _ in shapes)


def test_all_ignored_batch_gives_zero_that_backpropagates():
    tensors, labels = _inputs()
    hs, ws, bs, ht, wt, bt = (None if t is None else t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors))
    loss = locakd.linear_token_distill_loss(hs, ws, ht, wt, torch.full_like(labels, IGNORE), loca_alpha=0.9,
                                            student_bias=bs, teacher_bias=bt, normalizer=10)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(float(t.grad.abs().max()) == 0 for t in (hs, ws, bs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_half_precision_inputs_accumulate_in_float32(dtype, divergence):
    """fp16/bf16 hidden states and weights are upcast exactly and projected in float32, so the
    value equals the float32 computation on the upcast copies; gradients come back in the dtype."""
    tensors, labels = _inputs(dtype=dtype)
    leaves = [None if t is None else t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors)]
    hs, ws, bs, ht, wt, bt = leaves
    value = locakd.linear_token_distill_loss(hs, ws, ht, wt, labels, divergence, loca_alpha=0.9,
                                             student_bias=bs, teacher_bias=bt)
    value.backward()
    up = [None if t is None else t.float().requires_grad_(i < 3) for i, t in enumerate(tensors)]
    value32 = locakd.linear_token_distill_loss(up[0], up[1], up[3], up[4], labels, divergence, loca_alpha=0.9,
                                               student_bias=up[2], teacher_bias=up[5])
    value32.backward()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.detach(), value32.detach(), rtol=0, atol=0)  # the same float32 math
    info = torch.finfo(dtype)
    for got, g32 in zip(leaves[:3], up[:3], strict=True):
        assert got.grad.dtype == dtype
        # the float32 gradient rounded to the dtype: half an ulp of it
        torch.testing.assert_close(got.grad.float(), g32.grad.to(dtype).float(), rtol=0, atol=info.tiny * info.eps)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loca_alpha", [None, 0.9])
def test_logits_of_1e4_stay_finite(divergence, loca_alpha):
    gen = torch.Generator().manual_seed(2)
    sign = lambda shape: (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float()  # noqa: E731
    hs = sign((12, 1)).requires_grad_(True)
    ws = (sign((24, 1)) * 1e4).requires_grad_(True)
    ht, wt = sign((12, 1)), sign((24, 1)) * 1e4
    labels = torch.randint(0, 24, (12,), generator=gen)
    loss = locakd.linear_token_distill_loss(hs, ws, ht, wt, labels, divergence, loca_alpha=loca_alpha, chunk_size=5)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert bool(torch.isfinite(hs.grad).all()) and bool(torch.isfinite(ws.grad).all())


def test_clear_errors():
    (hs, ws, bs, ht, wt, bt), labels = _inputs()
    call = locakd.linear_token_distill_loss
    with pytest.raises(InputError, match="student_weight must be"):
        call(hs, ws[:, :5], ht, wt, labels)
    with pytest.raises(InputError, match="crop"):
        call(hs, ws[:-2], ht, wt, labels)
    with pytest.raises(InputError, match="must agree"):
        call(hs[:-1], ws, ht, wt, labels)
    with pytest.raises(InputError, match="labels shape"):
        call(hs, ws, ht, wt, labels[:-1])
    bad = labels.clone()
    bad[1] = VOCAB
    with pytest.raises(InputError, match="out of range"):
        call(hs, ws, ht, wt, bad)
    nan = hs.clone()
    nan[3, 2] = math.nan
    with pytest.raises(InputError, match="student_hidden contains 1 NaN"):
        call(nan, ws, ht, wt, labels)
    with pytest.raises(InputError, match="student_bias must have shape"):
        call(hs, ws, ht, wt, labels, student_bias=bs[:-1])
    with pytest.raises(InputError, match="unknown divergence"):
        call(hs, ws, ht, wt, labels, "kl")
    with pytest.raises(InputError, match="chunk_size"):
        call(hs, ws, ht, wt, labels, chunk_size=0)
