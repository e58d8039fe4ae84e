"""Placement: where a prepared model's quant points go, decided before any quantizer is inserted
(torchao's PT2E splits it the same way: annotate, then prepare).

On a normalized graph (:mod:`deployq.qat.normalize`):

* :func:`find_groups` / :func:`fuse` - each Conv / ConvTranspose / Linear with the BatchNorm that
  follows it and the activation after that (the kinds in ``QConfig.fuse_activations``) becomes one
  :class:`deployq.qat.fused.QuantLayer`: one quant point, after the activation.
* :func:`plan_activations` - every model input and the output of every compute op (after its
  fused activation) is a quant point; data movement carries quantization through; a concatenation
  is at least as wide as the widest quant point it joins (``concat_keeps_bits``); ``act(a + b)``,
  ``act(a * b)`` and ``act(bn(x))`` are one quant point after the activation; a model output
  that no layer makes is left float (one that a layer makes too, with ``quantize_outputs: false``;
  a layer's output that only PReLU / LeakyReLU read, with ``quantize_before_sloped: false``); so is the output of an op with no integer kernel (a
  normalization, GELU, a subtraction, a division...) that only such ops read
  (``pool(norm(x)) - norm(x)``: nothing reads integer codes there; ``QConfig.quantize_float_ops``
  turns this off); values computed from parameters only are constants; a windowed average pool
  shares the quantizer of the quant point it reads (same scale and zero point in and out); a quant
  point read only by max pools is calibrated on what the pool outputs (``observe_through``).
* :class:`Namer` - quant-point names: module paths, ``<scope>.<op>`` for functions (contract 1).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx, nn

from deployq.core.qspec import QuantSpec
from deployq.qat.config import QConfig
from deployq.qat.fused import BATCHNORMS, WEIGHT_LAYERS, QuantLayer
from deployq.qat.onnx_import import ONNX_NAME
from deployq.qat.fx_ops import (activation_kind, activation_module, aten_name, carried_from, computes_in_float,
                               float_tensor_output, is_add, is_data_movement, is_mul, is_sloped_activation, is_softmax,
                               is_window_average,
                               joined_tensors, max_pool_function, op_label, upstream)

__all__ = ["Group", "Namer", "Planned", "find_groups", "fuse", "plan_activations"]


_METADATA_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "type", "get_device"}


def _reads_metadata(user: fx.Node) -> bool:
    """``x.shape``, ``x.size(1)``, ``x.ndim``: a user of a tensor's shape or type, not of its
    values (fusing the tensor's layer changes neither)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in _METADATA_ATTRIBUTES
    return user.op == "call_method" and user.target in _METADATA_METHODS


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads `node`'s values (shape and type readers aside), if there is one."""
    users = [u for u in node.users if not _reads_metadata(u)]
    return users[0] if len(users) == 1 else None


@dataclass
class Group:
    layer: fx.Node
    bn: Optional[fx.Node] = None
    act: Optional[fx.Node] = None
    names: list[str] = field(default_factory=list)

    @property
    def last(self) -> fx.Node:
        return self.act or self.bn or self.layer


def _bn_matches(layer: nn.Module, bn: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
        ok = isinstance(bn, nn.BatchNorm1d)
    elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        ok = isinstance(bn, nn.BatchNorm2d)
    else:
        ok = isinstance(bn, nn.BatchNorm3d)
    grouped_transpose = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and layer.groups > 1
    return ok and bn.track_running_stats and not grouped_transpose


def find_groups(gm: fx.GraphModule, config: QConfig) -> list[Group]:
    """Each weight layer whose input depends on a model input's values, with its BatchNorm and
    fusable activation. A layer computing from parameters and at most the input's shape (a
    position encoding, a relative-position MLP on a coordinate table) stays a float module: the
    exporter folds it into a constant, as it does the activations around it."""
    modules = dict(gm.named_modules())
    from_inputs = _input_dependent(gm)
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], WEIGHT_LAYERS):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue  # e.g. ConvTranspose2d(x, output_size=...): left as a plain module
        if node not in from_inputs:
            continue
        group = Group(layer=node)
        nxt = _single_user(node)
        if (nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], BATCHNORMS)
                and _bn_matches(modules[node.target], modules[nxt.target])):
            group.bn = nxt
        nxt = _single_user(group.last)
        if nxt is not None and nxt.args and nxt.args[0] is group.last:
            kind = activation_kind(nxt, modules)
            if kind is not None and kind in config.fuse_activations:
                group.act = nxt
        groups.append(group)
    return groups


