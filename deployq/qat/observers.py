"""Observers: estimate the range [min, max] a tensor should be quantized over.

An observer sees calibration batches through :meth:`Observer.update` and turns what it saw into a
range (per tensor, or per channel along ``axis``). The range becomes a scale and zero point in
exactly one place, :func:`deployq.core.qformula.qparams_from_range`.

| name          | range                                                                          |
|---------------|--------------------------------------------------------------------------------|
| ``minmax``    | smallest and largest value seen                                                |
| ``ema_minmax``| exponential moving average of per-batch min / max (``momentum``)              |
| ``percentile``| the ``lower`` / ``upper`` percentiles (default 0.01 / 99.99; the thesis drops 3%) |
| ``mse``       | the clipping range, shrunk from min/max, that minimizes quantization MSE       |
| ``kl``        | the clipping threshold minimizing KL(P || Q) of the histogram (TensorRT entropy) |
| ``probability``| [0, 1] whatever the data (a softmax's output: a certain choice, p = 1, kept)   |
| ``auto``      | ``minmax`` above 4 bits, ``mse`` at 4 bits or fewer (the default; qspec)       |

Histogram-based observers keep ``bins`` counts per channel over a range that grows with the data;
when a batch falls outside, the old counts are re-binned by interpolating their cumulative sum.
NaN / Inf in a batch, an observer that saw nothing, and a range of zero width are errors that
name the quant point.

Observers of several processes (a ``torchrun`` job, each rank seeing its own calibration batches)
merge their statistics with :meth:`Observer.reduce` before the range is computed, so every rank
ends with the same qparams: extremes by element-wise min / max, histograms by agreeing on a
common range, re-binning to it and summing the counts. The element-wise operations come from a
:class:`StatisticsReducer` (``deployq.train.distributed`` implements it with ``all_reduce``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from deployq.core.qformula import qparams_from_range
from deployq.core.qspec import QuantSpec
from deployq.core.registry import Registry
from deployq.qat.statistics import Histogram, StatisticsReducer

OBSERVERS: Registry[type["Observer"]] = Registry("observer")


def _per_channel_view(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(C, N) view of `x` (C = 1 per tensor), float32 on the CPU."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer(ABC):
    """Base class. Subclasses implement `_update(x2d)` and `_range()` (numpy arrays of shape C)."""

    def __init__(self, spec: QuantSpec, axis: int | None, name: str) -> None:
        self.spec = spec
        self.axis = axis if spec.per_channel else None
        self.name = name
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x2d = _per_channel_view(x, self.axis)
        if not torch.isfinite(x2d).all():
            bad = int((~torch.isfinite(x2d)).sum())
            raise ValueError(
                f"{self.name}: calibration batch {self.batches + 1} has {bad} NaN/Inf values; "
                "check the input data and the float model"
            )
        self._update(x2d)
        self.batches += 1

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.batches == 0:
            raise ValueError(
                f"{self.name}: no calibration data reached this quant point (empty calibration "
                "set, or a branch the calibration inputs never take)"
            )
        lo, hi = self._range()
        if self.axis is None:
            return np.asarray(lo).reshape(()), np.asarray(hi).reshape(())
        return np.asarray(lo), np.asarray(hi)

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.compute_range()
        return qparams_from_range(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric, self.name)

    def reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        """Merge what this observer saw with what the same observer saw in the other processes.

        `channels` is the number of ranges kept (1 per tensor), so that a process whose observer
        saw nothing still contributes arrays of the right shape. Afterwards every process holds
        the same statistics, as if one observer had seen the batches of all of them.
        """
        self._reduce(reducer, channels if self.axis is not None else 1)
        self.batches = int(reducer.sum(np.array([float(self.batches)]))[0])

    @abstractmethod
    def _update(self, x2d: torch.Tensor) -> None:
        """Take in one batch, as a (channels, values) float tensor."""

    @abstractmethod
    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) per channel from everything seen."""

    @abstractmethod
    def _reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        """Merge the statistics with the other processes' (see :meth:`reduce`)."""


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    def __init__(self, spec: QuantSpec, axis: int | None, name: str) -> None:
        super().__init__(spec, axis, name)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _update(self, x2d: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.min.double().cpu().numpy(), self.max.double().cpu().numpy()

    def _reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        """Global min / max: element-wise MIN and MAX (a process that saw nothing sends ±inf)."""
        seen = self.min is not None
        lo = reducer.min(self.min.double().cpu().numpy() if seen else np.full(channels, np.inf))
        hi = reducer.max(self.max.double().cpu().numpy() if seen else np.full(channels, -np.inf))
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            self.min, self.max = torch.from_numpy(lo).float(), torch.from_numpy(hi).float()


@OBSERVERS.register("ema_minmax")
class EMAMinMaxObserver(MinMaxObserver):
    """min/max tracked as m ← momentum·m + (1 − momentum)·batch (the first batch initializes)."""

    def __init__(self, spec: QuantSpec, axis: int | None, name: str, momentum: float = 0.9) -> None:
        super().__init__(spec, axis, name)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{name}: ema_minmax momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def _update(self, x2d: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            m = self.momentum
            self.min = m * self.min + (1 - m) * lo
            self.max = m * self.max + (1 - m) * hi

    def _reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        """Moving averages do not merge exactly: the result is the per-process averages weighted
        by the number of batches each process saw."""
        weight = float(self.batches) if self.min is not None else 0.0
        zeros = np.zeros(channels)
        lo = reducer.sum(self.min.double().cpu().numpy() * weight if weight else zeros)
        hi = reducer.sum(self.max.double().cpu().numpy() * weight if weight else zeros)
        total = float(reducer.sum(np.array([weight]))[0])
        if total > 0:
            self.min, self.max = torch.from_numpy(lo / total).float(), torch.from_numpy(hi / total).float()


@OBSERVERS.register("probability")
class ProbabilityObserver(MinMaxObserver):
    """[0, 1] in 2ᵇ − 1 steps whatever the data, p = 1 kept (docs/design.md: why not a calibrated range)."""

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        symmetric = self.spec.signed and self.spec.symmetric
        lo, hi = (-1.0, 1.0) if symmetric else (0.0, 1.0)
        return np.full(self.min.numel(), lo), np.full(self.min.numel(), hi)


class _HistogramObserver(Observer):
    def __init__(self, spec: QuantSpec, axis: int | None, name: str, bins: int = 2048) -> None:
        super().__init__(spec, axis, name)
        self.hist = Histogram(bins)

    def _update(self, x2d: torch.Tensor) -> None:
        self.hist.add(x2d)

    def _reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        self.hist.reduce(reducer, channels)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel; a channel whose every value was the same keeps that (zero-width) range."""
        h = self.hist
        pairs = [(h.data_lo[c], h.data_hi[c]) if h.data_lo[c] == h.data_hi[c] else self._channel_range(c)
                 for c in range(h.counts.shape[0])]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    @abstractmethod
    def _channel_range(self, c: int) -> tuple[float, float]:
        """(min, max) of channel `c` from its histogram."""


@OBSERVERS.register("percentile")
class PercentileObserver(_HistogramObserver):
    """Range between the `lower` and `upper` percentiles (in %) of everything seen."""

    def __init__(self, spec: QuantSpec, axis: int | None, name: str, lower: float = 0.01,
                 upper: float = 99.99, bins: int = 2048) -> None:
        super().__init__(spec, axis, name, bins)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"{name}: percentile needs 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def _channel_range(self, c: int) -> tuple[float, float]:
        return self.hist.quantile(c, self.lower / 100), self.hist.quantile(c, self.upper / 100)


def _fake_quant_error(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float,
                      spec: QuantSpec) -> float:
    """Σ count · (x̂ − x)² of the bin centers quantized over [lo, hi] (the histogram's MSE)."""
    try:
        scale, zp = qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    except ValueError:
        return math.inf
    s, z = float(scale), float(zp)
    q = np.clip(np.rint(centers / s) + z, spec.qmin, spec.qmax)
    return float(np.sum(counts * ((q - z) * s - centers) ** 2))


@OBSERVERS.register("mse")
class MSEObserver(_HistogramObserver):
    """Clipping range [t·min, t·max], t searched on a grid in [`min_ratio`, 1], minimizing MSE."""

    def __init__(self, spec: QuantSpec, axis: int | None, name: str, steps: int = 100,
                 min_ratio: float = 0.2, bins: int = 2048) -> None:
        super().__init__(spec, axis, name, bins)
        self.ratios = np.linspace(min_ratio, 1.0, steps)

    def _channel_range(self, c: int) -> tuple[float, float]:
        centers, counts = self.hist.centers(c), self.hist.counts[c]
        lo, hi = float(self.hist.lo[c]), float(self.hist.hi[c])
        errors = [_fake_quant_error(centers, counts, t * lo, t * hi, self.spec) for t in self.ratios]
        t = float(self.ratios[int(np.argmin(errors))])
        return t * lo, t * hi

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_channel_range` of every channel at once, on the bins that hold values only (a
        per-channel weight is one array operation per ratio, not one per channel and ratio); a
        ratio whose range has no float32 scale in some channel is scored channel by channel."""
        h = self.hist
        flat = h.data_lo == h.data_hi  # one value seen: that value is the range (the base class's rule)
        lo, hi = np.where(flat, -1.0, h.lo), np.where(flat, 1.0, h.hi)
        edges = np.linspace(lo, hi, h.bins + 1, axis=1)
        channel, bin_ = np.nonzero(h.counts)
        centers, counts = ((edges[:, :-1] + edges[:, 1:]) / 2)[channel, bin_], h.counts[channel, bin_]
        errors = np.empty((len(lo), len(self.ratios)))
        for i, t in enumerate(self.ratios):
            try:
                scale, zero_point = qparams_from_range(t * lo, t * hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
            except ValueError:
                errors[:, i] = [_fake_quant_error(h.centers(c), h.counts[c], t * lo[c], t * hi[c], self.spec)
                                for c in range(len(lo))]
                continue
            s, z = scale.astype(np.float64)[channel], zero_point.astype(np.float64)[channel]
            q = np.clip(np.rint(centers / s) + z, self.spec.qmin, self.spec.qmax)
            errors[:, i] = np.bincount(channel, counts * ((q - z) * s - centers) ** 2, minlength=len(lo))
        t = self.ratios[np.argmin(errors, axis=1)]
        return np.where(flat, h.data_lo, t * lo), np.where(flat, h.data_hi, t * hi)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _merged_and_spread(counts: np.ndarray, levels: int) -> np.ndarray:
    """`counts` merged into `levels` consecutive chunks (sizes as np.array_split gives them), each
    chunk's total spread evenly over its non-empty bins (empty bins stay 0)."""
    n = len(counts)
    sizes = np.full(levels, n // levels)
    sizes[: n % levels] += 1
    chunk = np.repeat(np.arange(levels), sizes)
    nonzero = counts > 0
    totals = np.bincount(chunk, weights=counts, minlength=levels)
    filled = np.bincount(chunk, weights=nonzero, minlength=levels)
    share = np.divide(totals, filled, out=np.zeros(levels), where=filled > 0)
    return np.where(nonzero, share[chunk], 0.0)


@OBSERVERS.register("kl")
class KLObserver(_HistogramObserver):
    """TensorRT-style entropy calibration on the histogram of |x|.

    For each candidate threshold T (a bin edge), P is the histogram clipped at T (outliers added to
    the last bin) and Q is P merged into as many levels as the code has on one side and spread back
    over the non-empty bins; the threshold with the smallest KL(P || Q) wins. The range is then
    [max(min, −T), min(max, T)]. At widths with more levels than bins, clipping cannot help and
    the full range is used.
    """

    def __init__(self, spec: QuantSpec, axis: int | None, name: str, bins: int = 2048) -> None:
        super().__init__(spec, axis, name, bins)
        self.min = MinMaxObserver(spec, axis, name)

    def _update(self, x2d: torch.Tensor) -> None:
        self.min._update(x2d)
        self.hist.add(x2d.abs())

    def _reduce(self, reducer: StatisticsReducer, channels: int) -> None:
        self.min._reduce(reducer, channels)
        self.hist.reduce(reducer, channels)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._channel_range(c) for c in range(self.hist.counts.shape[0])]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def _channel_range(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.min.min[c]), float(self.min.max[c])
        if lo == hi:
            return lo, hi
        levels = self.spec.qmax + 1 if self.spec.signed or self.spec.symmetric else (self.spec.qmax + 1) // 2
        counts = self.hist.counts[c]
        bins = len(counts)
        if levels * 2 > bins or counts.sum() == 0:
            return lo, hi
        best_i, best_kl = bins, math.inf
        for i in range(levels, bins + 1, max(1, (bins - levels) // 256)):
            p = counts[:i].copy()
            p[-1] += counts[i:].sum()
            q = _merged_and_spread(counts[:i], levels)
            if q[p > 0].min(initial=1.0) <= 0:
                continue
            kl = _kl_divergence(p / p.sum(), q / q.sum())
            if kl < best_kl:
                best_i, best_kl = i, kl
        threshold = float(self.hist.edges(c)[best_i])
        return max(lo, -threshold), min(hi, threshold)


def create_observer(spec: QuantSpec, axis: int | None, name: str) -> Observer:
    cls = OBSERVERS.get(spec.observer_name)
    try:
        return cls(spec, axis, name, **dict(spec.observer_args))
    except TypeError as err:
        raise ValueError(f"{name}: bad observer_args for {spec.observer_name!r}: {err}") from None
