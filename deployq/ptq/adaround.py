"""AdaRound: learned up/down rounding of the weights (Nagel et al., "Up or Down? Adaptive Rounding
for Post-Training Quantization", ICML 2020).

Layer by layer in graph order, with the weight's scale s and zero point zp as calibration left them,
each weight element W (BN folded) gets a learned variable V:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + zp, qmin, qmax) − zp),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)

with ζ = 1.1, γ = −0.1 and V initialised so that h(V) = W/s − ⌊W/s⌋. V minimises

    ‖layer(x_q; W̃) − y‖² + λ · Σ (1 − |2h(V) − 1|^β)

where x_q is what the layer reads in the quantized model (every earlier layer's quantization
included: the paper's asymmetric reconstruction, its eq. 25), y the float model's pre-activation
output on its float input, and the squared error is summed over output channels and averaged over
samples and positions (as the paper's reference code). The regulariser is off for the first 20% of
the iterations, then β is annealed linearly from 20 to 2; the bias stays float. Finally h is fixed
to {0, 1} (h ≥ 0.5).

The result is stored where the exporter reads it: the layer's float weight becomes the one whose
BN-folded value is s·(q − zp) (so the exporter's and the fake quantizer's own rounding, rint(W'/s)
+ zp, land on the chosen codes q), and the weight quantizer stops recomputing its qparams from the
weight (:meth:`~deployq.qat.quantizers.FakeQuantizer.keep_qparams`; checkpoints record it). The
float mode of the model then runs the rounded weights (export writes the float ONNX model from a
copy taken before, :mod:`deployq.ptq.pipeline`). A layer whose rounding does not lower the loss on the captured data
keeps rounding to nearest.

Two guards keep a layer at nearest rounding where the learned one would fit the calibration samples
and not others (:func:`why_nearest`):

* *underdetermined*: the layer sees fewer rows (samples × output positions) than each output
  channel has weights (a Linear layer reads one row per sample): its rounding can then fit those
  rows whatever the data, and says nothing of new ones;
* *not general*: the rounding is first learned on every other sample (the even ones) and must
  lower the loss on the odd ones, which it did not see; only then is it learned on all of them
  (at most 1.5 times the steps' work).

Measured on facenet-pytorch's trained MTCNN networks, 32 calibration crops of three photographs,
output SQNR on 256 crops of three others, three calibration draws (change from plain calibration):
ONet -1.81, +0.07, -0.97 dB unguarded, 0.00, -0.23, -0.75 guarded; RNet +0.56, -2.08, +1.04
unguarded, unchanged guarded (the learned rounding of its convolutions alone lowered the SQNR on
its own samples, and the pipeline's check undid it); PNet (64 crops) +0.36, +1.13, +0.66 either
way; the trained digits CNN +1.77 unguarded, +1.68 guarded; the low-light network +1.83 and +1.82
dB, with 38 of its 65 layers kept at nearest rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx

from deployq.core.progress import progress_bar
from deployq.core.qformula import broadcast_shape, quantize
from deployq.ptq.layers import (LayerData, capture, channel_dim, quantized_output, select_layers,
                                take_batches)
from deployq.qat.calibrate import weight_qparams
from deployq.qat.fused import QuantLayer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's ζ, γ)
BETA_START, BETA_END = 20.0, 2.0
WARM_UP = 0.2  # share of the iterations without the rounding regulariser


UNDERDETERMINED = "underdetermined"  # why_nearest's reasons, as AdaRoundLayer.kept_nearest records them
NOT_GENERAL = "not general"
WORSE = "worse"
MIN_HALF = 4  # samples in each half below which the learned rounding is not checked on a half
KEPT_NEAREST = {UNDERDETERMINED: "fewer samples × positions than weights per channel",  # each reason, in words
                NOT_GENERAL: "their rounding learned on half the samples lost on the other half",
                WORSE: "their learned rounding did not lower the loss"}


@dataclass(frozen=True)
class AdaRoundLayer:
    """One layer's result: losses (see :func:`reconstruction_loss`, on the captured data, the layer
    as it computes in quantize mode) with nearest and with the learned rounding, and `flipped`, the
    share of weights not rounded to nearest (0, and equal losses, where nearest was kept).
    `kept_nearest`: why nearest rounding was kept (:data:`UNDERDETERMINED`, :data:`NOT_GENERAL`:
    see the module docstring; :data:`WORSE`: the learned rounding did not lower the loss on all
    the samples), or "" where the learned one is used."""

    path: str
    iterations: int
    loss_before: float
    loss_after: float
    flipped: float
    kept_nearest: str = ""


@dataclass(frozen=True)
class AdaRoundReport:
    layers: tuple[AdaRoundLayer, ...]


@dataclass(frozen=True)
class _Grid:
    """The weight's quantization grid, scale and zero point shaped to broadcast over the weight."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = `rest` (the fractional part of W/s, in [0, 1))."""
    p = torch.clamp((rest - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def beta_at(step: int, iterations: int) -> Optional[float]:
    """The regulariser's β at `step`: None during the warm-up, then linear from 20 to 2."""
    start = int(WARM_UP * iterations)
    if step < start:
        return None
    progress = (step - start) / max(1, iterations - start)
    return BETA_END + (BETA_START - BETA_END) * (1.0 - progress)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero only where every h is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def reconstruction_loss(y: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
    """‖y − target‖² summed over output channels (`dim`), averaged over samples and positions."""
    return (y - target).pow(2).sum(dim).mean()


def _grid(layer: QuantLayer, weight: torch.Tensor) -> _Grid:
    q = layer.weight_quant
    scale, zero_point = weight_qparams(layer)
    shape = broadcast_shape(weight.ndim, q.axis) if scale.ndim else []
    reshape = (lambda t: t.reshape(shape)) if shape else (lambda t: t)
    return _Grid(reshape(scale), reshape(zero_point), q.qmin, q.qmax)


def _weight(floor: torch.Tensor, h: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """W̃ = s · (clamp(⌊W/s⌋ + h + zp, qmin, qmax) − zp)."""
    return grid.scale * (torch.clamp(floor + h + grid.zero_point, grid.qmin, grid.qmax) - grid.zero_point)


def learn_rounding(layer: QuantLayer, data: LayerData, floor: torch.Tensor, rest: torch.Tensor, grid: _Grid,
                   bias: Optional[torch.Tensor], *, iterations: int, reg_weight: float, lr: float,
                   batch_size: int) -> torch.Tensor:
    """Optimise V (Adam) and return the hard rounding h ∈ {0, 1} (h(V) ≥ 0.5)."""
    v = torch.nn.Parameter(initial_v(rest))
    optimizer = torch.optim.Adam([v], lr=lr)
    dim, n = channel_dim(layer), data.x_quant.shape[0]
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for step in range(iterations):
            rows = torch.randperm(n, generator=generator)[:batch_size] if n > batch_size else slice(None)
            h = rectified_sigmoid(v)
            y = layer._run_layer(data.x_quant[rows], _weight(floor, h, grid), bias)
            loss = reconstruction_loss(y, data.y_float[rows], dim)
            beta = beta_at(step, iterations)
            if beta is not None:
                loss = loss + reg_weight * rounding_regularizer(h, beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (rectified_sigmoid(v.detach()) >= 0.5).to(floor.dtype)


def store_codes(layer: QuantLayer, codes: torch.Tensor, grid: _Grid) -> None:
    """Make the layer's BN-folded weight s·(q − zp) and freeze the weight's qparams.

    With BN, the layer's weight is s·(q − zp) / a (a = γ/√(σ² + ε), the fold's factor); a channel
    with a = 0 folds to 0 whatever its weight and is left as it is.
    """
    wanted = grid.scale * (codes - grid.zero_point)
    weight = layer.layer.weight
    factor = layer.fold_factor()
    if factor is not None:
        a = factor.reshape(broadcast_shape(weight.ndim, layer.channel_axis)).expand_as(weight)
        wanted = torch.where(a != 0, wanted / torch.where(a != 0, a, torch.ones_like(a)), weight.detach())
    with torch.no_grad():
        weight.copy_(wanted)
    layer.weight_quant.keep_qparams()  # the qparams stay calibration's


def current_codes(layer: QuantLayer, grid: _Grid) -> torch.Tensor:
    """The codes the exporter writes: clamp(rint(W'/s) + zp, qmin, qmax) of the folded weight."""
    folded = layer.folded_weight_and_bias()[0].detach()
    return quantize(folded, grid.scale, grid.zero_point, grid.qmin, grid.qmax)


def rows_and_columns(layer: QuantLayer, data: LayerData) -> tuple[int, int]:
    """(rows, columns) of the layer's least-squares problem: the output positions over all samples
    (the pre-activation output's elements per channel), and the weights per output channel."""
    y = data.y_float
    return y.numel() // y.shape[channel_dim(layer)], layer.layer.weight[0].numel()


def halves(data: LayerData) -> Optional[tuple[LayerData, LayerData]]:
    """The even and the odd samples of `data` (samples taken in turn from the calibration set, so
    that both halves see its variety), or None with fewer than :data:`MIN_HALF` samples in each."""
    if data.x_quant.shape[0] < 2 * MIN_HALF:
        return None
    return tuple(LayerData(data.x_quant[start::2], data.x_float[start::2], data.y_float[start::2])
                 for start in (0, 1))


def why_nearest(layer: QuantLayer, data: LayerData, floor: torch.Tensor, rest: torch.Tensor, grid: _Grid,
                bias: Optional[torch.Tensor], **learning: Any) -> str:
    """Why the layer keeps nearest rounding before any learning on all its samples (the module
    docstring's guards), or "" where its rounding is to be learned. `learning`: learn_rounding's
    keyword arguments."""
    rows, columns = rows_and_columns(layer, data)
    if rows < columns:
        return UNDERDETERMINED
    split = halves(data)
    if split is None:
        return ""
    learn, check = split
    h = learn_rounding(layer, learn, floor, rest, grid, bias, **learning)
    dim = channel_dim(layer)
    with torch.no_grad():
        learned_output = layer._run_layer(check.x_quant, _weight(floor, h, grid), bias)
        learned = reconstruction_loss(learned_output, check.y_float, dim)
        nearest = reconstruction_loss(quantized_output(layer, check.x_quant), check.y_float, dim)
    return "" if learned < nearest else NOT_GENERAL


def adaround_layer(layer: QuantLayer, path: str, data: LayerData, *, iterations: int, reg_weight: float,
                   lr: float, batch_size: int, guard: bool = True) -> AdaRoundLayer:
    """AdaRound one layer in place (see the module docstring; `guard`: with :func:`why_nearest`)."""
    dim = channel_dim(layer)
    learning = dict(iterations=iterations, reg_weight=reg_weight, lr=lr, batch_size=batch_size)
    with torch.no_grad():
        folded, bias = (t.detach() if t is not None else None for t in layer.folded_weight_and_bias())
        grid = _grid(layer, folded)
        nearest = current_codes(layer, grid)
        loss_before = float(reconstruction_loss(quantized_output(layer, data.x_quant), data.y_float, dim))
        ratio = folded / grid.scale
        floor = torch.floor(ratio)
    reason = why_nearest(layer, data, floor, ratio - floor, grid, bias, **learning) if guard else ""
    if reason:
        return AdaRoundLayer(path, iterations, loss_before, loss_before, 0.0, reason)
    original = layer.layer.weight.detach().clone()
    h = learn_rounding(layer, data, floor, ratio - floor, grid, bias, **learning)
    with torch.no_grad():
        store_codes(layer, torch.clamp(floor + h + grid.zero_point, grid.qmin, grid.qmax), grid)
        loss_after = float(reconstruction_loss(quantized_output(layer, data.x_quant), data.y_float, dim))
        if loss_after > loss_before:  # keep nearest rounding
            layer.layer.weight.copy_(original)
            loss_after, reason = loss_before, WORSE
        flipped = float((current_codes(layer, grid) != nearest).float().mean())
    return AdaRoundLayer(path, iterations, loss_before, loss_after, flipped, reason)


def adaround(model: fx.GraphModule, batches: Iterable[Any], *, iterations: int = 500, reg_weight: float = 0.01,
             max_batches: int = 8, layers: Optional[Sequence[str]] = None, progress: bool = False,
             lr: float = 1e-2, batch_size: int = 32, reference: Optional[fx.GraphModule] = None,
             guard: bool = True) -> AdaRoundReport:
    """AdaRound every quantized weight layer of a prepared, calibrated `model`, in place.

    `batches`: calibration inputs (the first `max_batches` are used). `layers`: module paths to
    restrict to (default: every QuantLayer with a weight quantizer that owns its parameters).
    `reference`: the prepared model whose float mode gives the targets; by default a copy of
    `model` as it is when called (pass one to chain with other methods that change float weights).
    `guard`: keep nearest rounding where the learned one would not generalize (:func:`why_nearest`).
    Every module's mode is restored afterwards.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    inputs = take_batches(model, batches, max_batches)
    chosen = select_layers(model, layers)
    reference = reference if reference is not None else copy.deepcopy(model)
    results = []
    for path, layer in progress_bar(chosen, "adaround", total=len(chosen), enabled=progress):
        data = capture(model, path, inputs, reference)
        results.append(adaround_layer(layer, path, data, iterations=iterations, reg_weight=reg_weight,
                                      lr=lr, batch_size=batch_size, guard=guard))
    return AdaRoundReport(tuple(results))
