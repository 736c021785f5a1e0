"""Splitting the logs by impression time: the cutoffs and each row's split.

The spec gives the validation and test cutoffs as timestamps, or as fractions of the impressions
(the last `test` share is test, the `valid` share before it validation). Fractions are turned
into timestamps with a `TimeHistogram` of every impression's time, merged from the parse tasks
and coarsened so it never holds more than TIME_BINS bins, whatever the input size. A row's split
follows from its own timestamp (`split_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from din_ray.data.logs.spec import LogSpec

# The impression-time histogram is coarsened (power-of-2 bins) to at most this many bins.
TIME_BINS = 1 << 18


@dataclass
class TimeHistogram:
    """Counts of timestamps in bins of width 2**shift (exact while shift == 0), coarsened so it
    never holds more than TIME_BINS bins: quantile cutoffs with bounded memory."""

    shift: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def of(cls, ts: np.ndarray) -> TimeHistogram:
        keys, counts = np.unique(ts, return_counts=True)
        return cls(0, keys, counts.astype(np.int64)).coarsened(TIME_BINS)

    def coarsened(self, limit: int, shift: int | None = None) -> TimeHistogram:
        h = self
        target = self.shift if shift is None else max(shift, self.shift)
        while True:
            if target > h.shift:
                keys, inv = np.unique(h.keys >> (target - h.shift), return_inverse=True)
                h = TimeHistogram(target, keys, np.bincount(inv, weights=h.counts,
                                                            minlength=len(keys)).astype(np.int64))
            if len(h.keys) <= limit:
                return h
            target += 1

    def merge(self, other: TimeHistogram) -> TimeHistogram:
        shift = max(self.shift, other.shift)
        a, b = self.coarsened(TIME_BINS, shift), other.coarsened(TIME_BINS, shift)
        keys, inv = np.unique(np.concatenate([a.keys, b.keys]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([a.counts, b.counts]),
                             minlength=len(keys)).astype(np.int64)
        return TimeHistogram(shift, keys, counts).coarsened(TIME_BINS)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def cut(self, fraction_before: float) -> int:
        """The earliest bin start t with at least `fraction_before` of the timestamps < t."""
        if self.total == 0:
            return 0
        before = np.cumsum(self.counts) - self.counts  # (K,) timestamps before each bin
        hit = np.flatnonzero(before >= fraction_before * self.total - 1e-9)
        key = self.keys[hit[0]] if hit.size else self.keys[-1] + 1
        return int(key) << self.shift


def split_codes(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """0 train (ts < valid_start), 1 valid, 2 test (ts >= test_start). -> int8 (N,)"""
    return np.where(ts < valid_start, 0, np.where(ts < test_start, 1, 2)).astype(np.int8)


def cutoffs(spec: LogSpec, hist: TimeHistogram) -> tuple[int, int]:
    """(valid_start, test_start): the spec's timestamps, or the times before which all but the
    `valid + test` and the `test` shares of the impressions in `hist` fall (no test share: the
    int64 maximum, no validation share: test_start)."""
    sp = spec.split
    if not sp.by_fraction:
        return int(sp.valid_start), int(sp.test_start)
    test_start = hist.cut(1.0 - sp.test) if sp.test > 0 else int(np.iinfo(np.int64).max)
    valid_start = hist.cut(1.0 - sp.test - sp.valid) if sp.valid > 0 else test_start
    return valid_start, test_start
