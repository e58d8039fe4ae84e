"""prepare(): a float nn.Module -> a QAT torch.fx GraphModule with a fake quantizer at every quant point.

    capture (symbolic fx, else torch.export) -> normalize -> de-duplicate reused modules
      -> fuse Layer(+BN)(+act) -> plan the quant points -> insert quantizers

* **Capture** (:mod:`deployq.qat.capture`) with configurable leaf modules; a failure names the
  module and the option that keeps it whole.
* **Normalize** (:mod:`deployq.qat.normalize`): in-place ops out of place, functional layers and
  BatchNorm subclasses lifted to plain modules, no-ops removed, so that what follows sees what a
  model computes, not how it is written.
* **De-duplicate**: a module called at several places gets one copy per call site, named as the
  seeds name them (``lrelu``, ``lrelu_dup1``, ...). Copies share parameters and buffers, so the
  model computes what it computed before, but each call site has its own name and quantizer.
* **Fuse** Conv / ConvTranspose / Linear with a following BatchNorm and a following activation
  (the kinds in ``QConfig.fuse_activations``) into a :class:`deployq.qat.fused.QuantLayer`.
* **Plan, then insert** (as torchao's annotate -> prepare): every quant point is decided first
  (:func:`plan_activations`), then quantizers are inserted for the plan.
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
import re
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx, nn

from deployq.qat.config import QConfig, load_config
from deployq.qat.fused import WEIGHT_LAYERS, QuantLayer, output_channel_axis
from deployq.qat.fx_ops import upstream
from deployq.core.qparams import QuantPoint
from deployq.core.qspec import QuantSpec
from deployq.qat.quantizers import FakeQuantizer, SharedQuantizer, create_quantizer
from deployq.qat.normalize import normalized_graph
from deployq.qat.onnx_import import identifier
from deployq.qat.placement import Group, Namer, Planned, find_groups, fuse, plan_activations
from deployq.qat.trace import dedupe_modules

ACT_QUANT = "act_quant"  # where activation quantizers live: act_quant.<quant point name>


class QuantPoints(nn.Module):
    """Holds the activation quantizers (as submodules at their names), the quant-point table, how
    the model was captured and what a user should be told about it (notes)."""

    def __init__(self, config: QConfig) -> None:
        super().__init__()
        self.config = config
        self.table: dict[str, QuantPoint] = {}
        self.capture = "fx"
        self.notes: list[str] = []


def _input_quantizer(node: fx.Node, modules: dict[str, nn.Module], quant_nodes: dict[fx.Node, str]) -> Optional[str]:
    """The quant point feeding a layer's input, back through data-movement ops."""
    return upstream(node, modules, quant_nodes)


