"""Calibration method per quant point, picked by measuring the model's output.

An observer sets an activation's range from what it saw: its extremes (``minmax``), percentiles
(``percentile``: the config's own, 0.01 / 99.99 % by default; ``percentile_99.999``: 0.001 / 99.999 %,
onnxruntime's Percentile calibration), or the clipping that minimizes the tensor's own quantization
error (``mse``, ``kl``). Which one is
best for the *model* depends on what follows the tensor: clipping a few outliers halves the step
of every other value, but an outlier that carries the signal (an attention peak, a residual's
large channel) must not be clipped. So the choice is measured, not guessed:

1. calibrate once per method (each a full observation pass), keeping each method's qparams;
2. start from the config's own method everywhere;
3. greedily, quant point by quant point in graph order, try each method's qparams and keep the
   one whose fake-quantized model output is closest to the float output, given the choices made
   so far; then observe every calibration batch once more with the chosen methods.

The score is the mean over the model's outputs of each output's SQNR (dB), so a detector's
0-1 scores count as much as its pixel boxes. It is measured on held-out calibration samples:
the first ``eval_samples`` are scored and not observed during the choice (when the calibration
set holds at least twice as many; else the choice is scored on the observed samples, and the
report says so), so a method is not chosen for fitting the samples it was measured on.

The chosen method is written into the quantizer's spec, so ``qparams.json`` records it
(the ``observer`` field of each activation point). Cost: one observation pass per method and
one for the final qparams, plus ``(methods − 1) × points`` forward passes of the scored samples
(fewer: a method whose qparams equal the current ones is not tried).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from deployq.ptq.batched import model_outputs
from deployq.qat.observers import OBSERVERS, create_observer
from deployq.core.decibels import ratio_db
from deployq.core.qspec import QuantSpec
from deployq.core.progress import progress_bar
from deployq.qat.calibrate import first_samples, input_names, model_inputs, samples_in, set_mode
from deployq.qat.prepare import quant_points
from deployq.qat.quantizers import FakeQuantizer

__all__ = ["METHODS", "SearchReport", "search_calibration"]

# a candidate is an observer with arguments: the observer's own name uses the config's arguments for it
VARIANTS = {"percentile_99.999": ("percentile", (("lower", 0.001), ("upper", 99.999)))}
METHODS = ("minmax", "percentile", "percentile_99.999", "mse", "kl")


def _observer(method: str, spec: QuantSpec) -> tuple[str, tuple]:
    """(observer name, observer arguments) of a candidate for a quantizer of `spec`."""
    if method in VARIANTS:
        return VARIANTS[method]
    return method, spec.observer_args if method == spec.observer_name else ()


@dataclass(frozen=True)
class SearchReport:
    """What the search chose: {quant point: observer with its arguments, as ``qparams.json`` records
    it}, and the score (mean per-output SQNR in dB on the scored samples) with the config's method
    everywhere and after the search; `held_out`: whether those samples were left out of the
    observation the choice was made with, and how many there were."""

    chosen: dict[str, str]
    sqnr_start_db: float
    sqnr_end_db: float
    held_out: bool = True
    scored_samples: int = 0

    def counts(self) -> dict[str, int]:
        return {m: sum(1 for c in self.chosen.values() if c == m) for m in dict.fromkeys(self.chosen.values())}


CEILING_DB = 200.0  # an output quantization leaves exact counts as this (the mean stays finite)


def output_sqnr_db(reference: list[torch.Tensor], values: list[torch.Tensor]) -> float:
    """10·log10(Σ reference² / Σ (reference − value)²) over all tensors."""
    signal = sum(float(r.square().sum()) for r in reference)
    noise = sum(float((r - v).square().sum()) for r, v in zip(reference, values))
    return ratio_db(signal, noise)


def mean_output_sqnr_db(reference: list[list[torch.Tensor]], values: list[list[torch.Tensor]]) -> float:
    """The mean over the model's outputs of each output's SQNR over all inputs (each at most
    :data:`CEILING_DB`): every output counts alike, whatever its scale."""
    per_output = [output_sqnr_db([r[k] for r in reference], [v[k] for v in values]) for k in range(len(reference[0]))]
    return sum(min(db, CEILING_DB) for db in per_output) / len(per_output)


def _observe_with(model: nn.Module, quantizers: dict[str, FakeQuantizer], method: str,
                  inputs: Sequence[tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One observation pass with every activation quantizer's observer set to `method`: its qparams."""
    for q in quantizers.values():
        observer, args = _observer(method, q.spec)
        q.observer = create_observer(replace(q.spec, observer=observer, observer_args=args), q.axis, q.name)
    set_mode(model, "observe")
    with torch.no_grad():
        for args in inputs:
            model(*args)
    set_mode(model, "quantize")  # each quantizer turns what its observer saw into qparams
    return {name: tuple(t.clone() for t in q.qparams()) for name, q in quantizers.items()}


