"""Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.2; Finkelstein et al., "Fighting Quantization Bias With
Bias", 2019).

Quantizing the weights (and the earlier activations) shifts the expected output of a layer:
E[y_q] ≠ E[y]. Layer by layer in graph order, each correction seeing the previous ones, the shift
per output channel c of the pre-activation output is measured on calibration data,

    δ_c = E[y_q − y]_c,   y_q = layer_q(x_q) (the quantized model),  y = layer(x) (the float model),

and the layer's BN-folded bias c' = a·(c − μ) + β is set to Q_b(c') − δ, the bias the layer
really adds (int32-rounded, r = Q_b(c') − c' is part of δ) minus its error, so that E[y_q] = E[y]
on that data (δ kept where it is significant, and shrunk by its spread over samples if asked: see
below).
The shift Δ = r − δ goes into the float parameters:

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

A significant shift can be moved toward zero by `shrink` (``--bias-shrink``) of that spread σ_c
(the standard deviation of the per-sample mean errors, not the standard error): the correction is
then sign(δ_c)·max(|δ_c| − shrink·σ_c, 0), the part of the shift the samples share. Where the
samples disagree, other data (other photographs) has another mean error; a correction d lowers
the squared mean error of data whose own mean error is m as long as d lies between 0 and 2m, so a
smaller d is safe on more data. The default, ``SHRINK`` = 0, corrects the whole mean error, as the
papers do. Measured against 0.25 on the trained models of ``bench_peers.py`` and
``bench_onnx_in.py`` (held out as there; ``bench_peers.py`` at commit cafe4d5, where 0.25 was the
default; ``bench_onnx_in.py`` has a row for it): 0.25 kept NudeNet's YOLOv8n box F1 against
float (0.902 plain, 0.849 with the whole correction, 0.915 shrunk; output SQNR 32.28 -> 32.58 dB)
and gained 0.12 dB on PP-OCR's detector, but lowered the output SQNR in 13 of the 19 settings
(MTCNN's ONet 35.50 -> 35.05 dB, below plain calibration, where the whole correction had been
undone by the check; PP-OCR's recognizer −0.39 dB, classifier −0.24, the low-light model −0.09);
over the 15 bias rows of ``bench_peers.py`` −0.13 dB on average.

The model runs once in quantize mode, node by node over groups of stacked samples
(:func:`deployq.ptq.batched.run_node_by_node`): at each layer its output on every sample gives δ,
the bias is corrected, and the layers after it compute with the corrected bias, as one pass per
layer would; what the pass returns is the corrected model's output (up to float rounding). The
float targets come from one float pass before anything changes. A model that will not run that
way gets one pass per layer.

The corrected bias is then quantized like any other: int32 codes rint(c' / (s_in·s_w)) where the
input and weights are 8-bit or narrower (:mod:`deployq.core.qformula`), so what remains of δ after
correction is that new rounding, at most half a step of s_in·s_w per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from deployq.core.progress import Ticks, progress_bar
from deployq.ptq.batched import output_tensors, run_node_by_node, stack_groups, stacked
from deployq.ptq.layers import (FloatPass, LayerData, capture, channel_dim, float_pass, modes, per_sample_means,
                                quantized_input, quantized_output, select_layers, take_batches)
from deployq.qat.fused import QuantLayer


SIGNIFICANCE = 2.0  # a channel's mean error is corrected when it is this many standard errors from zero
SHRINK = 0.0  # ... by its mean less this many standard deviations of the per-sample mean errors (see above)


@dataclass(frozen=True)
class BiasCorrectionReport:
    """Per corrected layer: (path, mean_c |δ_c| / std(y)), the mean correction relative to the
    standard deviation of the float pre-activation output over all its elements; ``skipped``: the
    layers with neither a bias nor a BatchNorm (left as they are); ``within_noise``: how many
    output channels, over all layers, were left uncorrected because their shift was not
    significant (or not above `shrink` of its spread over samples), and ``channels`` how many
    there were; ``outputs``: the corrected model's outputs on the samples it learned from, as
    :func:`~deployq.ptq.batched.model_outputs` returns them (None where the layers were corrected
    one pass each)."""

    layers: tuple[tuple[str, float], ...]
    skipped: tuple[str, ...] = ()
    within_noise: int = 0
    channels: int = 0
    outputs: Optional[list] = field(default=None, repr=False, compare=False)  # see correct_bias


def channel_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over every dimension but the channel dimension `dim`."""
    return t.transpose(0, dim % t.ndim).reshape(t.shape[dim], -1).mean(1)


