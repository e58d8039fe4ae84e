"""The float graph deployq exports from a prepared (QAT) model: quantizers taken out, each fused
QuantLayer expanded back into Layer -> BatchNorm -> activation, every quant point named.

The exporters package converts it (:func:`deployq.exporters.torch_export.to_onnx`); the naming
contract (docs/design.md, contract 1) is written there.
"""

from __future__ import annotations

import copy
from typing import Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import fx

from deployq.exporters.graph import RewriteError
from deployq.exporters.torch_export import ExportModule, to_onnx
from deployq.qat.fx_ops import aten_name
from deployq.qat.calibrate import set_mode
from deployq.qat.fused import QuantLayer
from deployq.qat.onnx_import import ONNX_NAME
from deployq.qat.prepare import ACT_QUANT, point_names


def export_module(qmodel: fx.GraphModule) -> ExportModule:
    """The float graph of a prepared model, ready for :func:`~deployq.exporters.torch_export.to_onnx`:
    quantizers out, fused layers expanded, every quant point and raw layer output an extra output."""
    gm = copy.deepcopy(getattr(qmodel, "module", qmodel))
    set_mode(gm, "float")
    gm.eval()
    graph = gm.graph
    named = _without_quantizers(gm)
    layers = _expanded_layers(gm, named)
    _contiguous_before_reshape(graph)
    _four_dimensional_attention(graph, named)
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    if isinstance(results, dict):  # e.g. torchvision's segmentation models: {"out": ..., "aux": ...}
        results = list(results.values())
    flat = list(results) if isinstance(results, (tuple, list)) else [results]
    if not all(isinstance(r, fx.Node) for r in flat):
        raise RewriteError("the model must return a tensor, or a tuple, list or dict of tensors, to be exported")
    output_names, seen = [], set()
    for i, node in enumerate(flat):
        name = (named.get(node) or node.meta.get(ONNX_NAME) or layers.get(node)
                or ("output" if len(flat) == 1 else f"output_{i}"))
        if name in seen:
            raise RewriteError(f"the model returns the same tensor {name!r} twice")
        seen.add(name)
        output_names.append(name)
    # a layer's raw output is tensor PATH, unless it is a quant point or an output already (an
    # imported model's Conv without activation: its tensor keeps the ONNX name)
    tensor_of = {node: named.get(node) or (output_names[flat.index(node)] if node in flat else path)
                 for node, path in layers.items()}
    extras = []
    for node, name in list(named.items()) + list(tensor_of.items()):
        if node not in flat and name not in seen:
            extras.append(node)
            output_names.append(name)
            seen.add(name)
    output.args = (tuple(flat + extras),)
    graph.lint()
    gm.recompile()
    inputs = [n.meta.get(ONNX_NAME, str(n.target)) for n in graph.nodes if n.op == "placeholder"]
    return ExportModule(gm, inputs, output_names, len(flat), {layers[n]: t for n, t in tensor_of.items()})