def prepare(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            config: Any = None, *, leaf_modules: Iterable[Any] = (),
            concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """A QAT GraphModule of `model` (a deep copy), quantized as `config` says (path, dict or QConfig).

    `example_inputs` are run once through the graph (in eval mode, without gradients) to learn
    which nodes produce float tensors. `leaf_modules` (module paths, class names or types; added to
    the config's) are kept whole. The result starts in ``float`` mode.
    """
    config = load_config(config)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = copy.deepcopy(model)
    leaves = (*config.leaf_modules, *leaf_modules)
    captured = normalized_graph(model, example_inputs, leaves, concrete_args)
    gm = captured.gm
    dedupe_modules(gm)

    namer = Namer()
    fused = fuse(gm, find_groups(gm, config), namer)
    points = QuantPoints(config)
    points.capture = captured.method
    points.notes = captured.notes + _leaf_notes(gm, leaves)
    gm.add_module(ACT_QUANT, points)
    plan, known_names = plan_activations(gm, fused, namer, config)
    quant_nodes = _insert_activation_quantizers(gm, plan, points)
    known_names |= _insert_weight_quantizers(gm, fused, quant_nodes, points, config)
    config.check_names(known_names)
    # keep the table in graph order: inputs, then activations and weights as they are computed
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    position = {name: order[qn] for qn, name in quant_nodes.items()}
    for layer_node in fused:
        position[f"{layer_node.target}.weight"] = order[layer_node] - 0.5
    points.table = dict(sorted(points.table.items(), key=lambda kv: position.get(kv[0], 0)))
    gm.graph.lint()
    gm.recompile()
    return gm


def _insert_activation_quantizers(gm: fx.GraphModule, plan: list[Planned], points: QuantPoints) -> dict[fx.Node, str]:
    """A fake quantizer after every planned node (inputs: after the last placeholder); its readers
    read the quantizer. A point that shares another's quantizer gets a :class:`SharedQuantizer`
    that runs it. Returns {quantizer node: quant point name}."""
    quant_nodes: dict[fx.Node, str] = {}
    paths: dict[str, str] = {}
    input_anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for p in plan:
        path = paths[p.name] = _quantizer_path(p.name, set(paths.values()))
        if p.shares is None:
            gm.add_submodule(path, _make_activation_quantizer(p.spec, p.name, p.node))
            gm.get_submodule(path).observe_through = p.observe_through
        else:
            gm.add_submodule(path, SharedQuantizer(gm.get_submodule(paths[p.shares])))
        anchor = input_anchor if p.kind == "input" else p.node
        with gm.graph.inserting_after(anchor):
            qnode = gm.graph.call_module(path, (p.node,))
        qnode.meta["tensor_meta"] = p.node.meta.get("tensor_meta")
        p.node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quant_nodes[qnode] = p.name
        spec = p.spec
        points.table[p.name] = QuantPoint(p.name, p.kind, spec.bits, spec.signed, spec.symmetric,
                                          1 if spec.per_channel else None, op=p.op, spec=spec,
                                          quantizer=path, members=p.members)
        if p.kind == "input":
            input_anchor = qnode
    return quant_nodes


def _insert_weight_quantizers(gm: fx.GraphModule, fused: dict[fx.Node, Group], quant_nodes: dict[fx.Node, str],
                              points: QuantPoints, config: QConfig) -> set[str]:
    """A weight quantizer in every fused layer, told which quantizer feeds the layer (the int32
    bias scale). Returns the names a config may use for them."""
    modules = dict(gm.named_modules())
    known: set[str] = set()
    for layer_node in fused:
        layer: QuantLayer = modules[layer_node.target]
        path = str(layer_node.target)
        name = f"{path}.weight"
        known.update((name, path))
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
            layer.set_input_quantizer(modules[points.table[input_name].quantizer])
        points.table[name] = QuantPoint(name, "weight", spec.bits, spec.signed, spec.symmetric,
                                        axis if spec.per_channel else None, op=layer.kind, layer=path,
                                        input=input_name, spec=spec, quantizer=f"{path}.weight_quant",
                                        members=(path,))
    return known


def _quantizer_path(name: str, taken: set[str]) -> str:
    """Where a point's quantizer lives: ``act_quant.NAME``; a name that is no module path (an
    ONNX tensor's, ``conv2d_1.tmp_0`` or ``/layer1/Relu_output_0``) as an identifier made of it."""
    path = f"{ACT_QUANT}.{name}"
    if all(re.fullmatch(r"\w+", part, re.ASCII) for part in name.split(".")) and not any(
            t == path or t.startswith(f"{path}.") or path.startswith(f"{t}.") for t in taken):
        return path
    base = f"{ACT_QUANT}.{identifier(name)}"
    path, n = base, 0
    while path in taken:
        n += 1
        path = f"{base}_{n}"
    return path


def point_names(gm: nn.Module) -> dict[str, str]:
    """{activation quantizer path: the quant point's name} of a prepared model."""
    points = getattr(getattr(gm, "module", gm), ACT_QUANT, None)
    table = getattr(points, "table", {})
    return {p.quantizer: name for name, p in table.items() if p.kind != "weight"}


def _leaf_notes(gm: fx.GraphModule, leaves: tuple[Any, ...]) -> list[str]:
    """What a user should know of each leaf module: it runs whole, its layers in float inside."""
    if not leaves:
        return []
    names = {m for m in leaves if isinstance(m, str)}
    types = tuple(m for m in leaves if isinstance(m, type))
    notes = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if node.target in names or type(m).__name__ in names or (types and isinstance(m, types)):
            inner = sum(isinstance(sub, WEIGHT_LAYERS) for sub in m.modules())
            notes.append(f"leaf module {node.target!r} ({type(m).__name__}) runs whole: quantized at its inputs "
                         f"and output, its {inner} Conv/Linear layer{'s' if inner != 1 else ''} inside stay"
                         f"{'s' if inner == 1 else ''} float")
    return notes


def _make_activation_quantizer(spec: QuantSpec, name: str, node: fx.Node) -> FakeQuantizer:
    channels = 1
    if spec.per_channel:
        shape = node.meta["tensor_meta"].shape
        if len(shape) < 2:
            raise ValueError(f"{name}: per-channel activation quantization needs a channel axis (shape {tuple(shape)})")
        channels = shape[1]
    return create_quantizer(spec, name, axis=1, channels=channels, is_weight=False)


def capture_notes(gm: nn.Module) -> list[str]:
    """What a user should know of how a prepared model was captured (torch.export, leaf modules)."""
    gm = getattr(gm, "module", gm)
    points = getattr(gm, ACT_QUANT, None)
    return list(getattr(points, "notes", []))


def quant_points(gm: nn.Module) -> dict[str, QuantPoint]:
    """The quant-point table of a prepared model (inputs, activations and weights, in graph order)."""
    gm = getattr(gm, "module", gm)  # DistributedDataParallel
    points = getattr(gm, ACT_QUANT, None)
    if not isinstance(points, QuantPoints):
        raise TypeError("not a model returned by deployq.prepare()")
    return points.table
