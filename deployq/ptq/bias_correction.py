"""Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.2; Finkelstein et al., "Fighting Quantization Bias With
Bias", 2019).

Quantizing the weights (and the earlier activations) shifts the expected output of a layer:
E[y_q] ≠ E[y]. Layer by layer in graph order, each correction seeing the previous ones, the shift
per output channel c of the pre-activation output is measured on calibration data,

    δ_c = E[y_q − y]_c,   y_q = layer_q(x_q) (the quantized model),  y = layer(x) (the float model),

and the layer's BN-folded bias c' = a·(c − μ) + β is set to Q_b(c') − δ, the bias the layer
really adds (int32-rounded, r = Q_b(c') − c' is part of δ) minus its error, so that E[y_q] = E[y]
on that data. The shift Δ = r − δ goes into the float parameters:

    BN with affine parameters:  β ← β + Δ
    BN without them:            c ← c + Δ / a      (a = 1/√(σ² + ε))
    no BN:                      c ← c + Δ

A layer with neither a bias nor a BatchNorm has nowhere to put Δ and is left as it is (listed as
skipped): creating a bias would add a parameter the model's factory does not build, and the
exported checkpoint would no longer load into it.

The corrected bias is then quantized like any other: int32 codes rint(c' / (s_in·s_w)) where the
input and weights are 8-bit or narrower (:mod:`deployq.core.qformula`), so what remains of δ after
correction is that new rounding, at most half a step of s_in·s_w per channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx

from deployq.core.folding import bn_scale
from deployq.core.progress import progress_bar
from deployq.ptq.layers import (LayerData, capture, channel_dim, quantized_output, select_layers,
                                take_batches)
from deployq.qat.fused import QuantLayer


@dataclass(frozen=True)
class BiasCorrectionReport:
    """Per corrected layer: (path, mean_c |δ_c| / std(y)), the mean correction relative to the
    standard deviation of the float pre-activation output over all its elements; ``skipped``: the
    layers with neither a bias nor a BatchNorm (left as they are)."""

    layers: tuple[tuple[str, float], ...]
    skipped: tuple[str, ...] = ()


def channel_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over every dimension but the channel dimension `dim`."""
    return t.transpose(0, dim % t.ndim).reshape(t.shape[dim], -1).mean(1)


def output_error(layer: QuantLayer, data: LayerData) -> torch.Tensor:
    """δ_c = E[y_q − y]_c: the quantized layer's mean error per output channel."""
    return channel_mean(quantized_output(layer, data.x_quant) - data.y_float, channel_dim(layer))


def bias_rounding(layer: QuantLayer) -> torch.Tensor | float:
    """r = Q_b(c') − c': what the int32 rounding adds to the folded bias now (0 where it stays float)."""
    with torch.no_grad():
        bias = layer.folded_weight_and_bias()[1]
        return 0.0 if bias is None else layer.quantize_bias(bias) - bias


def has_bias_parameter(layer: QuantLayer) -> bool:
    """Whether the layer's folded bias has a float parameter to go through (BN's β, or a bias)."""
    return (layer.bn is not None and layer.bn.affine) or layer.layer.bias is not None


def shift_bias(layer: QuantLayer, delta: torch.Tensor) -> None:
    """Add `delta` (per output channel) to the layer's BN-folded bias c', through its float parameters."""
    bn = layer.bn
    with torch.no_grad():
        if bn is not None and bn.affine:
            bn.bias.add_(delta)
        elif bn is not None:
            a = bn_scale(torch.ones_like(bn.running_var), bn.running_var, bn.eps)
            layer.layer.bias.add_(delta / a)
        else:
            layer.layer.bias.add_(delta)


def layer_errors(model: fx.GraphModule, batches: Iterable[Any], reference: fx.GraphModule, *,
                 max_batches: int = 8, layers: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """{path: δ} for the chosen layers of `model`, the targets from `reference`'s float mode."""
    inputs = take_batches(model, batches, max_batches)
    return {path: output_error(layer, capture(model, path, inputs, reference))
            for path, layer in select_layers(model, layers)}


def correct_bias(model: fx.GraphModule, batches: Iterable[Any], *, max_batches: int = 8,
                 layers: Optional[Sequence[str]] = None, progress: bool = False,
                 reference: Optional[fx.GraphModule] = None) -> BiasCorrectionReport:
    """Correct the bias of every quantized weight layer of a prepared, calibrated `model`, in place.

    `batches`: calibration inputs (the first `max_batches` are used). `layers`: module paths to
    restrict to (default: every QuantLayer with a weight quantizer that owns its parameters).
    `reference`: the prepared model whose float mode gives the targets; by default a copy of
    `model` as it is when called. Every module's mode is restored afterwards.
    """
    inputs = take_batches(model, batches, max_batches)
    chosen = select_layers(model, layers)
    reference = reference if reference is not None else copy.deepcopy(model)
    results = []
    skipped = tuple(path for path, layer in chosen if not has_bias_parameter(layer))
    chosen = [(path, layer) for path, layer in chosen if has_bias_parameter(layer)]
    for path, layer in progress_bar(chosen, "bias correction", total=len(chosen), enabled=progress):
        data = capture(model, path, inputs, reference)
        delta = output_error(layer, data)
        shift_bias(layer, bias_rounding(layer) - delta)
        spread = float(data.y_float.std())
        results.append((path, float(delta.abs().mean()) / spread if spread > 0 else 0.0))
    return BiasCorrectionReport(tuple(results), skipped)
