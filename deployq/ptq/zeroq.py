"""ZeroQ: calibration inputs without data (Cai et al., "ZeroQ: A Novel Zero Shot Quantization
Framework", CVPR 2020).

Calibration needs inputs to measure activation ranges. When no data is at hand, ZeroQ "distils"
them from the model itself: every BatchNorm layer remembers the per-channel mean and variance of
its input over the training set, so inputs whose batch statistics match those running statistics
at every BN layer drive the network's activations to the ranges real data would. Starting from
noise, the inputs are optimized (the model frozen, in eval mode) to minimize

    L(x) = sum over BN layers l of  ||mu_l(x) - mu_l||^2 / C_l + ||sigma_l(x) - sigma_l||^2 / C_l

with mu_l(x), sigma_l(x) = sqrt(var_l(x) + eps) the per-channel mean and standard deviation of the
BN's input over every non-channel dimension (biased variance, as BN normalizes with), and
mu_l = running_mean, sigma_l = sqrt(running_var + eps). The paper sums plain L2 norms; here each
layer's squared distances are divided by its channel count C_l (a mean over channels), so a wide
layer weighs as much as a narrow one and the loss does not grow with the width of the network.

    data = distilled_data(model, (32, 3, 224, 224), batches=4)
    deployq.calibrate(qmodel, data.batches)

Its limit: the inputs are only as good as the BN statistics (stale or unrepresentative running
statistics give unrepresentative inputs), and a model without BatchNorm cannot use it. Run it on
the float model (or a prepared one in ``float`` mode): a layer whose BN is folded away is not seen.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deployq.core.progress import progress_bar

__all__ = ["DistilledData", "ZeroQError", "distilled_data"]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ZeroQError(ValueError):
    """Bad options, or a model ZeroQ cannot distil inputs from."""


@dataclass(frozen=True)
class DistilledData:
    """The distilled inputs and how well they match the BN statistics.

    ``loss_start`` / ``loss_end``: the loss L (summed over the BN layers) of each batch at its
    starting noise and at its final inputs, averaged over the batches.
    """

    batches: list[torch.Tensor]
    bn_layers: int
    loss_start: float
    loss_end: float


def _check_options(input_shape: tuple[int, ...], batches: int, steps: int, lr: float,
                   value_range: tuple[float, float] | None) -> None:
    if len(input_shape) < 2 or any(d < 1 for d in input_shape):
        raise ZeroQError(f"input_shape must be (batch, channels, ...) of positive ints, got {input_shape!r}")
    if batches < 1:
        raise ZeroQError(f"batches must be at least 1, got {batches}")
    if steps < 1:
        raise ZeroQError(f"steps must be at least 1, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ZeroQError(f"lr must be a positive number, got {lr}")
    if value_range is None:
        return
    if len(value_range) != 2 or not all(math.isfinite(v) for v in value_range) or value_range[0] >= value_range[1]:
        raise ZeroQError(f"value_range must be (lo, hi) with finite lo < hi, got {value_range!r}")


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that hold running statistics."""
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.running_mean is not None]


def bn_statistics_loss(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """||mu(x) - running_mean||^2 / C + ||sqrt(var(x) + eps) - sqrt(running_var + eps)||^2 / C,
    per channel (dim 1) over every other dimension of the BN's input ``x``."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims)
    std = torch.sqrt(x.var(dim=dims, unbiased=False) + bn.eps)
    running_std = torch.sqrt(bn.running_var + bn.eps)
    return ((mean - bn.running_mean) ** 2).mean() + ((std - running_std) ** 2).mean()


class _BNLoss:
    """Forward pre-hooks on the BN layers that collect their loss terms during one forward."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [bn.register_forward_pre_hook(self._hook) for bn in layers]

    def _hook(self, bn: nn.Module, args: tuple) -> None:
        self.terms.append(bn_statistics_loss(bn, args[0]))

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """L(x): one forward of ``model``, the BN terms summed."""
        self.terms.clear()
        model(x)
        if not self.terms:
            raise ZeroQError(f"no BatchNorm layer of {type(model).__name__} ran in its forward "
                             "(folded or fused away?); run ZeroQ on the float model")
        loss = torch.stack(self.terms).sum()
        self.terms.clear()
        return loss

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode (BN on running statistics) whose parameters need no gradient."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def _device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _start(shape: tuple[int, ...], generator: torch.Generator, value_range: tuple[float, float] | None,
           device: torch.device) -> torch.Tensor:
    """Seeded starting inputs: N(0, 1), or uniform in [lo, hi] when a value range is given."""
    if value_range is None:
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
    else:
        lo, hi = value_range
        x = torch.rand(shape, generator=generator, dtype=torch.float32) * (hi - lo) + lo
    return x.to(device).requires_grad_(True)


def _step(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, optimizer: torch.optim.Optimizer,
          value_range: tuple[float, float] | None) -> None:
    """One Adam step on the inputs, then the clamp into the value range."""
    optimizer.zero_grad(set_to_none=True)
    loss_of(x).backward()
    optimizer.step()
    if value_range is not None:
        with torch.no_grad():
            x.clamp_(*value_range)


def distilled_data(model: nn.Module, input_shape: tuple[int, ...], *, batches: int = 4, steps: int = 200,
                   lr: float = 0.2, seed: int = 0, value_range: tuple[float, float] | None = None,
                   progress: bool = False) -> DistilledData:
    """``batches`` input batches of ``input_shape`` (batch first) whose statistics at every BN layer
    match its running statistics: each starts from seeded noise and takes ``steps`` Adam steps (``lr``)
    on L(x) = sum_l ||mu_l(x) - mu_l||^2 / C_l + ||sigma_l(x) - sigma_l||^2 / C_l.

    ``value_range=(lo, hi)``: start uniform in it and clamp into it after every step (for models that
    expect, e.g., [0, 1] images). The model is not touched: a frozen deep copy is optimized against.
    """
    try:
        input_shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        raise ZeroQError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    _check_options(input_shape, batches, steps, lr, value_range)
    frozen = _frozen_copy(model)
    layers = _bn_layers(frozen)
    if not layers:
        raise ZeroQError(f"data-free calibration needs BatchNorm statistics, and {type(model).__name__} "
                         "has no BatchNorm layer with running statistics; calibrate it with data")
    bn_loss = _BNLoss(layers)
    try:
        return _distil(frozen, bn_loss, layers, input_shape, batches, steps, lr, seed, value_range, progress)
    finally:
        bn_loss.remove()


def _distil(model: nn.Module, bn_loss: _BNLoss, layers: list[nn.Module], shape: tuple[int, ...], batches: int,
            steps: int, lr: float, seed: int, value_range: tuple[float, float] | None,
            progress: bool) -> DistilledData:
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return bn_loss(model, x)

    out: list[torch.Tensor] = []
    starts: list[float] = []
    ends: list[float] = []
    plan = itertools.product(range(batches), range(steps))
    for _, step in progress_bar(plan, "zeroq: distilling calibration inputs", total=batches * steps,
                                enabled=progress):
        if step == 0:
            x = _start(shape, generator, value_range, device)
            optimizer = torch.optim.Adam([x], lr=lr)
            with torch.no_grad():
                starts.append(loss_of(x).item())
        _step(loss_of, x, optimizer, value_range)
        if step == steps - 1:
            with torch.no_grad():
                ends.append(loss_of(x).item())
            out.append(x.detach().clone())
    return DistilledData(batches=out, bn_layers=len(layers), loss_start=sum(starts) / batches,
                         loss_end=sum(ends) / batches)
