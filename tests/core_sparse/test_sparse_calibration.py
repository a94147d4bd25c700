"""The top-k (cached teacher) calibration equals the dense one on every stored entry."""

import math

import pytest
import torch

import locakd
from locakd import InputError, loca_calibrate_sparse, loca_log_calibrate

EPS64 = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
def test_sparse_matches_dense_on_stored_entries(k, alpha):
    generator = torch.Generator().manual_seed(k)
    logits = torch.randn(64, 50, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (64,), generator=generator)
    labels[:5] = -100
    log_p = torch.log_softmax(logits, -1)
    top, index = log_p.topk(k, dim=-1)
    label_lp = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    calibrated, label_out, log_scale = loca_calibrate_sparse(top, index, label_lp, labels, alpha)
    dense = loca_log_calibrate(logits, labels, alpha)
    valid = labels != -100
    # float64 on both sides, the same formula on log-probs bounded by zmax = 2 max|z| + log C: the
    # inputs differ only by the dense path's own log_softmax rounding, 16 float64 ulps of (1 + zmax)
    zmax = 2 * float(logits.abs().max()) + math.log(50)
    atol = 16 * EPS64 * (1 + zmax)
    torch.testing.assert_close(calibrated[valid], dense.gather(-1, index)[valid], rtol=0, atol=atol)
    torch.testing.assert_close(
        label_out[valid], dense.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid], rtol=0, atol=atol
    )
    # The unstored tail scales by s too: dense tail mass = s * teacher tail mass.
    mask = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, index, False)
    mask &= torch.ones_like(mask).scatter(-1, labels.clamp(min=0).unsqueeze(-1), False)
    tail_before = torch.where(mask, log_p.exp(), 0).sum(-1)
    tail_after = torch.where(mask, dense.exp(), 0).sum(-1)
    # sums of up to C probabilities <= 1, each carrying the log-prob rounding above
    torch.testing.assert_close(
        tail_after[valid], (tail_before * log_scale.exp())[valid], rtol=0, atol=atol * math.sqrt(50)
    )
    assert bool((log_scale[locakd.misinstruction_mask(logits, labels)] < 0).all())


def test_sparse_rejects_mismatched_shapes():
    top = torch.zeros(4, 3)
    with pytest.raises(InputError, match="topk_indices shape"):
        loca_calibrate_sparse(top, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="label_log_probs shape"):
        loca_calibrate_sparse(top, torch.zeros(4, 3, dtype=torch.long), torch.zeros(5), torch.zeros(4, dtype=torch.long))
