"""The autograd kernels under every fake quantizer: one ``torch.autograd.Function`` whose forward is
:mod:`deployq.core.qformula`'s formula and whose backward is the quantizer's gradient rule
(straight-through, LSQ / LSQ+ for scale and zero point, DSQ's soft rounding), computed in one pass
over grouped ``(outer, channels, inner)`` views. ``use_compiled_kernels`` swaps the gradient
functions for their torch.compile'd versions.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch

__all__ = ["FakeQuantize", "round_ste", "scale_gradient", "soft_round", "straight_through", "use_compiled_kernels"]


def straight_through(value: torch.Tensor, gradient_path: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `value`. Backward: the gradient of `gradient_path`.

    ``value + (g - g.detach())`` adds an exact 0.0, so the forward is bit-identical to `value`.
    """
    return value.detach() + (gradient_path - gradient_path.detach())


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """rint (half to even) forward, identity gradient (the straight-through estimator)."""
    return straight_through(torch.round(v), v)


def scale_gradient(p: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient reaching `p` is multiplied by `factor` (LSQ's g)."""
    return straight_through(p, p * factor)


def soft_round(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """DSQ's differentiable rounding in the integer domain (interval width Δ = 1).

    Within [i, i+1]: i + (φ + 1)/2 with φ = tanh(k(v − i − ½)) / tanh(k/2), k = log(2/α − 1).
    As α → 0, k → ∞ and this becomes round(v); α is the distance of φ from ±1 at the interval ends.
    """
    i = torch.floor(v).detach()
    k = torch.log(2.0 / alpha - 1.0)
    phi = torch.tanh(k * (v - i - 0.5)) / torch.tanh(0.5 * k)
    return i + 0.5 * (phi + 1.0)


def _ste_terms(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor,
               qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∂L/∂x, and the elementwise terms of ∂L/∂s and ∂L/∂zp, of x̂ with the straight-through rounding
    gradient; x and grad in the grouped (outer, C, inner) layout."""
    v = x / s
    r = torch.round(v)
    level = r + zp
    below = level < qmin
    inside = ~(below | (level > qmax))
    grad_x = torch.where(inside, grad, 0.0)
    grad_s = torch.where(inside, r - v, torch.where(below, qmin - zp, qmax - zp)) * grad
    grad_zp = torch.where(inside, 0.0, -s * grad)
    return grad_x, grad_s, grad_zp


def _dsq_terms(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, alpha: torch.Tensor,
               qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same with DSQ's soft-rounding slope, and the elementwise terms of ∂L/∂α."""
    v = x / s
    r = torch.round(v)
    level = r + zp
    below = level < qmin
    inside = ~(below | (level > qmax))
    k = torch.log(2.0 / alpha - 1.0)  # the scalars first: per element only multiplications remain
    half = torch.tanh(0.5 * k)
    dk = -2.0 / (alpha * (2.0 - alpha))  # ∂k/∂α
    u = v - torch.floor(v) - 0.5
    t = 1.0 - 2.0 / (torch.exp(2.0 * k * u) + 1.0)  # tanh(k·u): inductor's CPU tanh is ~2.7x slower than exp
    bell = 1.0 - t * t
    slope = bell * (0.5 * k / half)
    # ∂soft/∂α = ½·(u·bell·half − ½·t·(1 − half²)) / half² · ∂k/∂α
    dsoft_dalpha = u * bell * (0.5 * dk / half) - t * (0.25 * dk * (1.0 - half * half) / (half * half))
    grad_x = torch.where(inside, grad * slope, 0.0)
    grad_s = torch.where(inside, r - slope * v, torch.where(below, qmin - zp, qmax - zp)) * grad
    grad_zp = torch.where(inside, 0.0, -s * grad)
    grad_alpha = torch.where(inside, grad * s * dsoft_dalpha, 0.0)
    return grad_x, grad_s, grad_zp, grad_alpha


def _summed(terms: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """∂L/∂x as it is; ∂L/∂s and ∂L/∂zp summed to the qparams' (1, C, 1) shape; ∂L/∂α to a scalar."""
    return (terms[0], *(t.sum((0, 2), keepdim=True) for t in terms[1:3]), *(t.sum() for t in terms[3:]))


def _gradients_ste(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """∂L/∂x, ∂L/∂s, ∂L/∂zp with the straight-through rounding gradient (one fused loop when compiled)."""
    return _summed(_ste_terms(*args))


def _gradients_dsq(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same with DSQ's soft rounding, and ∂L/∂α."""
    return _summed(_dsq_terms(*args))


def _gradients(kind: str, cuda: bool, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The `kind` ("ste" or "dsq") gradients. On a CPU one kernel computes the terms and their sums.
    On CUDA only the elementwise terms are compiled and torch's own reduction sums them: inductor's
    fused reduction over the (outer, 1, inner) layout took 85 % of a QAT step's GPU time (H200,
    BENCHMARKS.md's QAT-on-a-GPU section)."""
    if not cuda:
        return _KERNELS[kind](*args)
    return _summed(_KERNELS[f"{kind}_terms"](*args))


def _fake_quantize_forward(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: torch.Tensor,
                           qmax: torch.Tensor) -> torch.Tensor:
    """(clamp(rint(x / s) + zp, qmin, qmax) − zp)·s: qformula's operations, in its order."""
    q = torch.clamp(torch.round(x / s) + zp, qmin, qmax)
    return (q - zp) * s


_RECOMPILE_LIMIT = 64
_EAGER = {"forward": _fake_quantize_forward, "ste": _gradients_ste, "dsq": _gradients_dsq,
          "ste_terms": _ste_terms, "dsq_terms": _dsq_terms}
_KERNELS = dict(_EAGER)  # compiled versions replace them, when asked


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the quantizers' forward and backward math through ``torch.compile`` (one fused loop each
    instead of 6 and ~25 tensor operations; ~7x faster on a CPU, after a one-time compilation of
    ~30 s) or eagerly.

    The compiled forward is bit-identical to the eager one: inductor's C++ keeps the true division
    and, by default, compiles without unsafe math (no reciprocal, no FMA contraction:
    ``torch._inductor.config.cpp.enable_unsafe_math_opt_flag`` is False and
    ``enable_floating_point_contract_flag`` is "off"); tests/test_quantizers.py checks it on ties.
    A platform where compilation fails falls back to the eager functions with a warning, at the
    first use."""
    if not enabled:
        _KERNELS.update(_EAGER)
        return
    # one compiled variant per kind of quant point (per-tensor or per-channel, weight or
    # activation, the sizes inductor picks its loops by): more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    for key, function in _EAGER.items():
        _KERNELS[key] = _compiled_or_eager(key, function)


def _compiled_or_eager(key: str, function: Callable) -> Callable:
    try:
        compiled = torch.compile(function, dynamic=True)
    except Exception as err:  # torch.compile itself unavailable on this platform
        warnings.warn(f"deployq: fused quantizer kernels not compiled ({type(err).__name__}: {err}); running eagerly")
        return function

    def run(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as err:  # no C++ compiler, an unsupported platform: compile fails at first use
            warnings.warn(f"deployq: fused quantizer kernels not compiled ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); running eagerly")
            _KERNELS[key] = function
            return function(*args)

    return run


class FakeQuantize(torch.autograd.Function):
    """x̂ = (clamp(rint(x/s) + zp, qmin, qmax) − zp)·s in one autograd node, with the closed-form
    gradients of the quantizers here (instead of the ~20 elementwise nodes autograd would record).

    Forward: the same float operations as :func:`deployq.core.qformula.fake_quantize`, bit for bit.
    Backward, with v = x/s, r = rint(v), and r'(v) the rounding's derivative (1: straight-through;
    DSQ: ½·k·(1 − tanh²(k·u)) / tanh(k/2), u = v − ⌊v⌋ − ½, k = log(2/α − 1)):

        inside the range:  ∂x̂/∂x = r'(v),  ∂x̂/∂s = r − r'(v)·v,  ∂x̂/∂zp = 0,  ∂x̂/∂α = s·∂soft/∂α
        clamped at q_lim:  ∂x̂/∂x = 0,      ∂x̂/∂s = q_lim − zp,    ∂x̂/∂zp = −s, ∂x̂/∂α = 0

    (LSQ / LSQ+: Esser et al. 2020, Bhalgat et al. 2020; DSQ: Gong et al. 2019.) `s` and `zp`
    arrive shaped to broadcast against x; their gradients are summed back to that shape. The
    elementwise math is :func:`_gradients_ste` / :func:`_gradients_dsq` (compiled with
    :func:`use_compiled_kernels`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                alpha: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, s, zp, alpha)
        ctx.qmin, ctx.qmax = qmin, qmax
        shape = _grouped_shape(x.shape, s.shape)
        y = _KERNELS["forward"](x.detach().reshape(shape), s.detach().reshape(1, shape[1], 1),
                                zp.detach().reshape(1, shape[1], 1), *_bounds(qmin, qmax, x.dtype, x.device))
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, s, zp, alpha = ctx.saved_tensors
        _, need_s, need_zp, _, _, need_alpha = ctx.needs_input_grad
        qmin, qmax = ctx.qmin, ctx.qmax
        # every call in one layout, (outer, channels, inner) with (1, channels, 1) qparams, so a
        # compiled kernel serves per-tensor and per-channel quantizers of any rank alike
        # (and plain tensors: the bounds as tensors, nothing requiring grad, so nothing recompiles)
        shape = _grouped_shape(x.shape, s.shape)
        args = (grad.reshape(shape), x.detach().reshape(shape), s.detach().reshape(1, shape[1], 1),
                zp.detach().reshape(1, shape[1], 1))
        bounds = _bounds(qmin, qmax, x.dtype, x.device)
        grad_alpha = None
        if alpha is None:
            grad_x, grad_s, grad_zp = _gradients("ste", x.is_cuda, *args, *bounds)
        else:
            grad_x, grad_s, grad_zp, grad_alpha = _gradients("dsq", x.is_cuda, *args, alpha.detach(), *bounds)
            grad_alpha = grad_alpha.reshape(alpha.shape) if need_alpha else None
        return (grad_x.reshape(x.shape), grad_s.reshape(s.shape) if need_s else None,
                grad_zp.reshape(zp.shape) if need_zp else None, None, None, grad_alpha)


@functools.lru_cache(maxsize=None)
def _bounds(qmin: float, qmax: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code range as 0-d tensors on the data's device (made once per range and device, read
    only): a compiled kernel then serves every bit width without recompiling."""
    return (torch.tensor(float(qmin), dtype=dtype, device=device),
            torch.tensor(float(qmax), dtype=dtype, device=device))


def _grouped_shape(x_shape: torch.Size, q_shape: torch.Size) -> tuple[int, int, int]:
    """(outer, channels, inner) of x, where the qparams (broadcast shape `q_shape`) vary along channels."""
    axis = next((i for i, n in enumerate(q_shape) if n != 1), None)
    if axis is None:
        return 1, 1, math.prod(x_shape)
    return math.prod(x_shape[:axis]), x_shape[axis], math.prod(x_shape[axis + 1:])
