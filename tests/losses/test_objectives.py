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


# --------------------------------------------------------------------------- the fused lm-head form


def _heads(seed=0, b=3, length=17, vocab_s=47, vocab_t=45, hidden_s=12, hidden_t=9, shared=41):
    """Hidden states and heads of a student and a teacher with differently padded output layers."""
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(b, length, hidden_s, generator=g), torch.randn(b, length, hidden_t, generator=g)
    ws, wt = torch.randn(vocab_s, hidden_s, generator=g) * 0.6, torch.randn(vocab_t, hidden_t, generator=g) * 0.6
    bs, bt = torch.randn(vocab_s, generator=g) * 0.5, torch.randn(vocab_t, generator=g) * 0.5
    labels = torch.randint(0, shared, (b, length), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[2, 12:] = IGNORE_INDEX
    return (hs, ws, bs), (ht, wt, bt), labels


def _logits64(h, w, b):
    return h.double() @ w.double().T + b.double()


def _label_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The label's logit minus the largest other logit: a row can change between right and mis-instructed
    under a perturbation of each logit by e only if |margin| <= 2 e."""
    index = labels.clamp(min=0).unsqueeze(-1)
    label = logits.gather(-1, index).squeeze(-1)
    return label - logits.scatter(-1, index, float("-inf")).amax(-1)


def _projection_error(h, w, b) -> float:
    """16 ulps of the size of a float32 logit h @ W.T + b: its H products round independently (the root of
    their sum of squares) plus |b|; the fused and the unfused projection each stay within it."""
    size = (h.double().reshape(-1, h.shape[-1]) ** 2 @ (w.double() ** 2).T).sqrt().max() + b.double().abs().max()
    return 16 * EPS32 * float(size)


@pytest.mark.parametrize("method", [_Method("kd+loca", "forward_kl", True), _Method("jsd", "jsd", False)])
def test_fused_objective_equals_the_logits_objective_in_float64(method):
    """LMObjective.fused on hidden states + heads against the float64 objective on the logits they make:
    the shift, the shared-vocabulary crop (student head 47 rows, teacher 45, shared 41: CE over all 47, the
    divergence over the first 41), the CE / divergence weights, the normaliser, the biases, the gradients of
    the student's hidden states, weight and bias, and the teacher's mis-instruction count."""
    from locakd.calibration import misinstruction_mask
    from locakd.losses.objectives import HeadInputs
    from locakd.losses.token import token_distill_loss

    (hs, ws, bs), (ht, wt, bt), labels = _heads(seed=4)
    # the teacher is right on every third response token (the label is its top token): a count that mixed up
    # the models or the positions would differ
    top = _logits64(ht, wt, bt)[..., :41].argmax(-1).roll(1, dims=1)  # position t predicts the label at t + 1
    rigged = (torch.arange(labels.numel()).reshape(labels.shape) % 3 == 0) & (labels != IGNORE_INDEX)
    labels = torch.where(rigged, top, labels)
    objective = LMObjective(spec=method, kd_ratio=0.3, loca_alpha=0.8, temperature=1.5, chunk_size=7, vocab_size=41)
    h, w, b = (t.clone().requires_grad_(True) for t in (hs, ws, bs))
    n = float((labels[:, 1:] != IGNORE_INDEX).sum())
    terms = objective.fused(HeadInputs(h, w, b), labels, HeadInputs(ht, wt, bt), n, count_misinstructed=True)
    terms.loss.backward()

    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hs, ws, bs))
    zs64 = _logits64(h64, w64, b64)
    zs64.retain_grad()
    zt64 = _logits64(ht, wt, bt)
    s64, targets = zs64[:, :-1], labels[:, 1:]
    t64 = zt64[:, :-1]
    valid = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(s64[valid], targets[valid], reduction="sum")
    kd = token_distill_loss(s64[..., :41], t64[..., :41], targets, method.divergence,
                            loca_alpha=0.8 if method.loca else None, temperature=1.5, reduction="sum", chunk_size=None)
    expected = (0.7 * ce + 0.3 * kd) / n
    expected.backward()

    # per-token error: the log-prob rounding (_log_prob_tol) plus each logit's projection error e, which moves a
    # log-prob by at most 2 e (/ T <= 1 here); a mean over tokens keeps the per-token size, a sum grows to n times
    logprob_tol = _log_prob_tol(zs64.detach().float(), zt64.float()) + 2 * (_projection_error(hs, ws, bs)
                                                                   + _projection_error(ht, wt, bt))
    torch.testing.assert_close(terms.loss.double(), expected.detach(), rtol=0, atol=logprob_tol)
    torch.testing.assert_close(terms.ce_sum.double(), ce.detach(), rtol=0, atol=n * logprob_tol)
    torch.testing.assert_close(terms.kd_sum.double(), kd.detach(), rtol=0, atol=n * logprob_tol)
    # d loss / d logits: each entry is a probability-sized term / n; its error is at most 2 / n of the log-prob
    # error. The hidden / weight gradients multiply it by the other factor (summed over V or the rows), plus
    # the rounding of those sums (16 ulps of the sum of absolute products)
    dz64 = zs64.grad.reshape(-1, zs64.shape[-1])
    dz_tol = 2 / n * logprob_tol
    flat_h = hs.double().reshape(-1, hs.shape[-1])
    bounds = {
        "hidden": dz_tol * float(ws.double().abs().sum(0).max()) + 16 * EPS32 * float((dz64.abs() @ ws.double().abs()).max()),
        "weight": dz_tol * float(flat_h.abs().sum(0).max()) + 16 * EPS32 * float((dz64.abs().T @ flat_h.abs()).max()),
        "bias": dz_tol * flat_h.shape[0] + 16 * EPS32 * float(dz64.abs().sum(0).max()),
    }
    for name, got, want in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad), ("bias", b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=bounds[name], msg=name)
    assert float(h.grad[:, -1].abs().max()) == 0  # the last position predicts nothing

    # mis-instruction: the label's logit below the row max; a row whose margin is within the projection error
    # could go either way in float32, so the count must lie between the clear and the possible cases
    mis64 = misinstruction_mask(t64[..., :41], targets)
    close = valid & (_label_margin(t64[..., :41], targets).abs() <= 2 * _projection_error(ht, wt, bt))
    count = float(terms.n_misinstructed)
    assert float((mis64 & ~close).sum()) <= count <= float((mis64 | close).sum())
    assert 0 < count < n


def test_head_cross_entropy_and_misinstruction_count_equal_the_logits_forms():
    from locakd.calibration import misinstruction_mask
    from locakd.losses.objectives import head_cross_entropy_sum, head_misinstructed_count

    (hs, ws, bs), _, labels = _heads(seed=6, vocab_s=41)
    hidden, targets = hs[:, :-1], labels[:, 1:]
    z64 = _logits64(hidden, ws, bs)
    valid = targets != IGNORE_INDEX
    n = float(valid.sum())
    ce64 = torch.nn.functional.cross_entropy(z64[valid], targets[valid], reduction="sum")
    logprob_tol = _log_prob_tol(z64.float()) + 2 * _projection_error(hs, ws, bs)
    for chunk in (None, 5):
        got = head_cross_entropy_sum(hidden, ws, targets, bs, chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ce64, rtol=0, atol=n * logprob_tol)
        # the teacher is right on some rows: make the label the top logit of every third valid row
        rigged = targets.clone()
        rigged[valid] = torch.where(torch.arange(int(n)) % 3 == 0, z64.argmax(-1)[valid], targets[valid])
        count = float(head_misinstructed_count(hidden, ws, rigged, bs, chunk))
        close = valid & (_label_margin(z64, rigged).abs() <= 2 * _projection_error(hs, ws, bs))
        mis = misinstruction_mask(z64, rigged)
        assert float((mis & ~close).sum()) <= count <= float((mis | close).sum())
        assert 0 < count < n


def test_fused_objective_refuses_what_it_cannot_compute():
    from locakd.errors import ConfigError
    from locakd.losses.objectives import HeadInputs

    (hs, ws, bs), (ht, wt, bt), labels = _heads(seed=1)
    student, teacher = HeadInputs(hs, ws, bs), HeadInputs(ht, wt, bt)
    with pytest.raises(ConfigError, match="cross-entropy only"):
        LMObjective(spec=_Method("sft", None, False)).fused(student, labels, teacher, 1.0)
    kd = LMObjective(spec=_Method("kd", "forward_kl", False))
    with pytest.raises(InputError, match="47 rows, the teacher's 45: pass vocab_size"):
        kd.fused(student, labels, teacher, 1.0)
    with pytest.raises(InputError, match="do not align"):
        kd.fused(student, labels[:, :-1], teacher, 1.0)
    with pytest.raises(InputError, match="cannot crop the teacher's output layer with 45 rows to a vocabulary of 46"):
        LMObjective(spec=_Method("kd", "forward_kl", False), vocab_size=46).fused(student, labels, teacher, 1.0)
