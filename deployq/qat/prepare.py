"""prepare(): a float nn.Module -> a QAT torch.fx GraphModule with a fake quantizer at every quant point.

    trace (torch.fx) -> de-duplicate reused modules -> fuse Layer(+BN)(+act) -> insert quantizers

* **Trace** with a tracer whose leaf modules are configurable; a failure names the module.
* **De-duplicate**: a module called at several places gets one copy per call site, named as the
  seeds name them (``lrelu``, ``lrelu_dup1``, ...). Copies share parameters and buffers, so the
  model computes what it computed before, but each call site has its own name and quantizer.
* **Fuse** Conv / ConvTranspose / Linear with a following BatchNorm and a following activation
  (the kinds in ``QConfig.fuse_activations``) into a :class:`deployq.qat.fused.QuantLayer`.
* **Quant points** (docs/design.md, contract 3): every model input, the output of every compute op (after
  its fused activation), and every layer's weight. Data-movement ops carry quantization through.
  A model output is quantized only where a layer (Conv / Linear, with its activation) produces it:
  there the integer kernel's requantization is free; after pooling, an add or a resize, rounding
  the output would only add error (onnxruntime's quantize_static leaves those outputs float too).

The model's own weights are used (a deep copy): QAT never starts from random weights. The result is
in ``float`` mode, bit-identical to the input model until :func:`deployq.qat.calibrate.set_mode` is called.
"""

from __future__ import annotations

import copy
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx, nn

from deployq.qat.config import QConfig, load_config
from deployq.qat.fused import BATCHNORMS, WEIGHT_LAYERS, QuantLayer, output_channel_axis
from deployq.qat.fx_ops import (activation_kind, activation_module, float_tensor_output,
                               is_data_movement, op_label)
from deployq.core.qparams import QuantPoint
from deployq.core.qspec import QuantSpec
from deployq.qat.quantizers import FakeQuantizer, create_quantizer
from deployq.qat.trace import dedupe_modules, propagate_shapes, remove_inplace, trace

ACT_QUANT = "act_quant"  # where activation quantizers live: act_quant.<quant point name>


class QuantPoints(nn.Module):
    """Holds the activation quantizers (as submodules at their names) and the quant-point table."""

    def __init__(self, config: QConfig) -> None:
        super().__init__()
        self.config = config
        self.table: dict[str, QuantPoint] = {}


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class _Group:
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


def _find_groups(gm: fx.GraphModule, config: QConfig) -> list[_Group]:
    modules = dict(gm.named_modules())
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], WEIGHT_LAYERS):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue  # e.g. ConvTranspose2d(x, output_size=...): left as a plain module
        group = _Group(layer=node)
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


class _Namer:
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
        if node.op == "call_module":
            return str(node.target)
        if node.op == "placeholder":
            return str(node.target)
        return self.function_name(node)


def _fuse(gm: fx.GraphModule, groups: list[_Group], namer: _Namer) -> dict[fx.Node, _Group]:
    """Replace each group by one call to a QuantLayer (weight quantizers are added later)."""
    modules = dict(gm.named_modules())
    fused: dict[fx.Node, _Group] = {}
    for g in groups:
        layer_path = str(g.layer.target)
        g.names = [layer_path]
        bn = None
        if g.bn is not None:
            g.names.append(str(g.bn.target))
            bn = modules[g.bn.target]
        act = None
        if g.act is not None:
            g.names.append(namer.name(g.act))
            act = activation_module(g.act, modules)
        gm.add_submodule(layer_path, QuantLayer(modules[layer_path], bn, act, weight_quant=None))
        last = g.last
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


def _input_quantizer(node: fx.Node, modules: dict[str, nn.Module], quant_nodes: dict[fx.Node, str]) -> Optional[str]:
    """Walk back from a layer's input through data-movement ops to the quant point feeding it."""
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node):
        if current in quant_nodes:
            return quant_nodes[current]
        if not is_data_movement(current, modules) or not current.args:
            return None
        current = current.args[0]
    return None