class Namer:
    """Quant-point names: module paths for module calls, ``<scope>.<op>`` for functions."""

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()

    def function_name(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        base = re.sub(r"_\d+$", "", node.name)
        name = f"{scope}.{base}" if scope else base
        self.used[name] += 1
        count = self.used[name] - 1
        return name if count == 0 else f"{name}_{count}"

    def name(self, node: fx.Node) -> str:
        if ONNX_NAME in node.meta:  # imported from ONNX: the tensor's own name
            return node.meta[ONNX_NAME]
        if node.op == "call_module":
            return str(node.target)
        if node.op == "placeholder":
            return str(node.target)
        return self.function_name(node)


def fuse(gm: fx.GraphModule, groups: list[Group], namer: Namer) -> dict[fx.Node, Group]:
    """Replace each group by one call to a QuantLayer (weight quantizers are added later)."""
    modules = dict(gm.named_modules())
    fused: dict[fx.Node, Group] = {}
    for g in groups:
        layer_path = str(g.layer.target)
        g.names = [layer_path]
        bn = None
        if g.bn is not None:
            g.names.append(str(g.bn.target))
            bn = _without_children(gm, str(g.bn.target), modules[g.bn.target])
        act = None
        if g.act is not None:
            g.names.append(namer.name(g.act))
            act = activation_module(g.act, modules)
        gm.add_submodule(layer_path, QuantLayer(modules[layer_path], bn, act, weight_quant=None))
        _retarget_attribute_reads(gm, layer_path, f"{layer_path}.layer")
        if g.bn is not None:
            _retarget_attribute_reads(gm, str(g.bn.target), f"{layer_path}.bn")
        last = g.last
        if ONNX_NAME in last.meta:  # the fused layer computes the last node's tensor, named after it
            g.layer.meta[ONNX_NAME] = last.meta[ONNX_NAME]
            if g.names[-1] != last.meta[ONNX_NAME]:
                g.names.append(last.meta[ONNX_NAME])
        if last is not g.layer:
            g.layer.meta["tensor_meta"] = last.meta.get("tensor_meta")
            last.replace_all_uses_with(g.layer)
            for n in (g.act, g.bn):
                if n is not None:
                    gm.graph.erase_node(n)
        fused[g.layer] = g
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    return fused


def _without_children(gm: fx.GraphModule, path: str, bn: nn.Module) -> nn.Module:
    """`bn` for a QuantLayer: a BatchNorm subclass's own submodules (its activation, a dropout)
    stay at their paths (``bn1.act``), in a plain container there, and leave the BatchNorm."""
    children = dict(bn.named_children())
    if children:
        holder = nn.Module()
        for name, child in children.items():
            holder.add_module(name, child)
            del bn._modules[name]
        gm.add_submodule(path, holder)
    return bn


def _retarget_attribute_reads(gm: fx.GraphModule, old: str, new: str) -> None:
    """A model may read a fused module's parameters directly (``self.proj.weight.dtype``): point
    those reads at the module's new place inside the QuantLayer."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(f"{old}."):
            node.target = f"{new}.{str(node.target)[len(old) + 1:]}"


@dataclass
class Planned:
    """An activation or input quant point, decided before any quantizer is inserted."""

    node: fx.Node
    name: str
    kind: str  # "input" | "activation"
    members: tuple[str, ...]
    op: str
    spec: QuantSpec
    shares: Optional[str] = None  # name of the quant point whose quantizer this one uses
    # what its observer sees instead of the tensor: the max pool that alone reads it (see _pooled_by)
    observe_through: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def plan_activations(gm: fx.GraphModule, fused: dict[fx.Node, Group], namer: Namer,
                      config: QConfig) -> tuple[list[Planned], set[str]]:
    """Every input and activation quant point, in graph order, and every name a config may use."""
    modules = dict(gm.named_modules())
    from_inputs = _input_dependent(gm)
    into_activation: dict[fx.Node, str] = {}  # activation -> the add before it (one quant point after both)
    plan: list[Planned] = []
    planned: dict[fx.Node, Planned] = {}
    known: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_module", "call_function", "call_method"):
            continue
        if not float_tensor_output(node) or is_data_movement(node, modules) or node not in from_inputs:
            continue
        group = fused.get(node)
        if node.op == "placeholder":
            name, kind, members, op = namer.name(node), "input", (), "input"
        elif group is not None:
            name, kind, members, op = group.names[-1], "activation", tuple(group.names), modules[node.target].kind
            readers = _readers(node, modules)
            if readers and ((not config.quantize_outputs and all(r.op == "output" for r in readers)) or (
                    not config.quantize_before_sloped and all(is_sloped_activation(r, modules) for r in readers))):
                known.update((name, *members))  # the model's output, or a PReLU's input: float as the config asks
                continue
        else:
            name, kind, op = namer.name(node), "activation", op_label(node, modules)
            members = (into_activation[node],) if node in into_activation else ()
            activation = _fusable_activation_after(node, modules, config)
            if activation is not None:  # quantized once, after the activation (as a layer's output is)
                into_activation[activation] = name
                continue
            readers = _readers(node, modules)
            # a model output after pooling, an add, a resize: rounding gains nothing; nor where only float ops read
            if readers and (all(r.op == "output" for r in readers) or (
                    _between_float_ops(node, readers, modules, planned, config)
                    and not config.sets_activation((name, *members)))):
                known.update((name, *members))
                continue
        known.update((name, *members))
        spec = config.spec_for(kind, (name, *members))
        if spec is not None and is_softmax(node, modules) and not config.overrides("observer", (name, *members)):
            spec = spec.updated({"observer": "probability", "observer_args": {}})  # qat.observers says why
        if spec is None:
            continue
        if config.concat_keeps_bits and not config.overrides("bits", (name, *members)):
            spec = _as_wide_as_joined(node, modules, planned, spec)
        source = _shared_source(node, modules, planned) if is_window_average(node, modules) else None
        shares = source.shares or source.name if source is not None and source.spec == spec else None
        planned[node] = Planned(node, name, kind, members, op, spec, shares,
                                None if shares else _pooled_by(node, modules))
        plan.append(planned[node])
    return plan, known


def _as_wide_as_joined(node: fx.Node, modules: dict[str, nn.Module], planned: dict[fx.Node, Planned],
                       spec: QuantSpec) -> QuantSpec:
    """`spec`, widened to the widest quant point a concatenation joins. The concatenation moves
    values and requantizes them onto one grid; at the default 8 bits it would throw away what a
    10-bit skip connection kept (the low-light network's last decoder concat: 3.9 dB of its sRGB
    output's SQNR). AIMET's QuantSim shares one quantizer among a concat's inputs and output, so
    there too the joined tensors' widest width reaches the concat."""
    joined = [carried_from(t, modules, planned) for t in joined_tensors(node)]
    widest = max((p.spec.bits for p in joined if p is not None), default=spec.bits)
    return spec.updated({"bits": widest}) if widest > spec.bits else spec


def _pooled_by(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The max pool that alone reads `node` (every user the same pool), as a function. Its
    quant point is calibrated on the pool's output, as a quantizer after the pool would be: where
    the pool discards values (PReLU's negatives, mostly) the range narrows, and nothing changes
    the pool's result, since rounding and clamping are monotone (max(Q(x)) = Q(max(x)))."""
    users = list(node.users)
    pools = [max_pool_function(u, modules) for u in users]
    if not users or any(p is None or u.args[0] is not node for p, u in zip(pools, users)):
        return None
    kinds = {repr((p.func, p.args, sorted(p.keywords.items()))) for p in pools}
    return pools[0] if len(kinds) == 1 else None


def _shared_source(node: fx.Node, modules: dict[str, nn.Module], planned: dict[fx.Node, Planned]) -> Optional[Planned]:
    """The quant point an average pool reads (back through data movement), if it has one. The pool
    then uses that point's quantizer: its outputs lie within the input's range, the observer sees
    both tensors, and pooling runs on one grid in and out (TFLite and NNAPI require it of an
    int8 AVERAGE_POOL_2D; onnxruntime's own quantizer does the same)."""
    return upstream(node, modules, planned)


def _fusable_activation_after(node: fx.Node, modules: dict[str, nn.Module], config: QConfig) -> Optional[fx.Node]:
    """The activation that `node`'s result feeds, and only it, if `node` is an add, a multiply or a
    BatchNorm of its own (not folded into a layer) and the activation is one the config fuses:
    ``relu(x + f(x))`` (the residual block), ``relu6(x * gate)`` (ReXNet's squeeze-excitation),
    ``relu(bn(x))`` (DenseNet's pre-activation). The result is then not rounded on its own: one
    quant point after the activation, as for a layer with its activation (fewer roundings; what
    onnxruntime's own quantizer does; and its QLinearAdd / QLinearMul absorb the ReLU or Clip)."""
    is_bn = node.op == "call_module" and isinstance(modules[node.target], BATCHNORMS)
    user = _single_user(node)
    if not (is_add(node) or is_mul(node) or is_bn) or user is None or not user.args or user.args[0] is not node:
        return None
    kind = activation_kind(user, modules)
    return user if kind is not None and kind in config.fuse_activations else None


def _readers(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The ops that read `node`'s values, looking through data movement and window averages
    (which keep the values on the grid they read); the graph's output node among them."""
    stack, seen, readers = list(node.users), set(), []
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op != "output" and (is_data_movement(user, modules) or is_window_average(user, modules)):
            stack.extend(user.users)
        elif not _reads_metadata(user):
            readers.append(user)
    return readers


def _between_float_ops(node: fx.Node, readers: list[fx.Node], modules: dict[str, nn.Module],
                       planned: dict[fx.Node, Planned], config: QConfig) -> bool:
    """True if `node` computes in float (:func:`computes_in_float`, or a window average of a
    tensor left float) and every op that reads it computes in float too (or is the output): a
    quant point there would round a value that no integer kernel reads. PoolFormer's token mixer
    ``pool(norm(x)) - norm(x)`` is one; a LayerNorm written out by hand (``(x - u) / sqrt(var)``)
    is another. onnxruntime's quantize_static leaves the same tensors float."""
    if config.quantize_float_ops:
        return False
    floating = computes_in_float(node, modules) or (
        is_window_average(node, modules) and upstream(node, modules, planned) is None)
    return floating and all(r.op == "output" or computes_in_float(r, modules) for r in readers)


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose values depend on a model input's values. The others compute from parameters,
    constants and at most the input's shape (a relative position bias gathered from its table,
    position indices built with ``arange`` and expanded to the batch): the exporter folds them
    into constants or shape arithmetic, so they are not activations and get no quant point."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if _reads_metadata(node) or aten_name(node.target) in _SHAPE_ATEN_READS:
            continue  # the input's shape, not its values
        if node.op == "placeholder" or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


_SHAPE_ATEN_READS = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"}