def _observe_chosen(model: nn.Module, quantizers: dict[str, FakeQuantizer], chosen: dict[str, str],
                    inputs: Sequence[tuple]) -> None:
    """Every activation quantizer observes `inputs` with its chosen method; then quantize mode."""
    for name, q in quantizers.items():
        observer, args = _observer(chosen[name], q.spec)
        q.spec = replace(q.spec, observer=observer, observer_args=args)
        q.observer = create_observer(q.spec, q.axis, q.name)
    set_mode(model, "observe")
    with torch.no_grad():
        for args in inputs:
            model(*args)
    set_mode(model, "quantize")


def search_calibration(model: nn.Module, batches: Iterable[Any], *, methods: Sequence[str] = METHODS,
                       max_batches: int = 32, eval_samples: int = 8,
                       progress: bool = False) -> SearchReport:
    """Calibrate the prepared `model` (any mode) choosing each activation quant point's method.

    `batches`: calibration inputs (as :func:`deployq.calibrate` takes them), of which the first
    `max_batches` are used; the first `eval_samples` samples score the choices (held out of the
    observation when there are at least twice as many samples). The model is left calibrated on
    all of them, in quantize mode, eval.
    """
    unknown = [m for m in methods if m not in OBSERVERS and m not in VARIANTS]
    if unknown or not methods:
        raise ValueError(f"calibration search: unknown methods {unknown}; known: {', '.join([*OBSERVERS, *VARIANTS])}")
    if max_batches < 1 or eval_samples < 1:
        raise ValueError("calibration search: max_batches and eval_samples must be at least 1")
    names = input_names(model)
    inputs = [model_inputs(b, names) for b in itertools.islice(batches, max_batches)]
    if not inputs:
        raise ValueError("the calibration set is empty: no batch reached the model")
    model.eval()
    quantizers = {name: model.get_submodule(p.quantizer) for name, p in quant_points(model).items()
                  if p.kind != "weight"}
    default = {name: q.spec.observer_name for name, q in quantizers.items()}
    scored = first_samples(inputs, eval_samples)
    held_out = sum(samples_in(x) for x in inputs) >= 2 * eval_samples and len(scored) < len(inputs)
    observed = inputs[len(scored):] if held_out else inputs
    candidates = {m: _observe_with(model, quantizers, m, observed) for m in
                  progress_bar(list(dict.fromkeys(methods)), "calibration search: observing", enabled=progress)}
    set_mode(model, "float")
    reference = model_outputs(model, scored)
    set_mode(model, "quantize")

    def score() -> float:
        return mean_output_sqnr_db(reference, model_outputs(model, scored))

    chosen = {}
    for name, q in quantizers.items():
        method = default[name] if default[name] in candidates else methods[0]
        q.set_qparams(*candidates[method][name])
        chosen[name] = method
    start = best = score()
    for name in progress_bar(list(quantizers), "calibration search: choosing", enabled=progress):
        q = quantizers[name]
        tried = [candidates[chosen[name]][name]]
        for method in methods:
            qparams = candidates[method][name]
            if any(all(torch.equal(a, b) for a, b in zip(qparams, t)) for t in tried):
                continue
            tried.append(qparams)
            q.set_qparams(*qparams)
            now = score()
            if now > best + 1e-6:
                best, chosen[name] = now, method
        q.set_qparams(*candidates[chosen[name]][name])
    _observe_chosen(model, quantizers, chosen, inputs)
    chosen = {name: q.spec.observer_label for name, q in quantizers.items()}  # as qparams.json records it
    return SearchReport(chosen, start, best, held_out, sum(samples_in(x) for x in scored))
