"""Fake quantizers: modules that quantize-dequantize a tensor in training, registered by name.

Every quantizer computes, in its forward, exactly the formula of :mod:`deployq.qformula`
(true division, ties to even); they differ only in what is learned and in the gradient.

| name      | what is learned                   | gradient                                        |
|-----------|-----------------------------------|-------------------------------------------------|
| fixed     | nothing (scale from the observer) | straight-through inside the range, 0 outside    |
| lsq       | scale s                           | LSQ (Esser et al., ICLR 2020), scaled 1/√(N·Qp)  |
| lsq+      | scale s and zero point            | LSQ+ (Bhalgat et al., CVPRW 2020)               |
| dsq       | soft-rounding width α             | DSQ (Gong et al., ICCV 2019): tanh-shaped round |
| dsq_lsq   | s, zero point and α               | DSQ's soft rounding with LSQ+'s learned s, zp   |
| pact      | clipping level α (activations)    | PACT (Choi et al., 2018)                        |

A quantizer is in one of three modes (see :func:`deployq.qat.set_mode`): ``float`` (identity), ``observe``
(identity; activation quantizers feed their observer) and ``quantize``. Activation qparams come
from one calibration pass and are then frozen (or learned); weight qparams of observer-driven
quantizers (fixed, dsq) are recomputed from the current weights at every forward, so that the
exported integers always match the weights they came from.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from deployq.calib.observers import create_observer
from deployq.qformula import broadcast_shape, qparams_from_range
from deployq.qspec import QuantSpec
from deployq.registry import Registry

QUANTIZERS: Registry[type["FakeQuantizer"]] = Registry("quantizer")
MODES = ("float", "observe", "quantize")
MIN_SCALE = 1e-10  # PACT's clipping level never goes below this


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


def _gradients_ste(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor,
                   qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise ∂L/∂x, ∂L/∂s, ∂L/∂zp of x̂ with the straight-through rounding gradient."""
    v = x / s
    r = torch.round(v)
    level = r + zp
    below = level < qmin
    inside = ~(below | (level > qmax))
    grad_x = torch.where(inside, grad, 0.0)
    grad_s = torch.where(inside, r - v, torch.where(below, qmin - zp, qmax - zp)) * grad
    grad_zp = torch.where(inside, 0.0, -s * grad)
    return grad_x, grad_s, grad_zp


