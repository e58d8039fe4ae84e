"""Per-layer data for the post-training methods: what a QuantLayer reads and what it should produce.

For a prepared, calibrated model and one of its layers (a :class:`~deployq.qat.fused.QuantLayer`,
by module path), :func:`capture` runs the batches and keeps

* ``x_quant``: the layer's input in ``quantize`` mode, what the deployed layer really reads (every
  earlier layer's quantization included: AdaRound's "asymmetric reconstruction", Nagel et al. 2020);
* ``x_float``, ``y_float``: its input and its pre-activation output, BN applied, in ``float`` mode
  (the original modules, bit-identical to the float model).

Forward hooks capture the tensors and stop the forward at the layer (nothing after it runs); every
module's mode and the model's train flag are restored afterwards. Memory is bounded by
``max_batches`` (the tensors are kept whole: a convolution needs its input's neighbourhoods).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import fx, nn

from deployq.ptq.batched import model_outputs
from deployq.qat.calibrate import input_names, is_calibrated, model_inputs
from deployq.qat.fused import QuantLayer
from deployq.qat.quantizers import FakeQuantizer


@dataclass(frozen=True)
class LayerData:
    """One layer's captured tensors, batches concatenated along dimension 0."""

    x_quant: torch.Tensor
    x_float: torch.Tensor
    y_float: torch.Tensor


class _Stop(Exception):
    """Raised by a hook once the layer's tensors are captured: the rest of the model is not run."""


def weight_layers(model: fx.GraphModule) -> list[tuple[str, QuantLayer]]:
    """(path, layer) of every QuantLayer with a weight quantizer, in graph (topological) order."""
    modules = dict(model.named_modules())
    found, seen = [], set()
    for node in model.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, QuantLayer) and module.weight_quant is not None and node.target not in seen:
            seen.add(node.target)
            found.append((str(node.target), module))
    return found


def shared_parameters(layers: Sequence[tuple[str, QuantLayer]]) -> set[str]:
    """Paths of layers whose weight or BN is also another layer's (a module reused at several call
    sites, de-duplicated into copies that share parameters): changing one would change the others."""
    owners: dict[int, list[str]] = {}
    for path, layer in layers:
        for p in {id(p) for p in layer.parameters()}:
            owners.setdefault(p, []).append(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


def select_layers(model: fx.GraphModule, paths: Optional[Sequence[str]]) -> list[tuple[str, QuantLayer]]:
    """:func:`weight_layers` that own their parameters, or those named in `paths` (in graph order).

    Layers sharing parameters are left out by default and refused by name (see
    :func:`shared_parameters`); an unknown path is an error.
    """
    every = weight_layers(model)
    shared = shared_parameters(every)
    if paths is None:
        return [(p, m) for p, m in every if p not in shared]
    known = {p for p, _ in every}
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ValueError(f"no quantized weight layer {', '.join(map(repr, unknown))}; "
                         f"the model's are {', '.join(sorted(known)) or 'none'}")
    refused = [p for p in paths if p in shared]
    if refused:
        raise ValueError(f"{', '.join(map(repr, refused))} share their parameters with another call site of "
                         "the same module; they cannot be adjusted on their own")
    return [(p, m) for p, m in every if p in set(paths)]


def take_batches(model: fx.GraphModule, batches: Iterable[Any], max_batches: int) -> list[tuple]:
    """The model's positional inputs of the first `max_batches` batches (at least one)."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    if not is_calibrated(model):
        raise ValueError("the model is not calibrated: run deployq.calibrate(model, batches) first")
    names = input_names(model)
    taken = [model_inputs(b, names) for b in itertools.islice(batches, max_batches)]
    if not taken:
        raise ValueError("no batch of inputs was given")
    return taken


@contextmanager
def modes(model: nn.Module, mode: str) -> Iterator[None]:
    """Every quantizer and QuantLayer in `mode`, the model in eval; all restored on exit.

    Modes are set directly (not through set_mode): leaving ``observe`` would finish a calibration.
    """
    saved = [(m, m.mode) for m in model.modules() if isinstance(m, (FakeQuantizer, QuantLayer))]
    was_training = model.training
    try:
        for m, _ in saved:
            m.mode = mode
        model.eval()
        yield
    finally:
        for m, old in saved:
            m.mode = old
        model.train(was_training)


@contextmanager
def reused_weights(model: nn.Module) -> Iterator[None]:
    """Every QuantLayer of `model` computes its quantized weight and bias once and reuses them
    (:meth:`QuantLayer.deployed_weight_and_bias`) until the context ends; a pass over many batches
    then quantizes each weight once, not once per batch."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    try:
        for m in layers:
            m.reuse_deployed = True
        yield
    finally:
        for m in layers:
            m.reuse_deployed = False
            m.__dict__["_deployed"] = None


def _run_until(model: nn.Module, inputs: Sequence[tuple], hooks: Sequence[tuple[nn.Module, str, Any]]) -> None:
    """Run every batch through `model` until a hook raises _Stop; hooks are (module, kind, fn)."""
    handles = []
    try:
        for module, kind, fn in hooks:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn))
        with torch.no_grad(), reused_weights(model):
            for batch in inputs:
                try:
                    model(*batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def quantized_input(model: fx.GraphModule, path: str, inputs: Sequence[tuple]) -> torch.Tensor:
    """What layer `path` reads in quantize mode, for every batch."""
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().clone())
        raise _Stop

    with modes(model, "quantize"):
        _run_until(model, inputs, [(model.get_submodule(path), "pre", grab)])
    return torch.cat(seen)


