"""Teacher-cache records and codec: records against float64 math, round trip within the stated
quantisation bound, exact ties and zeros, sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cache_helpers import TOP_K, VOCAB, example_batch

from locakd import InputError
from locakd.lm.cache import CacheCodec, TeacherCacheError, TokenRecords, teacher_token_records, value_levels

F32_LOG = 1e-5  # float32 rounding of log-probs up to ~40 in magnitude: a few ulps (40 * 1.2e-7 * 2)


def _records(index=3, temperature=1.0):
    logits, labels = example_batch(index)
    return logits, labels, teacher_token_records(logits, labels, top_k=TOP_K, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_records_match_float64(temperature):
    logits, labels, rec = _records(5, temperature)
    valid = labels[0] != -100
    lp = torch.log_softmax(logits[0][valid].double() / temperature, dim=-1)
    top, ids = lp.topk(TOP_K, dim=-1)
    y = labels[0][valid]
    assert rec.tokens_per_example.tolist() == [int(valid.sum())]
    assert torch.equal(rec.labels, y)
    assert torch.equal(rec.topk_ids.sort(1).values, ids.sort(1).values)
    torch.testing.assert_close(rec.topk_logprobs.double(), top, rtol=0, atol=F32_LOG)
    torch.testing.assert_close(rec.label_logprob.double(), lp.gather(1, y[:, None]).squeeze(1), rtol=0, atol=F32_LOG)
    rest = lp.scatter(1, ids, -math.inf).scatter(1, y[:, None], -math.inf).logsumexp(1)
    torch.testing.assert_close(rec.tail_logprob.double(), rest, rtol=0, atol=F32_LOG)


def test_records_reject_bad_shapes():
    with pytest.raises(InputError, match="aligned"):
        teacher_token_records(torch.zeros(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="top_k"):
        teacher_token_records(torch.zeros(1, 3, 10), torch.zeros(1, 3, dtype=torch.long), top_k=11)


def _half_step(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Half the spacing of the quantisation levels around each x (0 for the exact codes 0 and inf)."""
    inner = levels[1:-1]
    i = np.clip(np.searchsorted(inner, x), 1, len(inner) - 1)
    step = np.maximum(inner[i] - inner[i - 1], inner[np.minimum(i + 1, len(inner) - 1)] - inner[i])
    step = np.where(x < inner[0], inner[0] * 2, step)  # (0, first level]: rounds to the first level
    return np.where((x == 0) | np.isinf(x), 0.0, step / 2)


def test_round_trip_within_the_quantisation_bound():
    parts = [teacher_token_records(*example_batch(i), top_k=TOP_K) for i in range(12)]
    rec = TokenRecords.concat(parts)
    codec = CacheCodec(VOCAB, TOP_K)
    rows, outside_rows, outside_codes = codec.encode(rec)
    assert rows.dtype == np.uint8 and rows.shape == (rec.num_tokens, codec.row_bytes)
    outside = np.zeros(rec.num_tokens, bool)
    outside[outside_rows] = True
    assert np.array_equal(outside, ~(rec.topk_ids == rec.labels[:, None]).any(1).numpy())
    codes = np.zeros(rec.num_tokens, np.int64)
    codes[outside_rows] = outside_codes
    dec = codec.decode(rows, outside, codes)

    # ids: the same set per row, bit for bit; compare values per id.
    order_true = rec.topk_ids.argsort(1)
    order_dec = np.argsort(dec["topk_ids"], axis=1)
    ids_true = rec.topk_ids.gather(1, order_true).numpy()
    assert np.array_equal(np.take_along_axis(dec["topk_ids"], order_dec, 1), ids_true)
    lp_true = rec.topk_logprobs.gather(1, order_true).double().numpy()
    lp_dec = np.take_along_axis(dec["topk_logprobs"], order_dec, 1).astype(np.float64)
    levels = value_levels(codec.num_levels)

    # 1) gaps below the row's top: within half a level step (exact for the top itself).
    gap_true = lp_true.max(1, keepdims=True) - lp_true
    gap_dec = lp_dec.max(1, keepdims=True) - lp_dec
    bound = _half_step(gap_true, levels)
    assert (np.abs(gap_dec - gap_true) <= bound + F32_LOG).all()
    assert (gap_dec[gap_true == 0] == 0).all()
    # 2) the tail: -log(tail mass) within half a step.
    tail_true = rec.tail_logprob.double().numpy()
    assert (np.abs(dec["tail_logprob"] - tail_true) <= _half_step(-tail_true, levels) + F32_LOG).all()
    # 3) absolute log-probs: the gap error plus the normaliser's, which is at most the largest gap
    #    error of the row plus the error of log(1 - tail).
    stored_err = np.abs(np.log1p(-np.exp(dec["tail_logprob"].astype(np.float64))) - np.log1p(-np.exp(tail_true)))
    anchor_bound = bound.max(1) + stored_err + F32_LOG
    assert (np.abs(lp_dec - lp_true) <= bound + anchor_bound[:, None] + F32_LOG).all()
    # 4) labels outside the top k: gap within half a step; decoded rows are normalised.
    lab_true = rec.label_logprob.double().numpy()[outside]
    top_true = lp_true.max(1)[outside]
    lab_gap_dec = lp_dec.max(1)[outside] - dec["label_logprob"][outside]
    assert (np.abs(lab_gap_dec - (top_true - lab_true)) <= _half_step(top_true - lab_true, levels) + F32_LOG).all()
    total = np.logaddexp(np.logaddexp.reduce(dec["topk_logprobs"].astype(np.float64), axis=1), dec["tail_logprob"])
    total = np.where(outside, np.logaddexp(total, dec["label_logprob"]), total)
    assert np.abs(total).max() <= 1e-5
    # rank order recomputed: largest first
    assert (np.diff(dec["topk_logprobs"], axis=1) <= 0).all()


