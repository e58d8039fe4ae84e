"""The autograd kernels under every fake quantizer: one ``torch.autograd.Function`` whose forward is
:mod:`deployq.core.qformula`'s formula and whose backward is the quantizer's gradient rule
(straight-through, LSQ / LSQ+ for scale and zero point, DSQ's soft rounding), computed in one pass
over grouped ``(outer, channels, inner)`` views. ``use_compiled_kernels`` swaps the eager torch
functions for fused kernels: C on the CPU (:mod:`deployq.qat.native`), torch.compile elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

from deployq.qat import native

__all__ = ["ALPHA_RANGE", "FakeQuantize", "Rule", "straight_through", "use_compiled_kernels"]


def straight_through(value: torch.Tensor, gradient_path: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `value`. Backward: the gradient of `gradient_path`.

    ``value + (g - g.detach())`` adds an exact 0.0, so the forward is bit-identical to `value`.
    """
    return value.detach() + (gradient_path - gradient_path.detach())


# The elementwise functions below take v = x / s, computed by the caller as a true division: Triton
# divides float32 approximately, which rounded a third of the half-step ties the other way on an
# H200 (the compiled functions themselves divide nothing but for DSQ's gradient).


def _ste_terms(grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, zp: torch.Tensor,
               qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∂L/∂x, and the elementwise terms of ∂L/∂s and ∂L/∂zp, of x̂ with the straight-through rounding
    gradient; v = x / s and grad in the grouped (outer, C, inner) layout."""
    r = torch.round(v)
    level = r + zp
    below = level < qmin
    inside = ~(below | (level > qmax))
    grad_x = torch.where(inside, grad, 0.0)
    grad_s = torch.where(inside, r - v, torch.where(below, qmin - zp, qmax - zp)) * grad
    grad_zp = torch.where(inside, 0.0, -s * grad)
    return grad_x, grad_s, grad_zp


def _dsq_terms(grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, alpha: torch.Tensor,
               qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same with DSQ's soft-rounding slope, and the elementwise terms of ∂L/∂α."""
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


def _gradients(kind: str, device: torch.device, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The `kind` ("ste" or "dsq") gradients with torch's operations: eager on the CPU (where the C
    kernels do not serve), compiled elsewhere when asked. On CUDA only the elementwise terms are
    compiled and torch's own reduction sums them: inductor's fused reduction over the
    (outer, 1, inner) layout took 85 % of a QAT step's GPU time (H200, BENCHMARKS.md's
    QAT-on-a-GPU section)."""
    if device.type == "cpu":
        return _EAGER[kind](*args)
    if device.type != "cuda":
        return _KERNELS[kind](*args)
    return _summed(_KERNELS[f"{kind}_terms"](*args))


def _torch_forward(x: torch.Tensor) -> Callable:
    """The forward with torch's operations: eager on the CPU, compiled elsewhere when asked."""
    return _EAGER["forward"] if x.device.type == "cpu" else _KERNELS["forward"]


def _forward_of_quotient(v: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: torch.Tensor,
                         qmax: torch.Tensor) -> torch.Tensor:
    """(clamp(rint(v) + zp, qmin, qmax) − zp)·s with v = x / s: qformula's operations, in its order."""
    q = torch.clamp(torch.round(v) + zp, qmin, qmax)
    return (q - zp) * s


def _fake_quantize_forward(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: torch.Tensor,
                           qmax: torch.Tensor) -> torch.Tensor:
    """(clamp(rint(x / s) + zp, qmin, qmax) − zp)·s, eagerly."""
    return _forward_of_quotient(x / s, s, zp, qmin, qmax)


_RECOMPILE_LIMIT = 64
_EAGER = {"forward": _forward_of_quotient, "ste": _gradients_ste, "dsq": _gradients_dsq,
          "ste_terms": _ste_terms, "dsq_terms": _dsq_terms}
