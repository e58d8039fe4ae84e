"""Decibels, defined once: SQNR (``diff``, ``check``, the PTQ search) and PSNR (training metrics, the example).

    ratio_db(signal, noise) = 10·log10(signal / noise)       (+inf without noise, -inf without signal)
    psnr_db(mse, peak=1)    = ratio_db(peak², mse)
"""

from __future__ import annotations

import math


def ratio_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) of two energies (sums or means of squares alike)."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def psnr_db(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio of a mean squared error, for values in [0, peak]."""
    return ratio_db(peak * peak, mse)
