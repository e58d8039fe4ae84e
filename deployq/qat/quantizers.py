"""Fake quantizers: modules that quantize-dequantize a tensor in training, registered by name.

Every quantizer computes, in its forward, exactly the formula of :mod:`deployq.core.qformula`
(true division, ties to even); they differ only in what is learned and in the gradient.

| name      | what is learned                   | gradient                                        |
|-----------|-----------------------------------|-------------------------------------------------|
| fixed     | nothing (scale from the observer) | straight-through inside the range, 0 outside    |
| lsq       | scale s                           | LSQ (Esser et al., ICLR 2020), scaled 1/√(N·Qp)  |
| lsq+      | scale s and zero point            | LSQ+ (Bhalgat et al., CVPRW 2020)               |
| dsq       | soft-rounding width α             | DSQ (Gong et al., ICCV 2019): tanh-shaped round |
| dsq_lsq   | s, zero point and α               | DSQ's soft rounding with LSQ+'s learned s, zp   |
| pact      | clipping level α (activations)    | PACT (Choi et al., 2018)                        |

A quantizer is in one of three modes (see :func:`deployq.qat.calibrate.set_mode`): ``float`` (identity), ``observe``
(identity; activation quantizers feed their observer) and ``quantize``. Activation qparams come
from one calibration pass and are then frozen (or learned); weight qparams of observer-driven
quantizers (fixed, dsq) are recomputed from the current weights at every forward, so that the
exported integers always match the weights they came from.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from deployq.qat.observers import create_observer
from deployq.core.qformula import qparams_from_range
from deployq.core.qspec import QuantSpec
from deployq.core.registry import Registry
from deployq.qat.fake_quant import FakeQuantize, Rule, straight_through

QUANTIZERS: Registry[type["FakeQuantizer"]] = Registry("quantizer")
MODES = ("float", "observe", "quantize")
MIN_SCALE = 1e-10  # PACT's clipping level never goes below this


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
        # Smallest scale a weight may use, set by its layer (QuantLayer.bound_weight_scale) so the
        # int32 bias codes b / (s_in·s_w) stay in range; None: no bound. Derived, never stored.
        self.scale_floor: torch.Tensor | None = None
        # An activation read only by a max pool is observed through it (deployq.qat.placement:
        # _pooled_by): the range of what the pool keeps. None: the tensor itself. Set by prepare.
        self.observe_through: Callable[[torch.Tensor], torch.Tensor] | None = None

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

    def is_ready(self) -> bool:
        """Whether this quantizer has qparams (its ``initialized`` buffer). Read from the buffer until
        it is true, then remembered: a CUDA model would otherwise wait for the device at every
        quantizer of every step. Loading a state dict forgets it."""
        if not self.__dict__.get("_ready", False):
            self.__dict__["_ready"] = bool(self.initialized)
        return self.__dict__["_ready"]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_ready", None)
        super()._load_from_state_dict(*args, **kwargs)

    def keep_qparams(self) -> None:
        """Stop recomputing this weight quantizer's qparams from the weight: the weight was set so that
        its codes are chosen ones (AdaRound), which a fresh observer could see another range in.
        Checkpoints record it (``fixed_weight_qparams``)."""
        self.weights_follow_observer = False

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (scale, zero_point) of the forward: float32 and integer-valued float."""
        return self.scale_used(), self._effective_zero_point().detach()

    def scale_used(self) -> torch.Tensor:
        """The effective scale of the forward alone (``qparams()[0]``), floor included."""
        return self._floored(self._effective_scale()).detach()

    def _floored(self, scale: torch.Tensor) -> torch.Tensor:
        return scale if self.scale_floor is None else torch.maximum(scale, self.scale_floor.to(scale.device))

    def _effective_scale(self) -> torch.Tensor:
        return self.scale

    def _effective_zero_point(self) -> torch.Tensor:
        return self.zero_point

    # --- calibration -----------------------------------------------------------------------
    def calibrate_from(self, x: torch.Tensor) -> None:
        """Set qparams from `x` alone (weights), with a fresh observer of the configured kind. A
        searching observer (all but min/max: ``mse`` at 4 bits, ~0.3 s for 256 channels) runs
        again only when the values differ from the last ones it ran on: the qparams of those are
        remembered (not stored in checkpoints)."""
        memo = self.__dict__.get("_weight_memo") if self.spec.observer_searches else None
        if memo is not None and memo[0].shape == x.shape and memo[0].device == x.device and torch.equal(memo[0], x):
            self.set_qparams(*memo[1])
            return
        observer = create_observer(self.spec, self.axis, self.name)
        observer.update(x)
        qparams = observer.qparams()
        self.set_qparams(*qparams)
        if self.spec.observer_searches:
            self.__dict__["_weight_memo"] = (x.detach().clone(), qparams)

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
                self.observer.update(x if self.observe_through is None else self.observe_through(x.detach()))
            return x
        if self.is_weight and (self.weights_follow_observer or not self.is_ready()):
            self.calibrate_from(x)
        elif not self.is_ready():
            raise RuntimeError(
                f"{self.name}: quantize mode before calibration; run deployq.calibrate(model, "
                "batches) first (or load a checkpoint that has qparams)"
            )
        return self._fake_quantize(x)

    def _rounding_alpha(self) -> torch.Tensor | None:
        """DSQ's soft-rounding width for the gradient (clamped to ALPHA_RANGE where it is used), or
        None for the straight-through estimator."""
        return None

    def _rule(self) -> Rule:
        """How the stored tensors become the forward's qparams (:class:`fake_quant.Rule`), made once."""
        rule = self.__dict__.get("_rule_made")
        if rule is None:
            rule = self.__dict__["_rule_made"] = Rule(self.qmin, self.qmax, self.axis, **self._rule_options())
        return rule

    def _rule_options(self) -> dict[str, bool]:
        return {}

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """((clamp(round(x / s) + zp, qmin, qmax) − zp) · s, with this quantizer's gradients: one
        autograd node (:class:`fake_quant.FakeQuantize`) from the stored tensors to x̂."""
        return FakeQuantize.apply(x, self._stored_scale(), self.zero_point, self._rounding_alpha(), self.scale_floor,
                                  self._rule(), self._gradient_scale(x))

    def _stored_scale(self) -> torch.Tensor:
        return self.scale

    def _gradient_scale(self, x: torch.Tensor) -> float:
        return 1.0

    def _feature_count(self, x: torch.Tensor) -> int:
        """N of LSQ's gradient scale: weights per scale entry, or activation features per sample."""
        if self.is_weight:
            return max(1, x.numel() // self.channels)
        return max(1, x.numel() // (x.shape[0] * self.channels)) if x.ndim > 1 and x.shape[0] else max(1, x.numel())

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

    def _rule_options(self) -> dict[str, bool]:
        return {"log_scale": True}

    def _stored_scale(self) -> torch.Tensor:
        return self.log_scale

    def _gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1/√(N·Qp) on the gradients reaching the stored scale and zero point."""
        return 1.0 / math.sqrt(self._feature_count(x) * max(self.qmax, 1))


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

    def _rule_options(self) -> dict[str, bool]:
        # a symmetric scheme's zero point stays 0 (stored, not learned)
        return {"log_scale": True, "learned_zero_point": not self.spec.symmetric}


class _DSQRounding:
    """Mixin: rint forward, DSQ's soft rounding gradient with a learnable α in training."""

    def _create_alpha(self, alpha: float) -> None:
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"{self.name}: dsq alpha must be in (0, 0.5), got {alpha}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def _rounding_alpha(self) -> torch.Tensor | None:
        return self.alpha if self.training else None


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


class SharedQuantizer(nn.Module):
    """A quant point on another point's grid (an average pool's output: the pool's input grid).
    It runs that quantizer (whose observer thus sees both tensors) and reads its attributes; it
    holds no state of its own, so a checkpoint stores the shared quantizer once."""

    def __init__(self, source: FakeQuantizer) -> None:
        super().__init__()
        self.__dict__["source"] = source  # a reference, not a submodule: it is registered where it sits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source(x)

    def __getattr__(self, attr: str):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            source = self.__dict__.get("source")
            if source is None:  # while being copied or unpickled
                raise
            return getattr(source, attr)

    def extra_repr(self) -> str:
        return f"shares {self.source.name!r}"


def create_quantizer(spec: QuantSpec, name: str, axis: int | None = None, channels: int = 1,
                     is_weight: bool = False) -> FakeQuantizer:
    cls = QUANTIZERS.get(spec.quantizer)
    try:
        return cls(spec, name, axis=axis, channels=channels, is_weight=is_weight)
    except TypeError as err:
        raise ValueError(f"{name}: bad quantizer_args for {spec.quantizer!r}: {err}") from None