_KERNELS = dict(_EAGER)  # off the CPU: the torch.compile'd versions replace them, when asked
_COMPILED: dict[str, Callable] = {}  # made once, so switching back and forth does not recompile
_NATIVE: list[Optional[native.Kernels]] = [None]  # float32 on the CPU: the C kernels, when asked


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the quantizers' forward and backward math as fused kernels (one loop each instead of 6
    and ~25 tensor operations) or eagerly.

    - float32 on the CPU: the C kernels of :mod:`deployq.qat.native` (built with the machine's C
      compiler at first use, in a fraction of a second, and cached). A torch.compile'd function
      pays ~150 µs of dynamo's guards and wrappers per call, more than its arithmetic on a small
      batch; a C call costs a few µs.
    - elsewhere (CUDA): ``torch.compile`` (a one-time compilation of ~30 s).

    Both forwards are bit-identical to the eager one: true division, ties to even, no contraction
    of (q − zp)·s into a fused multiply-add (kernels.c is compiled without fast math; the compiled
    torch functions get v = x / s from an eager division, since Triton divides approximately).
    tests/test_quantizers.py and tests/test_native_kernels.py check it on ties (CUDA: on a lent
    H200). Where the C compiler or torch.compile fails, the eager functions run, with a warning."""
    if not enabled:
        _KERNELS.update(_EAGER)
        _NATIVE[0] = None
        return
    _NATIVE[0] = native.load()
    if _NATIVE[0] is None:
        warnings.warn(f"deployq: the quantizers' C kernels were not built ({native.FAILURE}); "
                      "CPU training runs them eagerly")
    for key, function in _EAGER.items():
        if key not in _COMPILED:
            _COMPILED[key] = _compiled_or_eager(key, function)
        _KERNELS[key] = _COMPILED[key]


@contextlib.contextmanager
def native_kernels_where_built() -> Iterator[None]:
    """The C kernels for float32 on the CPU while the block runs, where they build here (else the
    eager functions, silently): the same values bit for bit (tests/test_native_kernels.py), in one
    loop instead of six tensor operations. Calibration and PTQ run many quantize-mode forwards: a
    ``--ptq bias`` export of PP-OCR's text detector went 42.9 -> 18.5 s, its int8 file byte-identical."""
    previous = _NATIVE[0]
    if previous is None:
        _NATIVE[0] = native.load()
    try:
        yield
    finally:
        _NATIVE[0] = previous


def _compiled_or_eager(key: str, function: Callable) -> Callable:
    """`function` through torch.compile, compiled at its first call (a CPU-only run never imports
    dynamo), or eagerly where compiling fails, with a warning."""
    compiled: list[Callable] = []

    def run(*args: Any) -> Any:
        try:
            if not compiled:
                # one compiled variant per kind of quant point (per-tensor or per-channel, weight
                # or activation, the sizes inductor picks its loops by): more than dynamo's 8
                limit = torch._dynamo.config.recompile_limit
                torch._dynamo.config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
                compiled.append(torch.compile(function, dynamic=True))
            return compiled[0](*args)
        except Exception as err:  # no C++ compiler, an unsupported platform: compile fails at first use
            warnings.warn(f"deployq: fused quantizer kernels not compiled ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); running eagerly")
            _KERNELS[key] = _COMPILED[key] = function
            return function(*args)

    return run


