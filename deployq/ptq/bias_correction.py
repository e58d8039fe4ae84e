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

A channel whose measured shift is within ``SIGNIFICANCE`` standard errors of zero is not
corrected (δ_c = 0 there): the standard error comes from the spread of the per-sample mean errors,
and on few samples (a Linear layer sees one value per sample and channel) a correction of noise
adds noise to the data it did not see. On facenet-pytorch's RNet, correcting every channel cost
1.6–2.5 dB of held-out output SQNR.

All samples are stacked into one batch and the model runs once in quantize mode: a hook before
each layer measures δ on what it reads and corrects it, and the layers after it compute with the
corrected bias, as one pass per layer would (a model that will not take the stacked batch gets
one pass per layer). The float targets come from one float pass before anything changes.

The corrected bias is then quantized like any other: int32 codes rint(c' / (s_in·s_w)) where the
input and weights are 8-bit or narrower (:mod:`deployq.core.qformula`), so what remains of δ after
correction is that new rounding, at most half a step of s_in·s_w per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import fx, nn

from deployq.core.progress import progress_bar
from deployq.ptq.layers import (LayerData, capture, channel_dim, float_output_means, modes, quantized_input,
                                quantized_output, select_layers, take_batches)
from deployq.qat.fused import QuantLayer


SIGNIFICANCE = 2.0  # a channel's mean error is corrected when it is this many standard errors from zero


@dataclass(frozen=True)
class BiasCorrectionReport:
    """Per corrected layer: (path, mean_c |δ_c| / std(y)), the mean correction relative to the
    standard deviation of the float pre-activation output over all its elements; ``skipped``: the
    layers with neither a bias nor a BatchNorm (left as they are); ``within_noise``: how many
    output channels, over all layers, were left uncorrected because their shift was not
    significant, and ``channels`` how many there were."""

    layers: tuple[tuple[str, float], ...]
    skipped: tuple[str, ...] = ()
    within_noise: int = 0
    channels: int = 0


def channel_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over every dimension but the channel dimension `dim`."""
    return t.transpose(0, dim % t.ndim).reshape(t.shape[dim], -1).mean(1)


def output_error(layer: QuantLayer, data: LayerData) -> torch.Tensor:
    """δ_c = E[y_q − y]_c: the quantized layer's mean error per output channel."""
    return channel_mean(quantized_output(layer, data.x_quant) - data.y_float, channel_dim(layer))


def per_sample_means(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, C) in float64: the mean of every sample (dimension 0) and channel (`dim`) over the rest."""
    return t.movedim(dim, 1).reshape(t.shape[0], t.shape[dim], -1).double().mean(2)


def significant(per_sample: torch.Tensor, significance: float = SIGNIFICANCE) -> torch.Tensor:
    """δ_c, the mean of the per-sample mean errors (N, C), where it is more than `significance`
    standard errors (their spread over √N) from zero, else 0. With one sample there is no spread
    to measure and every channel keeps its δ_c."""
    delta = per_sample.mean(0)
    if per_sample.shape[0] < 2:
        return delta
    standard_error = per_sample.std(0) / per_sample.shape[0] ** 0.5
    return torch.where(delta.abs() > significance * standard_error, delta, torch.zeros_like(delta))


def significant_error(layer: QuantLayer, data: LayerData, significance: float = SIGNIFICANCE) -> torch.Tensor:
    """:func:`significant` of the layer's error on captured data: y_q − y per sample and channel."""
    error = quantized_output(layer, data.x_quant) - data.y_float
    return significant(per_sample_means(error, channel_dim(layer)), significance).to(error.dtype)


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
        elif bn is not None:  # no β: the layer's own bias, scaled by the fold
            layer.layer.bias.add_(delta / layer.fold_factor())
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
    `reference`: the prepared model whose float mode gives the targets; by default `model` as it
    is when called (its targets are taken in one float pass before anything is corrected).
    Every module's mode is restored afterwards.
    """
    inputs = take_batches(model, batches, max_batches)
    chosen = select_layers(model, layers)
    skipped = tuple(path for path, layer in chosen if not has_bias_parameter(layer))
    chosen = [(path, layer) for path, layer in chosen if has_bias_parameter(layer)]
    # every layer's float target in one pass, before any correction changes the float parameters
    targets = float_output_means(reference if reference is not None else model, [p for p, _ in chosen], inputs)
    corrected: dict[str, torch.Tensor] = {}

    def correct(path: str, layer: QuantLayer, x_quant: torch.Tensor) -> None:
        y_quant = quantized_output(layer, x_quant)
        delta = significant(per_sample_means(y_quant, channel_dim(layer)) - targets[path][0]).to(y_quant.dtype)
        shift_bias(layer, bias_rounding(layer) - delta)
        corrected[path] = delta

    if not _in_one_pass(model, chosen, inputs, correct):
        for path, layer in progress_bar(chosen, "bias correction", total=len(chosen), enabled=progress):
            correct(path, layer, quantized_input(model, path, inputs))
    results = tuple((path, float(corrected[path].abs().mean()) / targets[path][1] if targets[path][1] > 0 else 0.0)
                    for path, _ in chosen)
    within_noise = sum(int((d == 0).sum()) for d in corrected.values())
    return BiasCorrectionReport(results, skipped, within_noise, sum(d.numel() for d in corrected.values()))


def _in_one_pass(model: fx.GraphModule, chosen: Sequence[tuple[str, QuantLayer]], inputs: Sequence[tuple],
                 correct: Callable[[str, QuantLayer, torch.Tensor], None]) -> bool:
    """Correct every layer in one quantized forward of all samples stacked into one batch: a hook
    before each layer corrects it on what it reads, and the layers after it then compute with
    its corrected bias, as the layer-by-layer passes would (same inputs, same order), at the cost
    of one forward instead of one per layer. False (and nothing changed) where the samples do not
    stack into one batch or the model does not run on it: the caller then goes layer by layer."""
    if len(inputs) < 2 or any(len(b) != len(inputs[0]) for b in inputs):
        return False
    try:
        stacked = tuple(torch.cat(parts) for parts in zip(*inputs))
    except (RuntimeError, TypeError):
        return False
    saved = [(p, p.detach().clone()) for _, layer in chosen for p in layer.parameters()]
    seen: set[str] = set()

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if path not in seen:  # one correction per layer, on its first call
                seen.add(path)
                correct(path, module, args[0].detach())
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(path)) for path, layer in chosen]
    try:
        with torch.no_grad(), modes(model, "quantize"):
            model(*stacked)
        if len(seen) == len(chosen):
            return True
    except (RuntimeError, ValueError, IndexError):
        pass  # a model written for one batch size (a view with the batch in it): layer by layer instead
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():  # undo what a failed pass changed
        for p, value in saved:
            p.copy_(value)
    return False
