"""Cross-layer equalization (CLE): Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019.

For two layers joined by a positively homogeneous activation, act(x / s) = act(x) / s for s > 0
(ReLU, LeakyReLU, identity), dividing layer 1's output channel i by s_i and multiplying layer 2's
input channel i by s_i leaves the network's function unchanged. With r1_i the range of layer 1's
output channel i (BatchNorm folded in: W1_i · γ_i / √(σ²_i + ε)) and r2_i the range of layer 2's
input channel i (range = max |w| over the channel),

    s_i = √(r1_i / r2_i)    makes both ranges   r1_i / s_i = r2_i · s_i = √(r1_i · r2_i).

Equal per-channel ranges are what a per-tensor weight quantizer wants, and the activation between
the layers (quantized per tensor) gets channel ranges scaled by 1 / s_i as well. CLE helps most where
channels differ a lot: depthwise-separable blocks (MobileNet) and per-tensor quantization. With
per-channel weight quantization the weights gain little; what changes is mostly the activation
ranges between the layers. Chains of three or more layers converge over ``iterations``.

The scales are applied without folding: to a following BatchNorm's γ and β (its running statistics
stay valid), else to layer 1's weight and bias; the returned model has the same modules under the
same paths. ReLU6 is not homogeneous: its pairs are skipped, or (``relu6="relu"``, as AIMET does)
the ReLU6 modules are replaced by ReLU, which changes the float function.

High-bias absorption (``absorb_bias``, paper section 4.1): for a BN + ReLU pair, c_i =
max(0, β_i − 3|γ_i|) (|γ_i|: the standard deviation of BN's output; the paper writes γ_i, taking it
positive) is taken out of β and W2 · c (summed over kernel taps) added to layer 2's bias.
This is exact only where the pre-activation stays above c_i, and, for a zero-padded layer 2, away
from the borders (the padding is not shifted by c).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from deployq.core.folding import fold_batchnorm
from deployq.qat.fx_ops import activation_kind
from deployq.qat.normalize import normalized_graph
from deployq.qat.trace import TraceError

__all__ = ["EqualizeError", "EqualizeReport", "EqualizedPair", "equalize"]

RELU6_MODES = ("skip", "relu")
_HOMOGENEOUS = ("relu", "leaky_relu")
_RELU_LIKE = ("relu", "relu6->relu")  # activations whose bias can be absorbed


class EqualizeError(ValueError):
    """Bad arguments to :func:`equalize`, or a model it cannot trace."""


@dataclass(frozen=True)
class EqualizedPair:
    """One rescaled pair. ``range_ratio_*``: the median over channels of max(r1_i, r2_i) / min(r1_i, r2_i)
    (r1: layer 1's BN-folded output-channel ranges, r2: layer 2's input-channel ranges; channels with
    a zero or non-finite range left out, NaN if none remain). 1.0 means balanced."""

    first: str
    second: str
    activation: str
    range_ratio_before: float
    range_ratio_after: float


@dataclass(frozen=True)
class EqualizeReport:
    """What :func:`equalize` did: the pairs it rescaled, candidates it skipped (module path of layer 1,
    reason) and the number of channels whose bias was absorbed."""

    pairs: tuple[EqualizedPair, ...]
    skipped: tuple[tuple[str, str], ...]
    absorbed_bias: int


@dataclass(frozen=True)
class _Pair:
    """Module paths of a pair: layer 1, its BatchNorm (or None), layer 2, and the activation between."""

    first: str
    bn: Optional[str]
    act: str
    act_node: Optional[fx.Node]
    second: str


Found = tuple[Optional[_Pair], Optional[str]]  # a candidate pair, or the reason one was skipped


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear))


def _is_bn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d))


def _is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], nn.Identity)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} ({node.name})"


def _walk(start: fx.Node, modules: dict[str, nn.Module]) -> Found:
    """Follow layer 1's output through [BatchNorm] -> [activation] (Identity anywhere) to a layer 2."""
    bn: Optional[fx.Node] = None
    act: Optional[fx.Node] = None
    node = start
    while True:
        users = list(node.users)
        if len(users) > 1 and any(_is_layer(u, modules) for u in users):
            return None, (f"the output of {_describe(node, modules)} has {len(users)} users "
                          f"({', '.join(u.name for u in users)}); only a tensor with one user can be rescaled")
        if len(users) != 1:
            return None, None
        nxt = users[0]
        if _is_layer(nxt, modules):
            kind = "identity" if act is None else activation_kind(act, modules)
            return _Pair(start.target, bn and bn.target, kind, act, nxt.target), None
        if _is_identity(nxt, modules):
            pass
        elif bn is None and act is None and _is_bn(nxt, modules):
            bn = nxt
        elif act is None and activation_kind(nxt, modules) is not None:
            act = nxt
        else:
            following = list(nxt.users)
            if len(nxt.all_input_nodes) == 1 and len(following) == 1 and _is_layer(following[0], modules):
                return None, f"{_describe(nxt, modules)} before {following[0].target!r} is not supported"
            return None, None
        node = nxt


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _layer_problem(path: str, m: nn.Module) -> Optional[str]:
    if parametrize.is_parametrized(m):
        return f"{path!r} has parametrized weights (torch.nn.utils.parametrize)"
    if isinstance(m, nn.Conv2d) and m.groups != 1 and not _is_depthwise(m):
        return f"{path!r} is a grouped convolution (groups={m.groups}), neither plain nor depthwise"
    return None