def _gradients_dsq(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, alpha: torch.Tensor,
                   qmin: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same with DSQ's soft-rounding slope, and ∂L/∂α (elementwise)."""
    v = x / s
    r = torch.round(v)
    level = r + zp
    below = level < qmin
    inside = ~(below | (level > qmax))
    k = torch.log(2.0 / alpha - 1.0)
    u = v - torch.floor(v) - 0.5
    t = torch.tanh(k * u)
    half = torch.tanh(0.5 * k)
    bell = 1.0 - t * t
    slope = 0.5 * k * bell / half
    dsoft_dalpha = (0.5 * (u * bell * half - 0.5 * t * (1.0 - half * half)) / (half * half)
                    * (-2.0 / (alpha * (2.0 - alpha))))
    grad_x = torch.where(inside, grad * slope, 0.0)
    grad_s = torch.where(inside, r - slope * v, torch.where(below, qmin - zp, qmax - zp)) * grad
    grad_zp = torch.where(inside, 0.0, -s * grad)
    grad_alpha = torch.where(inside, grad * s * dsoft_dalpha, 0.0)
    return grad_x, grad_s, grad_zp, grad_alpha


_KERNELS = {"ste": _gradients_ste, "dsq": _gradients_dsq}  # compiled versions replace them, when asked


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the quantizers' backward math through ``torch.compile`` (one fused loop instead of ~25
    tensor operations; ~8x faster on a CPU, after a one-time compilation of ~30 s) or eagerly.

    A platform where compilation fails falls back to the eager functions with a warning, at the
    first backward pass. The forward, and so every exported number, is the same either way."""
    if not enabled:
        _KERNELS.update(ste=_gradients_ste, dsq=_gradients_dsq)
        return
    for key, function in (("ste", _gradients_ste), ("dsq", _gradients_dsq)):
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


class _FakeQuantize(torch.autograd.Function):
    """x̂ = (clamp(rint(x/s) + zp, qmin, qmax) − zp)·s in one autograd node, with the closed-form
    gradients of the quantizers here (instead of the ~20 elementwise nodes autograd would record).

    Forward: the same float operations as :func:`deployq.qformula.fake_quantize`, bit for bit.
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
        q = torch.clamp(torch.round(x / s) + zp, qmin, qmax)
        return (q - zp) * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, s, zp, alpha = ctx.saved_tensors
        _, need_s, need_zp, _, _, need_alpha = ctx.needs_input_grad
        qmin, qmax = float(ctx.qmin), float(ctx.qmax)
        # every call in one layout, (outer, channels, inner) with (1, channels, 1) qparams, so a
        # compiled kernel serves per-tensor and per-channel quantizers of any rank alike
        # (and plain tensors: the bounds as tensors, nothing requiring grad, so nothing recompiles)
        shape = _grouped_shape(x.shape, s.shape)
        args = (grad.reshape(shape), x.detach().reshape(shape), s.detach().reshape(1, shape[1], 1),
                zp.detach().reshape(1, shape[1], 1))
        bounds = (torch.tensor(qmin, dtype=x.dtype), torch.tensor(qmax, dtype=x.dtype))
        grad_alpha = None
        if alpha is None:
            grad_x, grad_s, grad_zp = _KERNELS["ste"](*args, *bounds)
        else:
            grad_x, grad_s, grad_zp, grad_alpha = _KERNELS["dsq"](*args, alpha.detach(), *bounds)
            grad_alpha = grad_alpha.sum().reshape(alpha.shape) if need_alpha else None
        return (grad_x.reshape(x.shape), grad_s.sum((0, 2)).reshape(s.shape) if need_s else None,
                grad_zp.sum((0, 2)).reshape(zp.shape) if need_zp else None, None, None, grad_alpha)


def _grouped_shape(x_shape: torch.Size, q_shape: torch.Size) -> tuple[int, int, int]:
    """(outer, channels, inner) of x, where the qparams (broadcast shape `q_shape`) vary along channels."""
    axis = next((i for i, n in enumerate(q_shape) if n != 1), None)
    if axis is None:
        return 1, 1, math.prod(x_shape)
    return math.prod(x_shape[:axis]), x_shape[axis], math.prod(x_shape[axis + 1:])


