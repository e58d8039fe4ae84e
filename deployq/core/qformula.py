"""The one quantization formula of deployq (docs/design.md, contract 2), for torch and for numpy.

    q  = clamp(rint(x / s) + zp, qmin, qmax)        rint: round half to even; "/": true division
    x̂ = (q - zp) · s

This is exactly onnxruntime's QuantizeLinear / DequantizeLinear. ``torch.fake_quantize_*``
multiplies by 1/s instead of dividing and disagrees by one step on many half-way ties, so it is
never used. The rounding happens *before* the zero point is added: rint(x/s + zp) is not the same
number in float32 when x/s lies within an ulp of a tie.

Everything that quantizes - the fake quantizers in training, the exporter writing integer
initializers, the bias rule, the parity checks - goes through the functions here.
"""

from __future__ import annotations

import warnings
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


class ZeroRangeWarning(UserWarning):
    """A quant point whose observed values were all 0 got a default range instead of an error."""

MIN_BITS, MAX_BITS = 2, 16
# int32 bias codes are clamped to ±2^30 (exact in float32): an integer kernel adds the bias to an
# int32 accumulator of up to ~2^25 (u8 x s8 products over a few hundred taps), which must not wrap.
INT32_QMIN, INT32_QMAX = -(2**30), 2**30


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-wide code: signed -> [-2^(b-1), 2^(b-1)-1], unsigned -> [0, 2^b-1]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class CodeRange:
    """``qmin`` / ``qmax`` of a record with ``bits`` and ``signed`` (a spec, a quant point), from
    :func:`qrange`: the one place they are computed."""

    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]


def broadcast_shape(ndim: int, axis: int | None) -> list[int]:
    """Shape that makes a per-channel vector broadcast along `axis` of an `ndim`-d tensor."""
    if axis is None:
        return [1] * ndim
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _align(p: ArrayLike, ndim: int, axis: int | None) -> ArrayLike:
    if axis is None or p.ndim == 0 or ndim == 0:
        return p
    return p.reshape(broadcast_shape(ndim, axis))


# ---------------------------------------------------------------------------------------- torch


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor:
    """Integer codes (as a float tensor) of `x`: clamp(rint(x / s) + zp, qmin, qmax)."""
    s, zp = _align(scale, x.ndim, axis), _align(zero_point, x.ndim, axis)
    return torch.clamp(torch.round(x / s) + zp, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    s, zp = _align(scale, q.ndim, axis), _align(zero_point, q.ndim, axis)
    return (q - zp) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize, no gradient tricks (the reference forward)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


# ---------------------------------------------------------------------------------------- numpy


def quantize_np(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                axis: int | None = None) -> np.ndarray:
    """numpy twin of :func:`quantize`, in float32; returns int64 codes."""
    x = np.asarray(x, dtype=np.float32)
    s = _align(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = _align(np.asarray(zero_point, dtype=np.float32), x.ndim, axis)
    return np.clip(np.rint(x / s) + zp, qmin, qmax).astype(np.int64)


def dequantize_np(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                  axis: int | None = None) -> np.ndarray:
    q = np.asarray(q)
    s = _align(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zp = _align(np.asarray(zero_point, dtype=np.float32), q.ndim, axis)
    return ((q.astype(np.float32) - zp) * s).astype(np.float32)


# ------------------------------------------------------------------------------- qparams / bias


def qparams_from_range(min_val: ArrayLike, max_val: ArrayLike, qmin: int, qmax: int,
                       symmetric: bool, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float32, int64 arrays) that cover [min_val, max_val].

    symmetric: zp = 0 and s = max(|min|, |max|) / qmax (signed) or max / qmax (unsigned);
    affine:    the range is widened to contain 0, s = (max - min) / (qmax - qmin),
               zp = clamp(qmin - rint(min / s), qmin, qmax), so that 0.0 is exactly representable.
    A range of zero width (every value seen was 0, e.g. a classifier initialised to zeros) has no
    scale of its own: any scale represents 0 exactly, so it gets the range [-1, 1] ([0, 1] for
    unsigned symmetric codes) and a :class:`ZeroRangeWarning` naming `name`, never a zero scale.
    """
    lo = np.asarray(_as_numpy(min_val), dtype=np.float64)
    hi = np.asarray(_as_numpy(max_val), dtype=np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"{name}: range is not finite (min={lo}, max={hi}); the data has NaN or Inf")
    if np.any(lo > hi):
        raise ValueError(f"{name}: min > max in range (min={lo}, max={hi})")
    empty = (np.maximum(hi, 0.0) <= 0) if symmetric and qmin >= 0 else ((hi == lo) & (hi == 0))
    if np.any(empty):
        which = "" if empty.ndim == 0 else f" in {int(empty.sum())} of {empty.size} channels"
        warnings.warn(ZeroRangeWarning(f"{name}: every value seen{which} was 0; quantized with the range "
                                       "[-1, 1] there (0 stays exact)"), stacklevel=2)
        lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if qmin < 0 else np.maximum(hi, 0.0)
        scale = amax / qmax
        zero_point = np.zeros_like(scale)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.where(scale > 0, np.clip(qmin - np.rint(lo / safe), qmin, qmax), 0.0)
    scale32 = np.asarray(scale, dtype=np.float32)
    if np.any(scale32 <= 0) or not np.all(np.isfinite(scale32)):
        raise ValueError(f"{name}: range {lo}..{hi} gives a scale outside float32")
    return scale32, np.asarray(zero_point, dtype=np.int64)


def bias_scale(input_scale: ArrayLike, weight_scale: ArrayLike) -> ArrayLike:
    """Scale of the int32 bias that integer kernels add to the accumulator: s_in · s_w (float32)."""
    return input_scale * weight_scale


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 bias codes (as a float tensor) of a 1-D bias with its scale s_in·s_w (one per channel or
    one for all): :func:`quantize` with a zero point of 0, whose addition (exact) is left out."""
    return torch.clamp(torch.round(bias / scale), INT32_QMIN, INT32_QMAX)


def quantize_bias_np(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias codes rint(b / (s_in·s_w)), computed in float32 like the torch side."""
    return quantize_np(bias, scale, np.zeros_like(scale, dtype=np.float32), INT32_QMIN,
                       INT32_QMAX, axis=0).astype(np.int32)


def bias_is_quantized(input_bits: int | None, weight_bits: int) -> bool:
    """The bias is stored as int32 only where integer kernels consume it: 8-bit input and weights.

    Wider layers (the 10-bit head/tail) run as float emulation in onnxruntime, and s_in·s_w at
    16 bits can push a bias past the int32 range, so their bias stays float32.
    """
    return input_bits is not None and input_bits <= 8 and weight_bits <= 8


def _as_numpy(v: ArrayLike) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v)


def onnx_integer_dtype(bits: int, signed: bool) -> np.dtype:
    """Storage type of a code in ONNX: (u)int8 up to 8 bits, (u)int16 up to 16, int32 for bias."""
    if bits <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    if bits <= 16:
        return np.dtype(np.int16 if signed else np.uint16)
    raise ValueError(f"{bits}-bit codes have no ONNX QDQ type (at most 16 bits)")
