"""Compact fixed-width bit rows for the teacher cache (see :mod:`locakd.lm.cache` for the layout)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import DataError, InputError
from .records import TokenRecords

DEFAULT_VALUE_LEVELS = 128


class TeacherCacheError(DataError):
    """A teacher cache is missing, incomplete, corrupt, or does not match the run."""

# --------------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------------


def value_levels(num_levels: int, max_gap: float = 40.0, growth: float = 0.3) -> np.ndarray:
    """The quantisation table of ``x = log p_top - log p`` (nats below the row's top).

    Returns ``num_levels`` float64 values: ``0`` (exactly the top), ``num_levels - 2`` levels on
    ``(0, max_gap]`` and ``inf`` (probability 0). The spacing is ``c * min(exp(growth * x),
    exp(8 growth) (1 + x) / 9)``: a loss's sensitivity to an entry falls with its probability, but
    the probability mass of a typical next-token distribution is spread over the first ~10 nats
    below the top, so the step grows slowly (``growth`` = 0.3 minimises the loss error on Zipf-like
    distributions), and beyond ~8 nats it keeps a bounded *relative* precision (what reverse KL
    needs where the student has mass). ``c`` is set by the number of levels.
    """
    if num_levels < 4:
        raise InputError(f"value_levels needs at least 4 levels, got {num_levels}")
    inner = num_levels - 2
    xs = np.linspace(0.0, max_gap, 200_001)
    shape = np.minimum(np.exp(growth * xs), math.exp(8 * growth) * (1 + xs) / 9)
    density = np.concatenate([[0.0], np.cumsum(np.diff(xs) / shape[:-1])])
    density *= inner / density[-1]
    levels = np.interp(np.arange(1, inner + 1) - 0.5, density, xs)
    return np.concatenate([[0.0], levels, [math.inf]])


def _plan_words(bases: Sequence[int]) -> list[tuple[int, int, int]]:
    """Greedy groups of consecutive digits that fit one uint64 word: (start, stop, bit width)."""
    words, start, product = [], 0, 1
    for i, base in enumerate(bases):
        if product * base > 2**64:
            words.append((start, i, (product - 1).bit_length()))
            start, product = i, 1
        product *= base
    words.append((start, len(bases), (product - 1).bit_length()))
    return words


def _ef_bits(vocab: int, k: int, divisor: int) -> float:
    return k * math.log2(divisor) + k + (vocab - 1) // divisor


@dataclass(frozen=True)
class CacheCodec:
    """Fixed-width bit rows for (top-k ids, values, label slot, tail); see the module docstring."""

    vocab_size: int
    top_k: int
    num_levels: int = DEFAULT_VALUE_LEVELS
    max_gap: float = 40.0
    growth: float = 0.3

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or not 1 <= self.top_k <= self.vocab_size:
            raise InputError(f"cache codec: need 1 <= top_k ({self.top_k}) <= vocab_size ({self.vocab_size})")
        if not 4 <= self.num_levels <= 65536:
            raise InputError(f"cache codec: num_levels must be in [4, 65536], got {self.num_levels}")

    # ---- derived layout --------------------------------------------------------------------------
    @property
    def levels(self) -> np.ndarray:
        return value_levels(self.num_levels, self.max_gap, self.growth)

    @property
    def divisor(self) -> int:
        """Elias-Fano split ``id = hi * D + lo``: the D that minimises the id bits."""
        k, v = self.top_k, self.vocab_size
        best = max(1, round(v * math.log(2) / k))
        candidates = range(max(1, best // 2), max(2, best * 2) + 1)
        return min(candidates, key=lambda d: (_ef_bits(v, k, d), d))

    @property
    def high_bits(self) -> int:
        return self.top_k + (self.vocab_size - 1) // self.divisor

    def _bases(self) -> list[int]:
        k = self.top_k
        return [self.divisor] * k + [self.num_levels] * (k + 1)

    @property
    def row_bits(self) -> int:
        return sum(width for _, _, width in _plan_words(self._bases())) + self.high_bits

    @property
    def row_bytes(self) -> int:
        return (self.row_bits + 7) // 8

    def to_dict(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "top_k": self.top_k, "num_levels": self.num_levels,
                "max_gap": self.max_gap, "growth": self.growth, "row_bytes": self.row_bytes,
                "levels": [float(x) for x in self.levels[1:-1]]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheCodec:
        codec = cls(int(data["vocab_size"]), int(data["top_k"]), int(data["num_levels"]),
                    float(data["max_gap"]), float(data["growth"]))
        stored = np.asarray(data.get("levels", []), dtype=np.float64)
        if stored.shape != codec.levels[1:-1].shape or not np.array_equal(stored, codec.levels[1:-1]):
            raise TeacherCacheError("the cache's value levels differ from this locakd's codec (another version?)")
        return codec

    # ---- quantisation ---------------------------------------------------------------------------
    def _quantise(self, gap: np.ndarray) -> np.ndarray:
        """Codes of ``gap`` >= 0 (inf allowed): 0 only for an exact 0, the last code for inf."""
        levels = self.levels
        inner = levels[1:-1]
        mids = (inner[1:] + inner[:-1]) / 2
        codes = np.searchsorted(mids, gap) + 1
        codes = np.where(gap <= 0, 0, codes)
        return np.where(np.isinf(gap), self.num_levels - 1, codes).astype(np.int64)

    # ---- encode ---------------------------------------------------------------------------------
    def encode(self, records: TokenRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows [N, row_bytes] uint8, outside_rows [M] int64, outside_codes [M] int64)``.

        ``outside_*`` hold the label codes of the rows whose label is not among the stored ids.
        """
        k, n = self.top_k, records.num_tokens
        if tuple(records.topk_ids.shape) != (n, k):
            raise InputError(f"cache codec for k={k}: records hold top-k of shape {tuple(records.topk_ids.shape)}")
        ids = records.topk_ids.cpu().numpy().astype(np.int64)
        if n and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"top-k ids out of range for the codec's vocabulary of {self.vocab_size}")
        values = records.topk_logprobs.cpu().numpy().astype(np.float64)
        labels = records.labels.cpu().numpy().astype(np.int64)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        values = np.take_along_axis(values, order, axis=1)
        top = values.max(axis=1, initial=-math.inf, keepdims=True) if k else np.zeros((n, 1))
        codes = self._quantise(np.where(np.isneginf(values), math.inf, top - values))
        tail = records.tail_logprob.cpu().numpy().astype(np.float64)
        tail_code = self._quantise(np.where(np.isneginf(tail), math.inf, -tail))
        label_lp = records.label_logprob.cpu().numpy().astype(np.float64)
        outside = np.flatnonzero(~(ids == labels[:, None]).any(axis=1))
        label_gap = top[outside, 0] - label_lp[outside]
        outside_codes = self._quantise(np.where(np.isneginf(label_lp[outside]), math.inf, np.maximum(label_gap, 0)))

        divisor = self.divisor
        digits = np.concatenate([ids % divisor, codes, tail_code[:, None]], axis=1)
        bits = [self._digits_to_bits(digits)]
        high = np.zeros((n, self.high_bits), dtype=np.uint8)
        np.put_along_axis(high, ids // divisor + np.arange(k), 1, axis=1)
        bits.append(high)
        rows = np.packbits(np.concatenate(bits, axis=1), axis=1, bitorder="little")
        return rows, outside.astype(np.int64), outside_codes

    def _digits_to_bits(self, digits: np.ndarray) -> np.ndarray:
        bases = self._bases()
        out = []
        for start, stop, width in _plan_words(bases):
            word = np.zeros(digits.shape[0], dtype=np.uint64)
            for j in range(stop - 1, start - 1, -1):  # Horner: d_start + b_start * (d_start+1 + ...)
                word = word * np.uint64(bases[j]) + digits[:, j].astype(np.uint64)
            shifts = np.arange(width, dtype=np.uint64)
            out.append(((word[:, None] >> shifts) & np.uint64(1)).astype(np.uint8))
        return np.concatenate(out, axis=1)

    # ---- decode ---------------------------------------------------------------------------------
    def decode(self, rows: np.ndarray, label_outside: np.ndarray | None = None,
               outside_codes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Inverse of :meth:`encode` for ``rows [N, row_bytes]``.

        ``label_outside`` ``[N]`` bool marks the rows whose label is not stored and ``outside_codes``
        ``[N]`` holds their label codes (any value elsewhere); both from the shard's side table.
        Returns float32 ``topk_logprobs`` (largest first; ties in id order), int64 ``topk_ids``,
        ``tail_logprob`` and ``label_logprob`` (``-inf`` on rows whose label is stored: its value is
        the stored entry's, which the sparse losses use).
        """
        k, n = self.top_k, rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != self.row_bytes:
            raise TeacherCacheError(f"cache rows have shape {rows.shape}, the codec expects [N, {self.row_bytes}]")
        bits = np.unpackbits(rows, axis=1, count=self.row_bits, bitorder="little")
        bases = self._bases()
        digits = np.empty((n, len(bases)), dtype=np.int64)
        col = 0
        for start, stop, width in _plan_words(bases):
            weights = np.left_shift(np.uint64(1), np.arange(width, dtype=np.uint64))
            word = (bits[:, col:col + width].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
            col += width
            for j in range(start, stop):
                base = np.uint64(bases[j])
                digits[:, j] = (word % base).astype(np.int64)
                word = word // base
        high = bits[:, col:col + self.high_bits]
        r, c = np.nonzero(high)
        if r.shape[0] != n * k or (np.bincount(r, minlength=n) != k).any():
            raise TeacherCacheError("corrupt cache rows (the id index does not hold k ids per row)")
        ids = (c.reshape(n, k) - np.arange(k)) * self.divisor + digits[:, :k]
        codes, tail_code = digits[:, k:2 * k], digits[:, 2 * k]
        if (ids >= self.vocab_size).any():
            raise TeacherCacheError("corrupt cache rows (a token id is out of range)")
        levels = self.levels
        gaps = levels[codes]
        outside = np.zeros(n, dtype=bool) if label_outside is None else np.asarray(label_outside, dtype=bool)
        label_gap = np.full(n, math.inf)
        if outside.any():
            if outside_codes is None:
                raise TeacherCacheError("rows with a label outside the top k need their side-table codes")
            label_gap[outside] = levels[outside_codes[outside]]
        tail_lp = -levels[tail_code]  # -inf for the zero-mass code
        with np.errstate(divide="ignore"):
            stored_mass = np.log(-np.expm1(tail_lp))
            anchor = stored_mass - np.log(np.exp(-gaps).sum(axis=1) + np.exp(-label_gap))
        values = anchor[:, None] - gaps
        # Rank order from the values (stable: ties keep id order).
        order = np.argsort(-values, axis=1, kind="stable")
        return {"topk_ids": np.take_along_axis(ids, order, axis=1),
                "topk_logprobs": np.take_along_axis(values, order, axis=1).astype(np.float32),
                "label_logprob": (anchor - label_gap).astype(np.float32),
                "tail_logprob": tail_lp.astype(np.float32)}