class FakeQuantizer(nn.Module):
    """Base: scale / zero-point storage, observer, modes. Subclasses choose what is learned."""

    #: recompute weight qparams from the weight at every forward (observer-driven quantizers)
    weights_follow_observer = True

    def __init__(self, spec: QuantSpec, name: str, axis: int | None = None, channels: int = 1,
                 is_weight: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.axis = axis if spec.per_channel else None
        self.channels = channels if spec.per_channel else 1
        self.is_weight = is_weight
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.mode = "float"
        self.observer = create_observer(spec, self.axis, name)
        shape = (self.channels,) if spec.per_channel else ()
        self.register_buffer("initialized", torch.tensor(False))
        self._create_qparams(shape, **dict(spec.quantizer_args))

    # --- storage ---------------------------------------------------------------------------
    def _create_qparams(self, shape: tuple[int, ...]) -> None:
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def set_qparams(self, scale: np.ndarray, zero_point: np.ndarray) -> None:
        """Load qparams (from an observer or a file) into whatever this quantizer stores."""
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(self.scale.shape))
            self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.float32).reshape(self.zero_point.shape))
            self.initialized.fill_(True)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (scale, zero_point) of the forward: float32 and integer-valued float."""
        return self._effective_scale().detach(), self._effective_zero_point().detach()

    def _effective_scale(self) -> torch.Tensor:
        return self.scale

    def _effective_zero_point(self) -> torch.Tensor:
        return self.zero_point

    # --- calibration -----------------------------------------------------------------------
    def calibrate_from(self, x: torch.Tensor) -> None:
        """Set qparams from `x` alone (weights), with a fresh observer of the configured kind."""
        observer = create_observer(self.spec, self.axis, self.name)
        observer.update(x)
        self.set_qparams(*observer.qparams())

    def finish_calibration(self) -> None:
        """Turn what the observer saw into qparams (activations, when leaving ``observe``)."""
        if self.is_weight:
            return
        self.set_qparams(*self.observer.qparams())
        self.observer = create_observer(self.spec, self.axis, self.name)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return x
        if self.mode == "observe":
            if not self.is_weight:
                self.observer.update(x)
            return x
        if self.is_weight and (self.weights_follow_observer or not bool(self.initialized)):
            self.calibrate_from(x)
        elif not bool(self.initialized):
            raise RuntimeError(
                f"{self.name}: quantize mode before calibration; run deployq.calibrate(model, "
                "batches) first (or load a checkpoint that has qparams)"
            )
        return self._fake_quantize(x)

    def _rounding_alpha(self) -> torch.Tensor | None:
        """DSQ's soft-rounding width for the gradient, or None for the straight-through estimator."""
        return None

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize_with(x, self._effective_scale(), self._effective_zero_point())

    def _quantize_with(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """((clamp(round(x / s) + zp, qmin, qmax) − zp) · s, with this quantizer's rounding gradient
        (one fused autograd node, :class:`_FakeQuantize`)."""
        shape = broadcast_shape(x.ndim, self.axis) if scale.ndim else []
        s = scale.reshape(shape) if shape else scale
        zp = zero_point.reshape(shape) if shape else zero_point
        return _FakeQuantize.apply(x, s.to(x.dtype), zp.to(x.dtype), self.qmin, self.qmax, self._rounding_alpha())

    def _feature_count(self, x: torch.Tensor) -> int:
        """N of LSQ's gradient scale: weights per scale entry, or activation features per sample."""
        if self.is_weight:
            return max(1, x.numel() // self.channels)
        return max(1, x[0].numel() // self.channels) if x.ndim > 1 else max(1, x.numel())

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.spec.describe()}, mode={self.mode}"


@QUANTIZERS.register("fixed")
class FixedQuantizer(FakeQuantizer):
    """Observer-driven scale and zero point; straight-through gradient inside the range."""


@QUANTIZERS.register("lsq")
class LSQQuantizer(FakeQuantizer):
    """LSQ: the step size s is learned; ∂x̂/∂s = round(x/s) − x/s inside the range and
    qmin − zp or qmax − zp outside, scaled by g = 1/√(N·Qp) (Esser et al., 2020).

    s is stored as ``log_scale`` (s = exp(log_scale)): it stays positive, and an optimizer's step
    changes it relatively. A linear s under Adam moves by about the learning rate per step, which
    drives the small scales of near-empty weight channels through zero within a few hundred steps
    (their int32 bias then saturates and integer kernels overflow). The gradient reaching
    log_scale is s · ∂L/∂s, the paper's gradient by the chain rule.
    """

    weights_follow_observer = False

    def _create_qparams(self, shape: tuple[int, ...]) -> None:
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def set_qparams(self, scale: np.ndarray, zero_point: np.ndarray) -> None:
        with torch.no_grad():
            scale = torch.as_tensor(scale, dtype=torch.float32).reshape(self.log_scale.shape)
            self.log_scale.copy_(torch.log(scale))
            self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.float32).reshape(self.zero_point.shape))
            self.initialized.fill_(True)

    def _effective_scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(self._feature_count(x) * max(self.qmax, 1))
        scale = torch.exp(scale_gradient(self.log_scale, g))
        return self._quantize_with(x, scale, self._zero_point_for_forward(g))

    def _zero_point_for_forward(self, g: float) -> torch.Tensor:
        return self.zero_point


