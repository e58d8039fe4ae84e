"""What histogram observers keep (:class:`Histogram`), and how statistics merge across processes
(:class:`StatisticsReducer`: ``deployq.train.distributed`` implements it with ``all_reduce``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class StatisticsReducer(Protocol):
    """Combines an array element-wise across processes; every process receives the result.

    All processes call the same methods in the same order with arrays of the same shape.
    """

    def min(self, values: np.ndarray) -> np.ndarray: ...

    def max(self, values: np.ndarray) -> np.ndarray: ...

    def sum(self, values: np.ndarray) -> np.ndarray: ...



class Histogram:
    """Per-channel histograms with `bins` equal bins over a range [lo, hi] that grows with the data."""

    def __init__(self, bins: int) -> None:
        if bins < 16:
            raise ValueError(f"histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.counts: np.ndarray | None = None  # (C, bins) float64
        self.lo: np.ndarray | None = None  # histogram range, per channel
        self.hi: np.ndarray | None = None
        self.data_lo: np.ndarray | None = None  # exact extremes of the data
        self.data_hi: np.ndarray | None = None

    def add(self, x2d: torch.Tensor) -> None:
        x2d = x2d.detach().cpu()  # the histogram lives in host memory, whatever device the model runs on
        blo, bhi = x2d.amin(dim=1).double().numpy(), x2d.amax(dim=1).double().numpy()
        if self.counts is None:
            self.data_lo, self.data_hi = blo, bhi
            self.lo, self.hi = blo, np.where(bhi > blo, bhi, blo + 1e-12)
            self.counts = np.zeros((x2d.shape[0], self.bins))
        elif np.any(blo < self.lo) or np.any(bhi > self.hi):
            self._rebin(np.minimum(self.lo, blo), np.maximum(self.hi, bhi))
        self.data_lo, self.data_hi = np.minimum(self.data_lo, blo), np.maximum(self.data_hi, bhi)
        lo = torch.from_numpy(self.lo).float()[:, None]
        width = torch.from_numpy((self.hi - self.lo) / self.bins).float()[:, None]
        idx = torch.clamp(((x2d - lo) / width).floor().long(), 0, self.bins - 1)
        offsets = torch.arange(x2d.shape[0])[:, None] * self.bins
        counts = torch.bincount((idx + offsets).reshape(-1), minlength=x2d.shape[0] * self.bins)
        self.counts += counts.reshape(x2d.shape[0], self.bins).double().numpy()

    def reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        """Agree on the common range (MIN of the lower ends, MAX of the upper ends), re-bin the
        local counts to it, then sum the counts; the exact data extremes merge by MIN / MAX."""
        empty = self.counts is None
        low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
        lo = reducer.min(low if empty else self.lo)
        hi = reducer.max(high if empty else self.hi)
        data_lo = reducer.min(low if empty else self.data_lo)
        data_hi = reducer.max(high if empty else self.data_hi)
        if not np.isfinite(lo).all():
            return  # no process saw any data
        if empty:
            self.counts, self.lo, self.hi = np.zeros((channels, self.bins)), lo, hi
        elif not (np.array_equal(lo, self.lo) and np.array_equal(hi, self.hi)):
            self._rebin(lo, hi)
        self.counts = reducer.sum(self.counts)
        self.data_lo, self.data_hi = data_lo, data_hi

    def _rebin(self, lo: np.ndarray, hi: np.ndarray) -> None:
        new = np.zeros_like(self.counts)
        for c in range(self.counts.shape[0]):
            old_edges = np.linspace(self.lo[c], self.hi[c], self.bins + 1)
            cdf = np.concatenate([[0.0], np.cumsum(self.counts[c])])
            new_edges = np.linspace(lo[c], hi[c], self.bins + 1)
            new[c] = np.diff(np.interp(new_edges, old_edges, cdf))
        self.counts, self.lo, self.hi = new, lo, hi

    def edges(self, c: int) -> np.ndarray:
        return np.linspace(self.lo[c], self.hi[c], self.bins + 1)

    def centers(self, c: int) -> np.ndarray:
        e = self.edges(c)
        return (e[:-1] + e[1:]) / 2

    def quantile(self, c: int, q: float) -> float:
        cdf = np.concatenate([[0.0], np.cumsum(self.counts[c])])
        return float(np.interp(q * cdf[-1], cdf, self.edges(c)))
