"""Hessian-trace sensitivity of layer activations: which layers to distill, and how much.

For the activation a of a layer (n elements per sample) and the loss L, H_a = ∂²L/∂a². Its trace
is estimated with Hutchinson's estimator (Hutchinson 1989):

    Tr(H_a) = E_z[zᵀ H_a z],   z Rademacher: P(z_i = +1) = P(z_i = −1) = ½

without ever forming H_a: g = ∂L/∂a comes from ``torch.autograd.grad(..., create_graph=True)`` on
the activation (exposed by rewriting the graph output, :func:`deployq.train.distill.expose`), and
H_a z = ∂(gᵀz)/∂a is one more backward pass (a Hessian-vector product). Samples cycle through
the batches; a layer stops when the standard error of its running mean is at most `tol` times
the mean (checked once every batch has contributed) or after `max_iter` samples.

The sensitivity is Tr(H_a)/n (HAWQ-V2, Dong et al., NeurIPS 2020; the thesis, "如何选取蒸馏层"):
if a ‖Δa‖² perturbation is spread evenly over its eigen-directions, the loss grows by
½·‖Δa‖²·Tr(H_a)/n, so layers with a larger Tr(H_a)/n matter more and are distilled, with
λ_i proportional to it (:meth:`HessianReport.distill_config`).

The loss is the task loss against the data's targets; data with inputs only uses the MSE between
the model's output and the float model's own output on the same input (then H_a is the
Gauss-Newton matrix JᵀJ of the output w.r.t. a, scaled by 2/numel). A piecewise-linear network
under an L1 loss has H_a = 0 almost everywhere: use mse for the analysis.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from deployq.train.distill import LayerIndex, expose
from deployq.train.losses import Batch, DistillError, as_batch, task_loss
from deployq.train.hessian_report import DEFAULT_BITS, HessianReport, LayerTrace
from deployq.qat.fused import QuantLayer
from deployq.qat.prepare import ACT_QUANT, QuantPoints, prepare
from deployq.core.progress import progress_bar
from deployq.core.qformula import fake_quantize, qparams_from_range, qrange
from deployq.qat.quantizers import FakeQuantizer

DEFAULT_TOL = 0.05  # stop a layer at a standard error of 5 % of its mean
DEFAULT_MAX_ITER = 100
SELF_REFERENCE = "mse_to_float_output"


# ----------------------------------------------------------------------------- the estimator


@dataclass
class _RunningMean:
    """Running mean of Hutchinson samples with the thesis' stopping rule."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0
    seconds: float = 0.0
    converged: bool = False

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def stderr(self) -> float:
        if self.count < 2:
            return math.nan
        variance = max(self.squares - self.count * self.mean ** 2, 0.0) / (self.count - 1)
        return math.sqrt(variance / self.count)

    def add(self, sample: float, tol: float, min_count: int) -> None:
        """One more sample; converged once every batch has contributed (`min_count`) and the
        standard error of the mean is at most `tol` times the mean's magnitude."""
        self.total += sample
        self.squares += sample * sample
        self.count += 1
        if self.count >= max(2, min_count) and self.stderr <= tol * abs(self.mean):
            self.converged = True