@QUANTIZERS.register("lsq+")
class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+: scale and offset are both learned. The offset is kept as a float zero point that is
    rounded (straight-through) and clamped in the forward, so x̂ follows the integer formula; for
    symmetric schemes the zero point stays 0 and only the scale is learned."""

    def _create_qparams(self, shape: tuple[int, ...]) -> None:
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=not self.spec.symmetric)

    def _effective_zero_point(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.zero_point), self.qmin, self.qmax)

    def _zero_point_for_forward(self, g: float) -> torch.Tensor:
        if self.spec.symmetric:
            return self.zero_point.detach()
        return torch.clamp(round_ste(scale_gradient(self.zero_point, g)), self.qmin, self.qmax)


class _DSQRounding:
    """Mixin: rint forward, DSQ's soft rounding gradient with a learnable α in training."""

    def _create_alpha(self, alpha: float) -> None:
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"{self.name}: dsq alpha must be in (0, 0.5), got {alpha}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def _rounding_alpha(self) -> torch.Tensor | None:
        return torch.clamp(self.alpha, 1e-4, 0.4999) if self.training else None


@QUANTIZERS.register("dsq")
class DSQQuantizer(_DSQRounding, FakeQuantizer):
    """DSQ: observer-driven scale and zero point; rounding gradient from tanh-shaped soft
    rounding whose width α (default 0.2) is learned."""

    def _create_qparams(self, shape: tuple[int, ...], alpha: float = 0.2) -> None:
        super()._create_qparams(shape)
        self._create_alpha(alpha)


@QUANTIZERS.register("dsq_lsq")
class DSQLSQQuantizer(_DSQRounding, LSQPlusQuantizer):
    """The thesis' combination: LSQ+'s learned scale and offset, DSQ's soft rounding gradient."""

    def _create_qparams(self, shape: tuple[int, ...], alpha: float = 0.2) -> None:
        super()._create_qparams(shape)
        self._create_alpha(alpha)


@QUANTIZERS.register("pact")
class PACTQuantizer(FakeQuantizer):
    """PACT for activations: y = clip(x, qmin·s, α) with s = α / qmax and zp = 0 (so unsigned
    codes clip at 0, as PACT's ReLU); ∂x̂/∂α = 1 where x ≥ α (straight-through for the rounding)."""

    weights_follow_observer = False

    def _create_qparams(self, shape: tuple[int, ...]) -> None:
        if self.is_weight:
            raise ValueError(f"{self.name}: pact is for activations, not weights")
        if self.spec.per_channel:
            raise ValueError(f"{self.name}: pact learns one clipping level; use a per-tensor scheme")
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def set_qparams(self, scale: np.ndarray, zero_point: np.ndarray) -> None:
        with torch.no_grad():
            self.alpha.fill_(float(np.asarray(scale).reshape(-1)[0]) * self.qmax)
            self.initialized.fill_(True)

    def finish_calibration(self) -> None:
        lo, hi = self.observer.compute_range()
        amax = max(abs(float(lo)), abs(float(hi))) if self.spec.signed else float(hi)
        scale, _ = qparams_from_range(-amax if self.spec.signed else 0.0, amax, self.qmin,
                                      self.qmax, True, self.name)
        self.set_qparams(scale, np.zeros(()))
        self.observer = create_observer(self.spec, self.axis, self.name)

    def _effective_scale(self) -> torch.Tensor:
        return torch.clamp(self.alpha, min=MIN_SCALE) / self.qmax

    def _effective_zero_point(self) -> torch.Tensor:
        return torch.zeros(())

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.clamp(self.alpha, min=MIN_SCALE)
        scale = alpha / self.qmax
        y = torch.minimum(torch.maximum(x, scale * self.qmin), alpha)  # clip to [qmin·s, α]
        s = scale.detach()
        yq = (torch.clamp(torch.round(y / s), self.qmin, self.qmax)) * s
        return straight_through(yq, y)


def create_quantizer(spec: QuantSpec, name: str, axis: int | None = None, channels: int = 1,
                     is_weight: bool = False) -> FakeQuantizer:
    cls = QUANTIZERS.get(spec.quantizer)
    try:
        return cls(spec, name, axis=axis, channels=channels, is_weight=is_weight)
    except TypeError as err:
        raise ValueError(f"{name}: bad quantizer_args for {spec.quantizer!r}: {err}") from None