def _bn_problem(pair: _Pair, bn: nn.Module, layer: nn.Module, rank: Optional[int]) -> Optional[str]:
    expected = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    if not isinstance(bn, expected) or (expected is nn.BatchNorm1d and rank != 2):
        return f"BatchNorm {pair.bn!r} does not normalize {pair.first!r}'s output channels"
    if not bn.affine or bn.running_var is None:
        return f"BatchNorm {pair.bn!r} has no affine parameters or no running statistics"
    return None


def _act_problem(pair: _Pair, modules: dict[str, nn.Module], calls: Counter, relu6: str) -> Optional[str]:
    if pair.act in ("identity", *_HOMOGENEOUS):
        return None
    if pair.act == "hardtanh":
        return f"Hardtanh after {pair.first!r} is not positively homogeneous"
    if relu6 == "skip":
        return (f"ReLU6 after {pair.first!r} is not positively homogeneous "
                "(relu6='skip'; relu6='relu' replaces it by ReLU)")
    node = pair.act_node
    if node is None or node.op != "call_module" or not isinstance(modules[node.target], nn.ReLU6):
        return f"relu6 after {pair.first!r} is a function call; relu6='relu' replaces only nn.ReLU6 modules"
    if calls[node.target] > 1:
        return f"ReLU6 module {node.target!r} is called at {calls[node.target]} places"
    return None


def _problem(pair: _Pair, modules: dict[str, nn.Module], calls: Counter, shared: set[int], relu6: str,
             rank: Optional[int]) -> Optional[str]:
    """Why `pair` cannot be equalized, or None."""
    l1, l2 = modules[pair.first], modules[pair.second]
    for path in (pair.first, pair.second):
        problem = _layer_problem(path, modules[path])
        if problem:
            return problem
    if isinstance(l1, nn.Conv2d) != isinstance(l2, nn.Conv2d):
        return f"{pair.first!r} and {pair.second!r} index channels along different axes (Conv2d / Linear)"
    n_in = l2.in_channels if isinstance(l2, nn.Conv2d) else l2.in_features
    n_out = l1.out_channels if isinstance(l1, nn.Conv2d) else l1.out_features
    if n_in != n_out:
        return f"{pair.first!r} has {n_out} output channels, {pair.second!r} reads {n_in}"
    if pair.bn is not None:
        problem = _bn_problem(pair, modules[pair.bn], l1, rank)
        if problem:
            return problem
    for path in filter(None, (pair.first, pair.bn, pair.second)):
        if calls[path] > 1:
            return f"{path!r} is called at {calls[path]} places"
        if any(id(p) in shared for p in modules[path].parameters(recurse=False)):
            return f"{path!r} shares a parameter with another module"
    return _act_problem(pair, modules, calls, relu6)