def _without_quantizers(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Take every activation quantizer out (its readers read its input); {node: the quant point
    its value is}, inputs left out (they keep their own names)."""
    names = point_names(gm)
    named: dict[fx.Node, str] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(f"{ACT_QUANT}."):
            source = node.args[0]
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            if source.op != "placeholder":
                named[source] = names[str(node.target)]
    return named


def _expanded_layers(gm: fx.GraphModule, named: dict[fx.Node, str]) -> dict[fx.Node, str]:
    """Each fused QuantLayer back as Layer -> BatchNorm -> activation (`named` follows the group's
    output); {the layer's raw output node: the layer's path}."""
    graph, modules = gm.graph, dict(gm.named_modules())
    layers: dict[fx.Node, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], QuantLayer):
            continue
        layer, path = modules[node.target], str(node.target)
        with graph.inserting_before(node):
            raw = current = graph.call_module(f"{path}.layer", node.args, node.kwargs)
            if layer.bn is not None:
                current = graph.call_module(f"{path}.bn", (current,))
            if layer.act is not None:
                current = graph.call_module(f"{path}.act", (current,))
        node.replace_all_uses_with(current)
        if ONNX_NAME in node.meta:
            current.meta[ONNX_NAME] = node.meta[ONNX_NAME]
        if node in named:
            named[current] = named.pop(node)
        graph.erase_node(node)
        layers[raw] = path
    return layers


_RESHAPES = {"reshape", "view", "flatten"}
_PERMUTES = {"transpose", "permute", "movedim", "swapaxes", "t"}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return aten_name(node.target) or getattr(node.target, "__name__", "")
    return ""


def _contiguous_before_reshape(graph: fx.Graph) -> None:
    """``x.transpose(1, 2).reshape(...)`` with a contiguous copy between the two (a numerical no-op;
    ONNX has no strides, so nothing of it is exported).

    torch.onnx's decompositions can give an op's output other strides than its fake tensor had
    (scaled_dot_product_attention's do), and then trace such a reshape as a view that fails
    ("Cannot view a tensor with shape ... and strides ..."; ``contiguous()`` is decomposed away
    on the same wrong strides). ``clone(memory_format=contiguous_format)`` always copies, so the
    reshape reads a dense tensor whatever its producer gave."""
    for node in list(graph.nodes):
        source = node.args[0] if node.args else None
        if _op_name(node) not in _RESHAPES or not isinstance(source, fx.Node) or _op_name(source) not in _PERMUTES:
            continue
        with graph.inserting_before(node):
            dense = graph.call_method("clone", (source,), {"memory_format": torch.contiguous_format})
        node.args = (dense, *node.args[1:])


_ATTENTION = {F.scaled_dot_product_attention}


def _four_dimensional_attention(graph: fx.Graph, named: dict[fx.Node, str]) -> None:
    """``scaled_dot_product_attention`` on q, k, v of another rank than 4 (windowed attention:
    (B, heads, windows, N, D); SAM's (B·heads, N, D)) computed on 4-D views: leading dimensions
    flattened into one batch dimension, a head dimension of 1, the result reshaped back (exact: the
    op treats every leading dimension as a batch). torch.onnx translates only the 4-D form. Rewritten
    where v is as wide as q and a mask, if any, has q's leading dimensions (it is viewed the same
    way); the result keeps the quant-point name of the call."""
    for node in list(graph.nodes):
        is_attention = node.target in _ATTENTION or aten_name(node.target) == "scaled_dot_product_attention"
        if node.op != "call_function" or not is_attention or len(node.args) < 3:
            continue
        metas = [a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None for a in node.args[:3]]
        ranks = {len(m.shape) if hasattr(m, "shape") else None for m in metas}
        if None in ranks or ranks == {4} or len(ranks) != 1 or metas[0].shape[-1] != metas[2].shape[-1]:
            continue
        if any(k not in ("dropout_p", "is_causal", "scale", "attn_mask") for k in node.kwargs):
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_meta = mask.meta.get("tensor_meta") if isinstance(mask, fx.Node) else None
        if mask is not None and (not hasattr(mask_meta, "shape") or len(mask_meta.shape) != len(metas[0].shape)
                                 or tuple(mask_meta.shape[:-2]) != tuple(metas[0].shape[:-2])):
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
        with graph.inserting_before(node):
            flat = [graph.call_method("unsqueeze", (graph.call_method("flatten", (a, 0, -3)), 1))
                    for a in (*node.args[:3], *([mask] if mask is not None else []))]
            if mask is None:
                flat.append(None)
            attention = graph.call_function(node.target, (*flat, *node.args[4:]), kwargs)
            result = graph.call_method("reshape_as", (attention, node.args[0]))
        node.replace_all_uses_with(result)
        if node in named:
            named[result] = named.pop(node)
        graph.erase_node(node)


def export_float(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opset: int = 21,
                 dynamic_hw: bool = False) -> onnx.ModelProto:
    """The float ONNX model of `qmodel` (BN not yet folded), tensors named by quant points;
    `dynamic_hw` keeps the height and width of 4-D inputs symbolic."""
    return to_onnx(export_module(qmodel), example_inputs, opset, dynamic_hw)