def test_exact_ties_zeros_and_empty_tail():
    vocab, k = 40, 5
    logits = torch.randn(1, 6, vocab)
    logits[0, 0, :3] = 9.0  # three tokens tied at the top; the label is the third
    logits[0, 1, 5:] = -math.inf  # only 5 tokens have mass: zero tail
    logits[0, 2, 7:] = -math.inf  # 7 tokens with mass, k = 5: a two-token tail; the label (8) has none
    logits[0, 3, 1:] = -math.inf  # one token only: top-k holds 4 zero-probability entries
    labels = torch.tensor([[2, 0, 8, 0, 1, 3]])
    rec = teacher_token_records(logits, labels, top_k=k)
    codec = CacheCodec(vocab, k)
    rows, outside_rows, outside_codes = codec.encode(rec)
    outside = np.zeros(6, bool)
    outside[outside_rows] = True
    codes = np.zeros(6, np.int64)
    codes[outside_rows] = outside_codes
    dec = codec.decode(rows, outside, codes)
    top = dec["topk_logprobs"]
    assert (top[0, :3] == top[0, 0]).all()  # the tie survives exactly
    assert np.isneginf(dec["tail_logprob"][1]) and np.isneginf(dec["tail_logprob"][3])
    assert np.isneginf(top[3, 1:]).all() and top[3, 0] == 0.0
    assert np.isneginf(dec["label_logprob"][2])  # label 8 has probability 0 in row 2


def test_row_sizes_fit_the_target():
    # k = 128 rows stay within 320 bytes up to a 262144-token vocabulary.
    assert CacheCodec(262144, 128).row_bytes <= 320
    assert CacheCodec(152064, 128).row_bytes <= 310
    assert CacheCodec(50257, 128).row_bytes <= 285
    small = CacheCodec(50257, 32)
    assert small.row_bytes < CacheCodec(50257, 64).row_bytes < CacheCodec(50257, 128).row_bytes


def test_corrupt_rows_are_detected():
    rec = teacher_token_records(*example_batch(2), top_k=TOP_K)
    codec = CacheCodec(VOCAB, TOP_K)
    rows, _, _ = codec.encode(rec)
    broken = rows.copy()
    broken[:, -1] ^= 0xFF  # flip the last bits: the unary id index no longer holds k ones
    with pytest.raises(TeacherCacheError, match="corrupt"):
        codec.decode(broken, np.ones(rows.shape[0], bool), np.zeros(rows.shape[0], np.int64))
    with pytest.raises(TeacherCacheError, match="shape"):
        codec.decode(rows[:, :-1])


def test_codec_round_trips_through_its_manifest_entry():
    codec = CacheCodec(1000, 16, 64)
    assert CacheCodec.from_dict(codec.to_dict()) == codec
    entry = codec.to_dict()
    entry["levels"] = entry["levels"][:-1]
    with pytest.raises(TeacherCacheError, match="levels"):
        CacheCodec.from_dict(entry)