def _shared_parameters(model: nn.Module) -> set[int]:
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return {key for key, count in owners.items() if count > 1}


def _graph(model: nn.Module, example_inputs: tuple[Any, ...], leaf_modules: Iterable[Any]) -> fx.GraphModule:
    """A captured, normalized copy (:func:`deployq.qat.normalize.normalized_graph`: the graph
    prepare places quant points in, so a BatchNorm subclass or an Identity before an activation
    hides no pair); `model` is left untouched, and its modules keep their paths in the copy."""
    try:
        return normalized_graph(copy.deepcopy(model), example_inputs, leaf_modules).gm
    except TraceError as err:
        raise EqualizeError(f"equalize could not capture {type(model).__name__} (pass leaf_modules for the parts "
                            f"that fail): {err}") from err


def _find_pairs(gm: fx.GraphModule, relu6: str) -> tuple[list[_Pair], list[tuple[str, str]]]:
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    shared = _shared_parameters(gm)
    pairs, skipped = [], []
    for node in gm.graph.nodes:
        if not _is_layer(node, modules):
            continue
        pair, reason = _walk(node, modules)
        if pair is not None:
            meta = node.meta.get("tensor_meta")
            reason = _problem(pair, modules, calls, shared, relu6, len(meta.shape) if meta is not None else None)
        if reason is not None:
            skipped.append((node.target, reason))
        elif pair is not None:
            pairs.append(pair)
    return pairs, skipped


def _out_ranges(weight: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel (axis 0), in float64."""
    return weight.detach().double().abs().flatten(1).amax(1)


def _first_ranges(model: nn.Module, pair: _Pair) -> torch.Tensor:
    """r1_i: ranges of layer 1's output channels, BatchNorm folded in (W1_i · γ_i / √(σ²_i + ε))."""
    weight = model.get_submodule(pair.first).weight.detach()
    if pair.bn is not None:
        bn = model.get_submodule(pair.bn)
        weight, _ = fold_batchnorm(weight, None, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                                   bn.running_var, bn.eps, 0)
    return _out_ranges(weight)


def _second_ranges(model: nn.Module, pair: _Pair) -> torch.Tensor:
    """r2_i: ranges of layer 2's input channels (a depthwise layer's channel i)."""
    layer = model.get_submodule(pair.second)
    if _is_depthwise(layer):
        return _out_ranges(layer.weight)
    return _out_ranges(layer.weight.transpose(0, 1))


def _scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = √(r1_i / r2_i); 1 where either range is zero or not finite."""
    s = torch.sqrt(r1 / r2)
    valid = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2) & torch.isfinite(s)
    return torch.where(valid, s, torch.ones_like(s))


def _imbalance(r1: torch.Tensor, r2: torch.Tensor) -> float:
    """Median over channels of max(r1_i, r2_i) / min(r1_i, r2_i) (see :class:`EqualizedPair`)."""
    valid = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    if not bool(valid.any()):
        return float("nan")
    ratio = torch.maximum(r1, r2)[valid] / torch.minimum(r1, r2)[valid]
    return float(np.median(ratio.numpy()))


def _along(s: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[axis] = -1
    return s.to(like.dtype).reshape(shape)


@torch.no_grad()
def _rescale(model: nn.Module, pair: _Pair, s: torch.Tensor) -> None:
    """Layer 1's output channel i (through its BN's γ, β if it has one) / s_i; layer 2's input channel i · s_i."""
    first = model.get_submodule(pair.bn or pair.first)
    if pair.bn is None:
        first.weight.div_(_along(s, first.weight, 0))
    else:
        first.weight.div_(s.to(first.weight.dtype))
    if first.bias is not None:
        first.bias.div_(s.to(first.bias.dtype))
    second = model.get_submodule(pair.second)
    second.weight.mul_(_along(s, second.weight, 0 if _is_depthwise(second) else 1))