def _native_for(x: torch.Tensor, scale: torch.Tensor) -> Optional[native.Kernels]:
    """The C kernels, where they are enabled and serve this quantizer call: float32 on the CPU (the
    data and the qparams, which share a device and a dtype: the floor is made from the qparams)."""
    kernels = _NATIVE[0]
    if kernels is None or x.dtype != torch.float32 or scale.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return kernels


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a quantizer's stored tensors become the forward's scale, zero point and α.

    - `log_scale`: the scale is stored as log s (LSQ): s = exp(stored).
    - `learned_zero_point`: the zero point is learned as a float (LSQ+): zp = clamp(rint(stored),
      qmin, qmax), straight-through.
    - DSQ's α is clamped to ALPHA_RANGE.
    - A scale floor (int32 bias range, :meth:`deployq.qat.fused.QuantLayer.bound_weight_scale`)
      makes the scale max(s, floor).
    """

    qmin: int
    qmax: int
    axis: Optional[int]  # the channel axis of per-channel qparams; None: per tensor
    log_scale: bool = False
    learned_zero_point: bool = False


ALPHA_RANGE = (1e-4, 0.4999)  # DSQ's α: away from 0 (k = log(2/α − 1) finite) and from ½ (k > 0)


class FakeQuantize(torch.autograd.Function):
    """x̂ = (clamp(rint(x/s) + zp, qmin, qmax) − zp)·s in one autograd node, parameters included,
    with the closed-form gradients of the quantizers here (instead of the ~30 small nodes autograd
    would record per call: exp, max, round, clamp and LSQ's gradient scaling around ~20
    elementwise ones).

    Forward: the same float operations as :func:`deployq.core.qformula.fake_quantize`, bit for bit.
    Backward, with v = x/s, r = rint(v), and r'(v) the rounding's derivative (1: straight-through;
    DSQ: ½·k·(1 − tanh²(k·u)) / tanh(k/2), u = v − ⌊v⌋ − ½, k = log(2/α − 1)):

        inside the range:  ∂x̂/∂x = r'(v),  ∂x̂/∂s = r − r'(v)·v,  ∂x̂/∂zp = 0,  ∂x̂/∂α = s·∂soft/∂α
        clamped at q_lim:  ∂x̂/∂x = 0,      ∂x̂/∂s = q_lim − zp,    ∂x̂/∂zp = −s, ∂x̂/∂α = 0

    then, by the chain rule through the :class:`Rule`: ∂s/∂log s = s; LSQ's gradient scale `g` on
    the stored scale and zero point; 1 where rint(zp) lies in [qmin, qmax], else 0; 1 where α lies
    in ALPHA_RANGE; for max(s, floor), 1 where s > floor, ½ at a tie, 0 below (torch.maximum's).
    (LSQ / LSQ+: Esser et al. 2020, Bhalgat et al. 2020; DSQ: Gong et al. 2019.) The elementwise
    math is :func:`_gradients_ste` / :func:`_gradients_dsq`, or their fused kernels
    (:func:`use_compiled_kernels`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, alpha: Optional[torch.Tensor],
                floor: Optional[torch.Tensor], rule: Rule, g: float) -> torch.Tensor:
        s_stored = torch.exp(scale) if rule.log_scale else scale  # what qparams() and the export read
        # every call in one layout, (outer, channels, inner) with a value per channel, so one kernel
        # serves per-tensor and per-channel quantizers of any rank alike
        ctx.rule, ctx.g, ctx.shape = rule, g, _grouped_shape(x.shape, rule.axis if s_stored.ndim else None)
        ctx.native = _native_for(x, s_stored)
        if ctx.native is not None:
            x = x.contiguous()  # (copied once, where it is not, for the forward and the backward)
            ctx.save_for_backward(x, s_stored, floor, zero_point, alpha)
            return ctx.native.forward(x, ctx.shape, s_stored, floor, zero_point, rule.learned_zero_point,
                                      rule.qmin, rule.qmax)
        s, zp = _used_qparams(s_stored, floor, zero_point, rule)
        s3, zp3 = s.to(x.dtype).reshape(1, ctx.shape[1], 1), zp.to(x.dtype).reshape(1, ctx.shape[1], 1)
        ctx.save_for_backward(x, s_stored, floor, zero_point, alpha, s3, zp3)
        # (the bounds as tensors, nothing requiring grad: a compiled kernel serves every bit width)
        return _torch_forward(x)(x.reshape(ctx.shape) / s3, s3, zp3,
                                   *_bounds(rule.qmin, rule.qmax, x.dtype, x.device)).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, s_stored, floor, zero_point, alpha, *used = ctx.saved_tensors
        rule, g, shape = ctx.rule, ctx.g, ctx.shape
        _, need_scale, need_zp, need_alpha, _, _, _ = ctx.needs_input_grad
        if ctx.native is not None and not torch.is_grad_enabled():
            grad_x, grad_s, grad_zp, grad_alpha = ctx.native.gradients(
                grad, x, shape, s_stored, floor, zero_point, rule.learned_zero_point,
                None if alpha is None else float(alpha), ALPHA_RANGE, rule.qmin, rule.qmax, g, rule.log_scale)
        else:  # torch's operations; also where a gradient of this backward is taken (create_graph: Hessians)
            if not used:
                s, zp = _used_qparams(s_stored, floor, zero_point, rule)
                used = [s.to(x.dtype).reshape(1, shape[1], 1), zp.to(x.dtype).reshape(1, shape[1], 1)]
            grad_x, grad_s, grad_zp, grad_alpha = _torch_gradients(grad, x, s_stored, floor, zero_point, alpha,
                                                                   *used, rule, g, shape)
        return (grad_x, grad_s if need_scale else None, grad_zp if need_zp else None,
                grad_alpha if need_alpha else None, None, None, None)


def _used_qparams(s_stored: torch.Tensor, floor: Optional[torch.Tensor], zero_point: torch.Tensor,
                  rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point the forward uses, from the stored ones (:class:`Rule`)."""
    s = s_stored if floor is None else torch.maximum(s_stored, floor.to(s_stored.device))
    zp = torch.clamp(torch.round(zero_point), rule.qmin, rule.qmax) if rule.learned_zero_point else zero_point
    return s, zp


def _torch_gradients(grad: torch.Tensor, x: torch.Tensor, s_stored: torch.Tensor, floor: Optional[torch.Tensor],
                     zero_point: torch.Tensor, alpha: Optional[torch.Tensor], s3: torch.Tensor, zp3: torch.Tensor,
                     rule: Rule, g: float, shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """FakeQuantize's gradients with torch's operations (compiled or eager): the elementwise terms,
    then the chain rule through the :class:`Rule` (what kernels.c does on the CPU)."""
    args = (grad.reshape(shape), x.reshape(shape) / s3, s3, zp3)
    bounds = _bounds(rule.qmin, rule.qmax, x.dtype, x.device)
    if alpha is None:
        (grad_x, grad_s, grad_zp), grad_alpha = _gradients("ste", x.device, *args, *bounds), None
    else:
        grad_x, grad_s, grad_zp, grad_alpha = _gradients("dsq", x.device, *args, torch.clamp(alpha, *ALPHA_RANGE),
                                                         *bounds)
        grad_alpha = torch.where((alpha >= ALPHA_RANGE[0]) & (alpha <= ALPHA_RANGE[1]),
                                 grad_alpha.reshape(alpha.shape).to(alpha.dtype), 0.0)
    grad_s = grad_s.reshape(s_stored.shape).to(s_stored.dtype)
    if floor is not None:  # through torch.maximum: to the larger one, half each at a tie
        floor = floor.to(s_stored.device)
        grad_s = grad_s * torch.where(s_stored > floor, 1.0, torch.where(s_stored == floor, 0.5, 0.0))
    grad_s = grad_s * (s_stored * g if rule.log_scale else g)
    grad_zp = grad_zp.reshape(zero_point.shape).to(zero_point.dtype)
    if rule.learned_zero_point:  # through clamp(rint(zp)): straight through rint, 0 where clamped
        rounded = torch.round(zero_point)
        grad_zp = torch.where((rounded >= rule.qmin) & (rounded <= rule.qmax), grad_zp * g, 0.0)
    else:
        grad_zp = grad_zp * g
    return grad_x.reshape(x.shape), grad_s, grad_zp, grad_alpha


@functools.lru_cache(maxsize=None)
def _bounds(qmin: float, qmax: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code range as 0-d tensors on the data's device (made once per range and device, read
    only): a compiled kernel then serves every bit width without recompiling."""
    return (torch.tensor(float(qmin), dtype=dtype, device=device),
            torch.tensor(float(qmax), dtype=dtype, device=device))


def _grouped_shape(x_shape: torch.Size, axis: Optional[int]) -> tuple[int, int, int]:
    """(outer, channels, inner) of x, where per-channel qparams vary along `axis` (None: per tensor)."""
    if axis is None:
        return 1, 1, math.prod(x_shape)
    return math.prod(x_shape[:axis]), x_shape[axis], math.prod(x_shape[axis + 1:])