def rademacher(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """±1 with probability ½ each (float32, CPU)."""
    return torch.randint(0, 2, tuple(shape), generator=generator).float().mul_(2).sub_(1)


def _outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _outputs(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _outputs(o)]
    return []


def _self_reference_loss(output: Any, reference: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.mse_loss(o, r) for o, r in zip(_outputs(output), reference))


def _objective(loss: str, batches: list[Batch]) -> tuple[str, str]:
    """(loss name, description). 'auto': cross_entropy for integer targets, mse for others, the
    float model's own output when the data has no targets."""
    with_targets = sum("target" in b for b in batches)
    if with_targets not in (0, len(batches)):
        raise DistillError(f"{with_targets} of {len(batches)} batches have targets; give all or none")
    if with_targets == 0:
        if loss not in ("auto", SELF_REFERENCE):
            raise DistillError(f"loss {loss!r} needs targets, but the data has inputs only")
        return SELF_REFERENCE, ("mse between the model's output and the float model's own output "
                                "on the same input (the data has no targets)")
    if loss == SELF_REFERENCE:
        return loss, "mse between the model's output and the float model's own output on the same input"
    if loss == "auto":
        loss = "mse" if batches[0]["target"].is_floating_point() else "cross_entropy"
    task_loss(loss)
    return loss, f"{loss} between the model's output and the targets"


def _set_modes(model: nn.Module, mode: str) -> dict[nn.Module, str]:
    saved = {m: m.mode for m in model.modules() if isinstance(m, (FakeQuantizer, QuantLayer))}
    if mode == "quantize":
        missing = [m.name for m in saved if isinstance(m, FakeQuantizer) and not m.is_weight and not bool(m.initialized)]
        if missing:
            raise DistillError(f"mode='quantize' needs a calibrated model; not calibrated: {', '.join(missing[:5])}")
    for m in saved:
        m.mode = mode
    return saved


def _inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The model inputs of a batch: its 'input', a tensor or a tuple of tensors (several inputs)."""
    x = batch["input"]
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _as_graph_module(model: nn.Module, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    return prepare(model, example)


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, ACT_QUANT, None), QuantPoints)


def select_layers(model: fx.GraphModule, patterns: str | Sequence[str] | None = None) -> list[str]:
    """The activations to analyse: every activation quant point of a prepared model (module paths
    of a plain traced one), narrowed to those matching any glob in `patterns`."""
    index = LayerIndex(model)
    if is_prepared(model):
        candidates = [n for n, p in index.table.items() if p.kind == "activation"]
    else:
        candidates = index.names()
    if patterns is None:
        return candidates
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: list[str] = []
    for pattern in patterns:
        matched = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            index.node(pattern, "Hessian layer pattern")  # an exact name outside the defaults is fine
            matched = [pattern]
        chosen += [n for n in matched if n not in chosen]
    return chosen


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    def move(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return type(v)(move(t) for t in v)
        return v.to(device) if isinstance(v, torch.Tensor) else v
    return {k: move(v) for k, v in batch.items()}


def hessian_traces(model: nn.Module, batches: Iterable[Any], layers: str | Sequence[str] | None = None, *,
                   loss: str = "auto", mode: str = "float", tol: float = DEFAULT_TOL,
                   max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, bits: Optional[tuple[int, int]] = DEFAULT_BITS,
                   progress: bool = False, estimator: str = "shared", refine: int = 0) -> HessianReport:
    """Tr(H_a) of the loss w.r.t. each layer activation a, ranked by Tr(H_a)/n.

    `model`: a prepared model (quant-point names), a traced GraphModule, or a plain nn.Module
    (prepared here, in float mode). `batches`: dicts with 'input' (and 'target'), (input, target)
    pairs, or input tensors. `loss`: ``auto`` (mse, or cross_entropy for integer targets; without
    targets the MSE to the float model's own output, also asked for by ``mse_to_float_output``) or
    a task loss name. `layers`: names or globs (default: every activation). `mode`: run the
    quantizers in ``float`` (the thesis: analyse the float network) or ``quantize``. `bits`: the
    two widths of the quantization perturbation for :meth:`HessianReport.bit_suggestions`
    (None: skip it). `estimator`: ``shared`` (every layer from one Hessian-vector product per
    sample) or ``per-layer`` (one product per layer and sample; less variance, slower). `refine`:
    with ``shared``, the `refine` layers it ranks highest are estimated again with per-layer
    products (the shared estimate's cross terms can reorder close layers at the top, which is where
    the distillation config is chosen).
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise DistillError(f"tol must be a number >= 0, got {tol}")
    if max_iter < 1:
        raise DistillError(f"max_iter must be at least 1, got {max_iter}")
    if mode not in ("float", "quantize"):
        raise DistillError(f"mode must be 'float' or 'quantize', got {mode!r}")
    data = [as_batch(b) for b in batches]
    if not data:
        raise DistillError("the Hessian trace needs at least one batch of data")
    gm = _as_graph_module(model, _inputs(data[0]))
    device = _model_device(gm)
    data = [_to(b, device) for b in data]
    loss_name, description = _objective(loss, data)
    names = select_layers(gm, layers)
    if not names:
        raise DistillError("no layers to analyse")
    exposed = expose(gm, names, "Hessian layer")
    was_training = gm.training
    saved_modes = _set_modes(gm, mode)
    gm.eval()
    start = perf_counter()
    try:
        references = _float_references(gm, data) if loss_name == SELF_REFERENCE else None
        estimates, numel = _hutchinson(exposed, data, names, loss_name, references, tol, max_iter, seed, progress,
                                       estimator)
        if estimator == "shared" and refine > 0:
            top = sorted(names, key=lambda n: estimates[n].mean / numel[n], reverse=True)[:refine]
            again, _ = _hutchinson(exposed, data, top, loss_name, references, tol, max_iter, seed, progress,
                                   "per-layer")
            for n in top:
                again[n].seconds += estimates[n].seconds
                estimates[n] = again[n]
            estimator = f"shared, the top {len(top)} again per-layer"
        perturbations = _perturbations(exposed, data, names, bits) if bits else {n: {} for n in names}
    finally:
        for m, saved in saved_modes.items():
            m.mode = saved
        gm.train(was_training)
    results = [LayerTrace(n, estimates[n].mean, numel[n], estimates[n].count, estimates[n].converged,
                          estimates[n].seconds, estimates[n].stderr, perturbations[n]) for n in names]
    results.sort(key=lambda r: r.per_element, reverse=True)
    return HessianReport(tuple(results), description, tol, max_iter, len(data), mode, perf_counter() - start,
                         tuple(bits) if bits else DEFAULT_BITS, estimator)


def _float_references(gm: fx.GraphModule, data: list[Batch]) -> list[list[torch.Tensor]]:
    """The float model's own outputs (every quantizer in float mode), the targets of the
    self-reference loss."""
    modes = _set_modes(gm, "float")
    try:
        with torch.no_grad():
            return [[t.detach() for t in _outputs(gm(*_inputs(b)))] for b in data]
    finally:
        for m, saved in modes.items():
            m.mode = saved


ESTIMATORS = ("shared", "per-layer")


def _hutchinson(exposed: fx.GraphModule, data: list[Batch], names: list[str], loss_name: str,
                references: Optional[list[list[torch.Tensor]]], tol: float, max_iter: int, seed: int,
                progress: bool, estimator: str = "shared") -> tuple[dict[str, _RunningMean], dict[str, int]]:
    """One sample per iteration for every layer still running: a forward pass and the gradient
    w.r.t. all active activations (shared), then the Hessian-vector products.

    ``per-layer``: one product per layer, (H z_n)_n = ∂(g_nᵀ z_n)/∂a_n, so each sample is
    z_nᵀ H_nn z_n. ``shared``: one product for all layers, with one Rademacher vector z_n per
    layer, Hz = ∂(Σ_m g_mᵀ z_m)/∂a; then z_nᵀ(Hz)_n = z_nᵀ H_nn z_n + Σ_{m≠n} z_nᵀ H_nm z_m, whose
    cross terms vanish in expectation (z_m independent of z_n, zero mean): the same unbiased
    estimate of Tr(H_nn) for every layer from three passes instead of two plus one per layer, at the
    price of some variance."""
    if estimator not in ESTIMATORS:
        raise DistillError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    generator = torch.Generator().manual_seed(seed)
    objective = None if references is not None else task_loss(loss_name)
    estimates = {n: _RunningMean() for n in names}
    numel: dict[str, int] = {}
    for step in progress_bar(range(max_iter), "Hessian trace", total=max_iter, enabled=progress):
        active = [n for n in names if not estimates[n].converged]
        if not active:
            break
        batch = data[step % len(data)]
        t0 = perf_counter()
        inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in _inputs(batch)]
        output, features = exposed(*inputs)
        if references is not None:
            value = _self_reference_loss(output, references[step % len(data)])
        else:
            value = objective(output, batch)
        activations = [features[n] for n in active]
        for n, a in zip(active, activations):
            numel.setdefault(n, a[0].numel() if a.ndim > 1 else a.numel())
        differentiable = [a.requires_grad for a in activations]
        grads = torch.autograd.grad(value, [a for a, d in zip(activations, differentiable) if d],
                                    create_graph=True, allow_unused=True) if any(differentiable) else ()
        grads_iter = iter(grads)
        gradients = [next(grads_iter) if d else None for d in differentiable]
        vectors = [rademacher(a.shape, generator).to(device=a.device, dtype=a.dtype) for a in activations]
        if estimator == "shared":
            samples = _shared_products(activations, gradients, vectors)
            each = (perf_counter() - t0) / len(active)
            for n, sample in zip(active, samples):
                estimates[n].add(sample, tol, min_count=len(data))
                estimates[n].seconds += each
        else:
            shared = (perf_counter() - t0) / len(active)
            for n, a, g, z in zip(active, activations, gradients, vectors):
                t1 = perf_counter()
                if g is None or not g.requires_grad:
                    sample = 0.0  # the gradient does not depend on a: H_a = 0
                else:
                    (hz,) = torch.autograd.grad(g, a, grad_outputs=z, retain_graph=True, allow_unused=True)
                    sample = 0.0 if hz is None else float((z * hz).sum())
                estimates[n].add(sample, tol, min_count=len(data))
                estimates[n].seconds += shared + perf_counter() - t1
        del output, features, value, activations, grads, gradients
    return estimates, numel


def _shared_products(activations: list[torch.Tensor], gradients: list[Optional[torch.Tensor]],
                     vectors: list[torch.Tensor]) -> list[float]:
    """z_nᵀ(Hz)_n for every layer n from one Hessian-vector product, Hz = ∂(Σ_m g_mᵀ z_m)/∂a."""
    terms = [(g * z).sum() for g, z in zip(gradients, vectors) if g is not None and g.requires_grad]
    if not terms:
        return [0.0] * len(activations)
    products = torch.autograd.grad(torch.stack(terms).sum(), activations, allow_unused=True)
    return [0.0 if hz is None else float((z * hz).sum()) for z, hz in zip(vectors, products)]


def _perturbations(exposed: fx.GraphModule, data: list[Batch], names: list[str],
                   bits: tuple[int, int]) -> dict[str, dict[int, float]]:
    """E‖Q_b(a) − a‖² per sample for each width b: per-tensor affine over the activation's
    min/max across all batches (two passes without gradients)."""
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}
    with torch.no_grad():
        for batch in data:
            _, features = exposed(*_inputs(batch))
            for n in names:
                lo[n] = min(lo[n], float(features[n].min()))
                hi[n] = max(hi[n], float(features[n].max()))
        qparams: dict[tuple[str, int], Optional[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
        for n in names:
            for b in bits:
                qmin, qmax = qrange(b, False)
                if min(lo[n], 0.0) == max(hi[n], 0.0):
                    qparams[n, b] = None  # all zeros: exactly representable
                    continue
                scale, zero_point = qparams_from_range(lo[n], hi[n], qmin, qmax, False, n)
                qparams[n, b] = (torch.from_numpy(scale), torch.from_numpy(zero_point).float(), qmin, qmax)
        sums = {(n, b): 0.0 for n in names for b in bits}
        samples = 0
        for batch in data:
            _, features = exposed(*_inputs(batch))
            a0 = features[names[0]]
            samples += a0.shape[0] if a0.ndim > 1 else 1
            for n in names:
                a = features[n].float()
                for b in bits:
                    q = qparams[n, b]
                    if q is not None:
                        s, zp, qmin, qmax = q
                        error = fake_quantize(a, s.to(a.device), zp.to(a.device), qmin, qmax) - a
                        sums[n, b] += float(error.square().sum())
    return {n: {b: sums[n, b] / samples for b in bits} for n in names}