def output_error(layer: QuantLayer, data: LayerData) -> torch.Tensor:
    """δ_c = E[y_q − y]_c: the quantized layer's mean error per output channel."""
    return channel_mean(quantized_output(layer, data.x_quant) - data.y_float, channel_dim(layer))


def correction(per_sample: torch.Tensor, significance: float = SIGNIFICANCE, shrink: float = SHRINK) -> torch.Tensor:
    """The correction per channel from the per-sample mean errors (N, C): their mean δ_c moved
    toward zero by `shrink` of their spread σ_c, sign(δ_c)·max(|δ_c| − shrink·σ_c, 0), where δ_c is
    more than `significance` standard errors (σ_c / √N) from zero, else 0. With one sample there
    is no spread to measure and every channel keeps its δ_c."""
    delta = per_sample.mean(0)
    if per_sample.shape[0] < 2:
        return delta
    spread = per_sample.std(0)
    shared = torch.sign(delta) * (delta.abs() - shrink * spread).clamp(min=0)
    return torch.where(delta.abs() > significance * spread / per_sample.shape[0] ** 0.5, shared,
                       torch.zeros_like(delta))


def layer_correction(layer: QuantLayer, data: LayerData, significance: float = SIGNIFICANCE,
                     shrink: float = SHRINK) -> torch.Tensor:
    """:func:`correction` of the layer's error on captured data: y_q − y per sample and channel."""
    error = quantized_output(layer, data.x_quant) - data.y_float
    return correction(per_sample_means(error, channel_dim(layer)), significance, shrink).to(error.dtype)


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


def correctable_layers(model: fx.GraphModule, layers: Optional[Sequence[str]] = None
                       ) -> tuple[list[tuple[str, QuantLayer]], tuple[str, ...]]:
    """(path, layer) of the layers bias correction corrects (`layers`, or every quantized weight
    layer that owns its parameters, with a bias or BatchNorm to put the shift in), and the paths
    of those it leaves alone for having neither."""
    chosen = select_layers(model, layers)
    skipped = tuple(path for path, layer in chosen if not has_bias_parameter(layer))
    return [(path, layer) for path, layer in chosen if has_bias_parameter(layer)], skipped


def float_targets(model: fx.GraphModule, batches: Iterable[Any], *, max_batches: int = 8,
                  layers: Optional[Sequence[str]] = None,
                  reference: Optional[fx.GraphModule] = None) -> FloatPass:
    """What :func:`correct_bias` compares with, taken in one float pass of `reference` (default:
    `model`) before anything is corrected; computed by the caller where it also needs the float
    outputs (the check of the post-training pipeline)."""
    chosen, _ = correctable_layers(model, layers)
    return float_pass(reference if reference is not None else model, [p for p, _ in chosen],
                      take_batches(model, batches, max_batches))