@torch.no_grad()
def _absorb(model: nn.Module, pair: _Pair) -> int:
    """β_i -= c_i, c_i = max(0, β_i − 3|γ_i|); layer 2's bias += W2 · c. Returns the channels with c_i > 0."""
    bn = model.get_submodule(pair.bn)
    c = torch.clamp(bn.bias - 3 * bn.weight.abs(), min=0)
    layer = model.get_submodule(pair.second)
    weight = layer.weight.double()
    if _is_depthwise(layer):
        shift = weight.flatten(1).sum(1) * c.double()
    else:
        shift = weight.flatten(2).sum(2) @ c.double() if weight.ndim > 2 else weight @ c.double()
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.add_(shift.to(layer.bias.dtype))
    bn.bias.sub_(c)
    return int((c > 0).sum())


def _relu6_to_relu(model: nn.Module, pair: _Pair) -> _Pair:
    """Replace the pair's nn.ReLU6 by nn.ReLU under the same path."""
    path = pair.act_node.target
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent.add_module(leaf, nn.ReLU(inplace=model.get_submodule(path).inplace))
    return _Pair(pair.first, pair.bn, "relu6->relu", None, pair.second)


def _ratio(model: nn.Module, pair: _Pair) -> float:
    return _imbalance(_first_ranges(model, pair), _second_ranges(model, pair))


def _check_options(relu6: str, iterations: int) -> None:
    if relu6 not in RELU6_MODES:
        raise EqualizeError(f"equalize: relu6={relu6!r}; choose one of {', '.join(map(repr, RELU6_MODES))}")
    if not isinstance(iterations, int) or iterations < 0:
        raise EqualizeError(f"equalize: iterations={iterations!r}; it must be an int >= 0")


def equalize(model: nn.Module, example_inputs: Union[torch.Tensor, tuple[Any, ...], list[Any]], *,
             iterations: int = 2, relu6: str = "skip", absorb_bias: bool = False,
             leaf_modules: Iterable[Any] = ()) -> tuple[nn.Module, EqualizeReport]:
    """Cross-layer equalization of a copy of `model` (see the module docstring); `model` is not changed.

    Pairs layer1 -> [BatchNorm] -> [activation] -> layer2 (Conv2d, plain or depthwise, or Linear; every
    tensor between them read once) are found with torch.fx on `example_inputs`; each is rescaled,
    s_i = √(r1_i / r2_i), `iterations` times over all pairs. BatchNorm uses its running statistics.
    ``relu6``: "skip" leaves ReLU6 pairs alone; "relu" replaces their ReLU6 modules by ReLU (this
    changes the float function). ``absorb_bias``: high-bias absorption for BN + ReLU pairs (not exact
    where a pre-activation falls below c_i or near a padded border). ``leaf_modules``: module paths,
    class names or classes the tracer calls as black boxes.
    """
    _check_options(relu6, iterations)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pairs, skipped = _find_pairs(_graph(model, inputs, leaf_modules), relu6)
    work = copy.deepcopy(model)
    pairs = [_relu6_to_relu(work, p) if p.act == "relu6" else p for p in pairs]
    before = [_ratio(work, p) for p in pairs]
    for _ in range(iterations):
        for pair in pairs:
            _rescale(work, pair, _scales(_first_ranges(work, pair), _second_ranges(work, pair)))
    absorbed = 0
    if absorb_bias:
        absorbed = sum(_absorb(work, p) for p in pairs if p.bn is not None and p.act in _RELU_LIKE)
    report = EqualizeReport(
        pairs=tuple(EqualizedPair(p.first, p.second, p.act, b, _ratio(work, p)) for p, b in zip(pairs, before)),
        skipped=tuple(skipped), absorbed_bias=absorbed)
    return work, report
