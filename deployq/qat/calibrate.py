"""Model-level QAT controls: modes, one-pass calibration, BN freezing, and the learned qparams.

    qmodel = deployq.prepare(model, example_inputs, config)
    deployq.calibrate(qmodel, batches)          # observe ~100 batches once, then quantize mode
    deployq.freeze_bn_stats(qmodel)             # optional, late in QAT
    records = deployq.qparams_of(qmodel)        # {name: QuantPoint}, the schema of qparams.json
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from deployq.core import qparams as qp
from deployq.qat.fused import QuantLayer
from deployq.qat.prepare import quant_points
from deployq.core.progress import progress_bar
from deployq.qat.quantizers import MODES, FakeQuantizer

Batch = Any


def set_mode(model: nn.Module, mode: str) -> None:
    """``float`` (the original model) | ``observe`` (calibrate) | ``quantize`` (fake-quant).

    Leaving ``observe`` turns the observers' statistics into qparams, once (the thesis: one
    calibration pass is enough, and repeating it during QAT hurts convergence).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            if m.mode == "observe" and mode != "observe":
                m.finish_calibration()
            m.mode = mode
        elif isinstance(m, QuantLayer):
            m.mode = mode


def is_calibrated(model: nn.Module) -> bool:
    """True once every activation quantizer has qparams (from calibration, training or a checkpoint)."""
    return all(bool(model.get_submodule(p.quantizer).initialized)
               for p in quant_points(model).values() if p.kind != "weight")


def input_names(model: nn.Module) -> list[str]:
    """The names of a prepared model's inputs (its forward's arguments), in order."""
    model = getattr(model, "module", model)
    return [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]


def model_inputs(batch: Batch, names: Sequence[str] = ("input",)) -> tuple:
    """The positional inputs of a model whose inputs are called `names`, from a batch:

    * a tensor (one-input models);
    * a tuple / list: its first ``len(names)`` elements (so an (input, target) pair gives the input);
    * a dict: the values of `names`, or of ``"input"`` for a one-input model.
    """
    n = len(names)
    if isinstance(batch, torch.Tensor):
        if n != 1:
            raise TypeError(f"the model takes {n} inputs ({', '.join(names)}); a batch must be a tuple or dict of them, "
                            "not one tensor")
        return (batch,)
    if isinstance(batch, dict):
        if all(name in batch for name in names):
            return tuple(batch[name] for name in names)
        if n == 1 and "input" in batch:
            return (batch["input"],)
        missing = [name for name in names if name not in batch]
        raise KeyError(f"a batch dict has no {', '.join(missing)} (keys: {', '.join(map(str, batch))})")
    if isinstance(batch, (tuple, list)):
        if len(batch) < n:
            raise TypeError(f"the model takes {n} inputs ({', '.join(names)}); a batch has {len(batch)} elements")
        return tuple(batch[:n])
    raise TypeError(f"cannot take model inputs from a batch of type {type(batch).__name__}")


def samples_in(batch: Batch) -> int:
    """How many samples a batch holds: the leading dimension of its first tensor (a tensor, a tuple
    or list of them, or a dict by input name)."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else (batch,)
    first = next((t for t in items if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def first_samples(batches: Iterable[Batch], count: int) -> list[Batch]:
    """The first batches that hold at least `count` samples together (all of them if they hold fewer):
    a budget counted in samples means the same at any batch size."""
    taken, seen = [], 0
    for batch in batches:
        if seen >= count:
            break
        taken.append(batch)
        seen += samples_in(batch)
    return taken


def calibrate(model: nn.Module, batches: Iterable[Batch], *, max_batches: Optional[int] = None,
              device: Optional[torch.device] = None, progress: bool = True,
              reduce: Optional[Callable[[nn.Module], None]] = None) -> int:
    """Run `batches` through `model` in observe mode (eval, no gradients), then switch to quantize.

    `reduce`, if given, is called between the pass and the switch (distributed runs merge the
    observers' statistics there). Returns the number of batches seen; zero is an error.
    """
    was_training = model.training
    names = input_names(model)
    set_mode(model, "observe")
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            items = itertools.islice(batches, max_batches) if max_batches else batches
            for batch in progress_bar(items, "calibrating", total=max_batches, enabled=progress):
                inputs = model_inputs(batch, names)
                if device is not None:
                    inputs = tuple(t.to(device) for t in inputs)
                model(*inputs)
                seen += 1
        if seen == 0:
            raise ValueError("the calibration set is empty: no batch reached the model")
        if reduce is not None:
            reduce(model)
        set_mode(model, "quantize")
    finally:
        model.train(was_training)
    return seen


def freeze_bn_stats(model: nn.Module) -> None:
    """Stop BatchNorm statistics from updating; fused layers then train on the folded weights."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze_bn = True
            if m.bn is not None:
                m.bn.eval()


def weight_qparams(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of a layer's weight, from its current folded weights where they follow
    the observer, so the exported integers always match the weights they came from."""
    q = layer.weight_quant
    weight, bias = layer.folded_weight_and_bias()
    if q.weights_follow_observer or not bool(q.initialized):
        with torch.no_grad():
            q.calibrate_from(weight.detach())
    layer.bound_weight_scale(bias)
    return q.qparams()


def qparams_of(model: nn.Module) -> dict[str, qp.QuantPoint]:
    """Every quant point's qparams, in graph order (the content of ``qparams.json``)."""
    model = getattr(model, "module", model)
    records = {}
    for name, point in quant_points(model).items():
        q = model.get_submodule(point.quantizer)
        if point.kind == "weight":
            scale, zero_point = weight_qparams(model.get_submodule(point.layer))
        else:
            if not bool(q.initialized):
                raise ValueError(f"{name}: not calibrated yet; run deployq.calibrate() first")
            scale, zero_point = q.qparams()
            point = replace(point, observer=q.spec.observer_label)
        records[name] = point.with_qparams(scale.cpu().numpy(), zero_point.cpu().numpy())
    return records


def load_qparams(model: nn.Module, records: dict[str, qp.QuantPoint]) -> None:
    """Set every activation quantizer's qparams from `records` (weights follow their layers)."""
    model = getattr(model, "module", model)
    for name, point in quant_points(model).items():
        if point.kind == "weight":
            continue
        if name not in records:
            raise qp.QParamsError(f"no qparams for quant point {name!r}")
        r = records[name]
        if (r.bits, r.signed) != (point.bits, point.signed):
            raise qp.QParamsError(f"{name}: qparams are {r.bits}-bit, the model wants {point.bits}-bit")
        model.get_submodule(point.quantizer).set_qparams(r.scale_array, r.zero_point_array)


def weights_searched_every_step(model: nn.Module) -> list[str]:
    """Weight quant points whose qparams follow the weight at every forward with an observer that
    searches (not min/max: ``mse``, ``auto`` at 4 bits or fewer). In training the weight changes
    every step, so each step runs the search again (~0.1 s per 256-channel layer on a CPU); a
    learned-scale quantizer (``lsq``) searches once, at calibration."""
    model = getattr(model, "module", model)
    names = []
    for name, point in quant_points(model).items():
        q = model.get_submodule(point.quantizer)
        if point.kind == "weight" and q.weights_follow_observer and q.spec.observer_searches:
            names.append(name)
    return names