def prepare(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            config: Any = None, *, leaf_modules: Iterable[Any] = (),
            concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """A QAT GraphModule of `model` (a deep copy), quantized as `config` says (path, dict or QConfig).

    `example_inputs` are run once through the graph (in eval mode, without gradients) to learn
    which nodes produce float tensors. The result starts in ``float`` mode.
    """
    config = load_config(config)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = copy.deepcopy(model)
    gm = trace(model, leaf_modules, concrete_args)
    remove_inplace(gm)
    dedupe_modules(gm)
    propagate_shapes(gm, example_inputs)

    namer = _Namer()
    fused = _fuse(gm, _find_groups(gm, config), namer)
    modules = dict(gm.named_modules())
    points = QuantPoints(config)
    gm.add_module(ACT_QUANT, points)
    known_names: set[str] = set()

    # activation and input quant points, in topological order
    quant_nodes: dict[fx.Node, str] = {}
    input_anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    from_inputs = _input_dependent(gm)
    into_activation: dict[fx.Node, str] = {}  # activation -> the add before it (one quant point after both)
    for node in list(gm.graph.nodes):
        if node.op not in ("placeholder", "call_module", "call_function", "call_method"):
            continue
        if not float_tensor_output(node) or is_data_movement(node, modules) or node not in from_inputs:
            continue
        group = fused.get(node)
        if node.op == "placeholder":
            name, kind, members, op = namer.name(node), "input", (), "input"
        elif group is not None:
            name, kind, members, op = group.names[-1], "activation", tuple(group.names), modules[node.target].kind
        else:
            name, kind, op = namer.name(node), "activation", op_label(node, modules)
            members = (into_activation[node],) if node in into_activation else ()
            activation = _fusable_activation_after(node, modules, config)
            if activation is not None:  # quantized once, after the activation (as a layer's output is)
                into_activation[activation] = name
                continue
            if _only_output(node, modules):  # a model output after pooling, an add, a resize: rounding gains nothing
                known_names.update((name, *members))
                continue
        known_names.update((name, *members))
        spec = config.spec_for(kind, (name, *members))
        if spec is None:
            continue
        quantizer = _make_activation_quantizer(spec, name, node)
        gm.add_submodule(f"{ACT_QUANT}.{name}", quantizer)
        anchor = input_anchor if node.op == "placeholder" else node
        with gm.graph.inserting_after(anchor):
            qnode = gm.graph.call_module(f"{ACT_QUANT}.{name}", (node,))
        qnode.meta["tensor_meta"] = node.meta.get("tensor_meta")
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quant_nodes[qnode] = name
        points.table[name] = QuantPoint(name, kind, spec.bits, spec.signed, spec.symmetric,
                                        1 if spec.per_channel else None, op=op, spec=spec,
                                        quantizer=f"{ACT_QUANT}.{name}", members=members)
        if node.op == "placeholder":
            input_anchor = qnode

    # weight quant points
    modules = dict(gm.named_modules())
    for layer_node, group in fused.items():
        layer: QuantLayer = modules[layer_node.target]
        path = str(layer_node.target)
        name = f"{path}.weight"
        known_names.update((name, path))
        spec = config.spec_for("weight", (name, path))
        input_name = _input_quantizer(layer_node, modules, quant_nodes)
        if spec is None:
            continue
        axis = output_channel_axis(layer.layer)
        channels = layer.layer.weight.shape[axis]
        if spec.per_channel and getattr(layer.layer, "groups", 1) > 1 and axis == 1:
            raise ValueError(f"{name}: per-channel weights of a grouped ConvTranspose are not supported; "
                             "use per_tensor_symmetric for this layer")
        layer.weight_quant = create_quantizer(spec, name, axis=axis, channels=channels, is_weight=True)
        if input_name is not None:
            layer.set_input_quantizer(modules[f"{ACT_QUANT}.{input_name}"])
        points.table[name] = QuantPoint(name, "weight", spec.bits, spec.signed, spec.symmetric,
                                        axis if spec.per_channel else None, op=layer.kind, layer=path,
                                        input=input_name, spec=spec, quantizer=f"{path}.weight_quant",
                                        members=(path,))
    config.check_names(known_names)
    # keep the table in graph order: inputs, then activations and weights as they are computed
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    position = {name: order[qn] for qn, name in quant_nodes.items()}
    for layer_node, group in fused.items():
        position[f"{layer_node.target}.weight"] = order[layer_node] - 0.5
    points.table = dict(sorted(points.table.items(), key=lambda kv: position.get(kv[0], 0)))
    gm.graph.lint()
    gm.recompile()
    return gm


ADDS = {operator.add, torch.add}


def _fusable_activation_after(node: fx.Node, modules: dict[str, nn.Module], config: QConfig) -> Optional[fx.Node]:
    """The activation that `node`'s result feeds, and only it, if `node` is an add or a BatchNorm
    of its own (not folded into a layer) and the activation is one the config fuses:
    ``relu(x + f(x))`` (the residual block), ``relu(bn(x))`` (DenseNet's pre-activation). The
    result is then not rounded on its own: one quant point after the activation, as for a layer
    with its activation (fewer roundings; and what onnxruntime's own quantizer does)."""
    is_add = (node.op == "call_function" and node.target in ADDS) or (node.op == "call_method" and node.target == "add")
    is_bn = node.op == "call_module" and isinstance(modules[node.target], BATCHNORMS)
    user = _single_user(node)
    if not (is_add or is_bn) or user is None or not user.args or user.args[0] is not node:
        return None
    kind = activation_kind(user, modules)
    return user if kind is not None and kind in config.fuse_activations else None


def _only_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if `node`'s value reaches nothing but the model's outputs (through data movement)."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            continue
        if not is_data_movement(user, modules):
            return False
        stack.extend(user.users)
    return bool(seen)


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a model input. The others compute from parameters and
    constants only (e.g. a relative position bias gathered from its table): the exporter folds
    them into a constant, so they are not activations and get no quant point."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _make_activation_quantizer(spec: QuantSpec, name: str, node: fx.Node) -> FakeQuantizer:
    channels = 1
    if spec.per_channel:
        shape = node.meta["tensor_meta"].shape
        if len(shape) < 2:
            raise ValueError(f"{name}: per-channel activation quantization needs a channel axis (shape {tuple(shape)})")
        channels = shape[1]
    return create_quantizer(spec, name, axis=1, channels=channels, is_weight=False)


def quant_points(gm: nn.Module) -> dict[str, QuantPoint]:
    """The quant-point table of a prepared model (inputs, activations and weights, in graph order)."""
    gm = getattr(gm, "module", gm)  # DistributedDataParallel
    points = getattr(gm, ACT_QUANT, None)
    if not isinstance(points, QuantPoints):
        raise TypeError("not a model returned by deployq.prepare()")
    return points.table