def correct_bias(model: fx.GraphModule, batches: Iterable[Any], *, max_batches: int = 8,
                 layers: Optional[Sequence[str]] = None, progress: bool = False,
                 reference: Optional[fx.GraphModule] = None, targets: Optional[FloatPass] = None,
                 shrink: float = SHRINK) -> BiasCorrectionReport:
    """Correct the bias of every quantized weight layer of a prepared, calibrated `model`, in place.

    `batches`: calibration inputs (the first `max_batches` are used). `layers`: module paths to
    restrict to (default: every QuantLayer with a weight quantizer that owns its parameters).
    `reference`: the prepared model whose float mode gives the targets; by default `model` as it
    is when called (its targets are taken in one float pass before anything is corrected).
    `targets`: :func:`float_targets` of the same arguments, where the caller has taken them.
    `shrink`: how many standard deviations of a channel's per-sample errors its correction stays
    short of their mean (0: the whole mean error, as in the papers).
    Every module's mode is restored afterwards.
    """
    inputs = take_batches(model, batches, max_batches)
    chosen, skipped = correctable_layers(model, layers)
    if targets is None:  # every layer's float target in one pass, before any correction changes them
        targets = float_pass(reference if reference is not None else model, [p for p, _ in chosen], inputs)
    means = targets.means
    corrected: dict[str, torch.Tensor] = {}

    def correct(path: str, layer: QuantLayer, outputs: list[torch.Tensor]) -> None:
        """Correct `layer` from its uncorrected pre-activation outputs on every sample."""
        dim = channel_dim(layer)
        per_sample = torch.cat([per_sample_means(y, dim) for y in outputs])
        delta = correction(per_sample - means[path][0], shrink=shrink).to(outputs[0].dtype)
        shift_bias(layer, bias_rounding(layer) - delta)
        corrected[path] = delta

    ticks = Ticks(len(chosen), "bias correction, one pass", enabled=progress)
    try:
        outputs = _in_one_pass(model, chosen, inputs, lambda *args: (correct(*args), ticks.tick()))
    finally:
        ticks.close()
    if outputs is None:
        for path, layer in progress_bar(chosen, "bias correction, layer by layer", total=len(chosen),
                                        enabled=progress):
            correct(path, layer, [quantized_output(layer, quantized_input(model, path, inputs))])
    results = tuple((path, float(corrected[path].abs().mean()) / means[path][1] if means[path][1] > 0 else 0.0)
                    for path, _ in chosen)
    within_noise = sum(int((d == 0).sum()) for d in corrected.values())
    return BiasCorrectionReport(results, skipped, within_noise, sum(d.numel() for d in corrected.values()), outputs)


Correct = Callable[[str, QuantLayer, list[torch.Tensor]], None]


def _in_one_pass(model: fx.GraphModule, chosen: Sequence[tuple[str, QuantLayer]], inputs: Sequence[tuple],
                 correct: Correct) -> Optional[list[list[torch.Tensor]]]:
    """Correct every layer in one quantized pass of the samples, grouped as
    :func:`~deployq.ptq.batched.model_outputs` groups them and run node by node: each layer is
    corrected on its outputs for every sample before any later layer reads them. The model's
    outputs on the inputs (float64, one list per group), which are the corrected model's; None
    (and nothing changed) where the model does not run that way: the caller then goes layer by
    layer."""
    groups = stack_groups(inputs)
    saved = [(p, p.detach().clone()) for _, layer in chosen for p in layer.parameters()]
    functions = {path: _corrected_outputs(path, layer, correct) for path, layer in chosen}
    try:
        with torch.no_grad(), modes(model, "quantize"):
            outputs = run_node_by_node(model, [stacked(g) for g in groups], functions)
        if outputs is not None:
            return [output_tensors(value) for value in outputs]
    except (RuntimeError, ValueError, IndexError, TypeError):
        pass  # a model written for one batch size (a view with the batch in it): layer by layer instead
    with torch.no_grad():  # undo what a failed pass changed
        for p, value in saved:
            p.copy_(value)
    return None


def _corrected_outputs(path: str, layer: QuantLayer, correct: Correct) -> Callable[[list[torch.Tensor]], list]:
    """What the layer returns for every group once corrected: its pre-activation output with the
    bias it had, plus the change of its deployed bias (computed again where the correction changed
    the quantized weight too: its scale is bounded by the bias), through its activation. The same
    values as running the corrected layer, up to float rounding, at one convolution instead of two
    (PP-OCR's text detector, run alone at 2 threads: bias correction's time 5.7 -> 5.0 s)."""
    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        weight, bias = (t.clone() for t in layer.deployed_weight_and_bias())  # a float bias is the parameter itself
        outputs = [layer._run_layer(x, weight, bias) for x in inputs]
        correct(path, layer, outputs)
        new_weight, new_bias = layer.deployed_weight_and_bias()
        if not torch.equal(new_weight, weight):
            return [layer(x) for x in inputs]
        shape = [1] * outputs[0].ndim
        shape[channel_dim(layer)] = -1
        change = (new_bias - bias).reshape(shape)
        return [layer.act(y.add_(change)) if layer.act is not None else y.add_(change) for y in outputs]
    return run
