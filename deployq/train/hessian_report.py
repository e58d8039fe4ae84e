"""What ``deployq hessian`` reports: the Hessian trace of each layer's activation, the distillation
layers and weights it implies, bit-width suggestions, and the distillation YAML it writes.
:mod:`deployq.train.hessian` computes the numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deployq.core.files import atomic_path
from deployq.train.distill import DistillConfig
from deployq.train.losses import DistillError

DEFAULT_BITS = (8, 10)
DEFAULT_SHARE = 0.2  # bit suggestion: the higher width for layers with >= 20% of the total Ω


@dataclass(frozen=True)
class LayerTrace:
    """The Hutchinson estimate for one activation."""

    name: str
    trace: float  # Tr(H_a), averaged over the batches (the loss is a mean over the batch)
    numel: int  # n: elements of the activation per sample
    iterations: int  # Rademacher samples used
    converged: bool  # stopped by `tol` (False: stopped by max_iter)
    seconds: float  # this layer's Hessian-vector products + its share of the forward/gradient
    stderr: float = math.nan  # standard error of the mean: sample std / √iterations
    perturbation: dict[int, float] = field(default_factory=dict)  # bits -> E‖Q_b(a) − a‖² per sample

    @property
    def per_element(self) -> float:
        """Tr(H_a)/n, the sensitivity the layers are ranked by."""
        return self.trace / self.numel

    def omega(self, bits: int) -> float:
        """Ω_b = ½ · Tr(H_a)/n · E‖Q_b(a) − a‖²: the second-order loss increase of quantizing a to
        `bits` (HAWQ-V2's sensitivity, with the activation's min/max range)."""
        return 0.5 * self.per_element * self.perturbation[bits]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "trace": self.trace, "numel": self.numel, "trace_per_element": self.per_element,
                "iterations": self.iterations, "converged": self.converged, "seconds": self.seconds,
                "stderr": self.stderr,
                "perturbation": {str(b): v for b, v in self.perturbation.items()}}


@dataclass(frozen=True)
class BitSuggestion:
    """A HAWQ-style bit-width *suggestion* for one activation (check it with a parity run)."""

    name: str
    bits: int
    omega: dict[int, float]  # bits -> Ω_b
    share: float  # Ω at the low width / Σ over all layers


@dataclass(frozen=True)
class HessianReport:
    layers: tuple[LayerTrace, ...]  # ranked: largest Tr(H)/n first
    loss: str  # what the Hessian is of, in words
    tol: float
    max_iter: int
    batches: int
    mode: str  # quantizer mode of the analysis: float | quantize
    seconds: float
    bits: tuple[int, int] = DEFAULT_BITS
    estimator: str = "shared"

    def __getitem__(self, name: str) -> LayerTrace:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the report")

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def distill_config(self, top: int = 3, coeff: float = 1.0, quant_teacher: bool = False) -> DistillConfig:
        """The `top` most sensitive layers with λ_i = coeff · s_i / Σ_j s_j, s = Tr(H)/n.

        Layers whose trace is not positive carry no weight and are left out.
        """
        if top < 1:
            raise DistillError(f"top must be at least 1, got {top}")
        if not (math.isfinite(coeff) and coeff > 0):
            raise DistillError(f"coeff must be a number > 0, got {coeff}")
        chosen = [layer for layer in self.layers if layer.per_element > 0][:top]
        if not chosen:
            raise DistillError(
                "no layer has a positive Hessian trace, so none can be weighted: the loss is flat in "
                f"every analysed activation ({self.loss}); use mse, or check the data and the layers"
            )
        total = sum(layer.per_element for layer in chosen)
        layers = tuple((layer.name, coeff * layer.per_element / total) for layer in chosen)
        return DistillConfig(layers, quant_teacher)

    def bit_suggestions(self, share: float = DEFAULT_SHARE) -> list[BitSuggestion]:
        """Suggest the higher width for layers that carry at least `share` of the total Ω at the
        lower width (Ω = ½·Tr(H)/n·‖Q(a) − a‖², HAWQ-V2); all others keep the lower width."""
        low, high = self.bits
        if not all(low in layer.perturbation for layer in self.layers):
            raise DistillError("the report has no quantization perturbations (run with bits=(low, high))")
        total = sum(max(layer.omega(low), 0.0) for layer in self.layers)
        suggestions = []
        for layer in self.layers:
            omega = {b: layer.omega(b) for b in (low, high)}
            part = max(omega[low], 0.0) / total if total > 0 else 0.0
            suggestions.append(BitSuggestion(layer.name, high if part >= share else low, omega, part))
        return suggestions

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "tol": self.tol, "max_iter": self.max_iter, "batches": self.batches,
                "mode": self.mode, "seconds": self.seconds, "bits": list(self.bits), "estimator": self.estimator,
                "layers": [layer.to_json() for layer in self.layers]}


# --------------------------------------------------------------------------------- outputs


def distill_yaml(report: HessianReport, config: DistillConfig, top: int, coeff: float) -> str:
    """The distillation config (native form) with a header saying where it came from."""
    header = [
        f"# deployq hessian: the {len(config.layers)} most sensitive of {len(report.layers)} layers by Tr(H)/n,",
        f"# lambda proportional to Tr(H)/n and summing to {coeff:g} (top {top} asked).",
        f"# Hessian of: {report.loss}.",
        f"# Hutchinson ({report.estimator} products): tol {report.tol:g}, max_iter {report.max_iter}, "
        f"{report.batches} batches, {report.mode} mode.",
    ]
    body = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def write_distill_config(report: HessianReport, path: str | Path, top: int = 3, coeff: float = 1.0,
                         quant_teacher: bool = False) -> DistillConfig:
    """Write the top-`top` layers (λ ∝ Tr(H)/n, Σλ = `coeff`) to `path` as YAML, atomically; the
    file loads with :func:`deployq.train.distill.load` and as a recipe's ``distill`` section."""
    config = report.distill_config(top, coeff, quant_teacher)
    text = distill_yaml(report, config, top, coeff)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return config