def float_input_output(model: fx.GraphModule, path: str, inputs: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `path`'s input and pre-activation output (BN applied) in float mode, for every batch."""
    layer: QuantLayer = model.get_submodule(path)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []

    def grab_input(module: nn.Module, args: tuple) -> None:
        xs.append(args[0].detach().clone())

    def grab_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        ys.append(output.detach().clone())
        raise _Stop

    last = layer.bn if layer.bn is not None else layer.layer
    with modes(model, "float"):
        _run_until(model, inputs, [(layer, "pre", grab_input), (last, "post", grab_output)])
    return torch.cat(xs), torch.cat(ys)


def per_sample_means(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, C) in float64: the mean of every sample (dimension 0) and channel (`dim`) over the rest
    (summed in the tensor's own precision, pairwise, which keeps its relative error near 1e-7;
    a float64 copy of every activation took 0.9 s of bias correction's 6.6 s on PP-OCR's detector)."""
    return t.movedim(dim, 1).reshape(t.shape[0], t.shape[dim], -1).mean(2).double()


@dataclass(frozen=True)
class FloatPass:
    """One float pass over the inputs: per layer path (means, spread), the mean of each sample
    and output channel of the layer's pre-activation output (BN applied), (N, C) in float64, and
    the standard deviation of that output over all its elements; and the model's outputs as
    :func:`~deployq.ptq.batched.model_outputs` returns them (so a check scored on the same
    inputs reads them instead of running the float model again)."""

    means: dict[str, tuple[torch.Tensor, float]]
    outputs: list[list[torch.Tensor]]


def float_pass(model: fx.GraphModule, paths: Sequence[str], inputs: Sequence[tuple]) -> FloatPass:
    """:class:`FloatPass` of layers `paths`, the inputs run grouped as model_outputs groups them.
    What bias correction compares with, at a fraction of :func:`float_input_output`'s memory."""
    kept: dict[str, list] = {p: [] for p in paths}  # per call: per-sample means, Σy, Σy², count
    pending: dict[str, list] = {}

    def grab(path: str, dim: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            y = output.detach()
            means = per_sample_means(y, dim)
            flat = y.reshape(-1)  # Σy² for the spread the report gives: float32 is enough
            pending.setdefault(path, []).append((means, float(means.sum()) * (y.numel() // means.numel()),
                                                 float(flat.dot(flat)), y.numel()))
        return hook

    def run(*args: Any) -> Any:
        pending.clear()  # a stacked run the model refused leaves nothing behind
        result = model(*args)
        for path, calls in pending.items():
            kept[path].extend(calls)
        return result

    handles = []
    for path in paths:
        layer: QuantLayer = model.get_submodule(path)
        handles.append((layer.bn if layer.bn is not None else layer.layer).register_forward_hook(
            grab(path, channel_dim(layer))))
    try:
        with modes(model, "float"):
            outputs = model_outputs(run, inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for path, calls in kept.items():
        count = sum(c[3] for c in calls)
        mean = sum(c[1] for c in calls) / max(count, 1)
        variance = max(sum(c[2] for c in calls) / max(count, 1) - mean * mean, 0.0) * count / max(count - 1, 1)
        found[path] = (torch.cat([c[0] for c in calls]), variance ** 0.5)
    return FloatPass(found, outputs)


def capture(model: fx.GraphModule, path: str, inputs: Sequence[tuple],
            reference: Optional[fx.GraphModule] = None) -> LayerData:
    """Layer `path`'s quantized input (from `model`) and float input and pre-activation output
    (from `reference`, a prepared model with the same paths; `model` itself by default)."""
    x_float, y_float = float_input_output(reference if reference is not None else model, path, inputs)
    return LayerData(quantized_input(model, path, inputs), x_float, y_float)


def channel_dim(layer: QuantLayer) -> int:
    """The output-channel dimension of the layer's output: last for Linear, 1 for convolutions."""
    return -1 if isinstance(layer.layer, nn.Linear) else 1


def quantized_output(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's pre-activation output in quantize mode: layer(x, Q_w(W'), Q_b(c')), as its
    forward computes it (BN folded, int32 bias), without the activation."""
    with torch.no_grad(), modes(layer, "quantize"):
        weight, bias = layer.folded_weight_and_bias()
        return layer._run_layer(x, layer.quantized_weight(weight, bias), layer.quantize_bias(bias))
