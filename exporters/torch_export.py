"""torch.onnx export of a float fx graph, every quant point named (contract 1).

:mod:`deployq.deploy.float_graph` builds the graph from a prepared model (its own fx graph in float
mode, fake quantizers taken out, each fused QuantLayer expanded back into Layer -> BatchNorm ->
activation, BN unfolded) so that the ONNX rewriter does the folding (the same passes then serve
ONNX models deployq did not export); this module only converts it and pins the names. To pin names on tensors the exporter would otherwise call ``conv2d_3``,
each quant-point tensor and each layer's raw output is made a graph output with that name
(``output_names``), and these extra outputs are dropped again after export:

* tensor ``NAME`` is the value at activation quant point NAME (the input keeps its own name);
* tensor ``PATH`` is the raw output of layer PATH, produced by the node named ``PATH``, whose
  weight and bias initializers are ``PATH.weight`` / ``PATH.bias`` (the weight quant point).

Node metadata (stack traces, fx dumps) is stripped: the file is small and the same checkpoint
exports to the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import fx

from deployq.exporters.graph import (WEIGHT_LAYER_OPS, RewriteError, constant_value, consumers, layer_bias,
                                     layer_output, producer, to_model)


@dataclass(frozen=True)
class ExportModule:
    """What :func:`to_onnx` exports: a float fx GraphModule whose extra outputs name tensors.

    ``output_names[:n_outputs]`` are the model's real outputs; the rest are naming outputs
    (tensor NAME = the value at quant point NAME, tensor PATH = the raw output of layer PATH),
    dropped again after export. ``layers`` maps each weight-layer path to the tensor its raw output
    is (PATH, or the quant point or model output it already is)."""

    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    n_outputs: int
    layers: dict[str, str]


def _layer_node(tensor: gs.Tensor) -> Optional[gs.Node]:
    """The weight layer producing `tensor`: its producer, or for a Linear exported as MatMul + Add
    (inputs of rank > 2), the MatMul before the Add."""
    node = producer(tensor)
    if node is not None and node.op == "Add":
        for operand in node.inputs:
            before = producer(operand)
            if before is not None and before.op == "MatMul" and constant_value(before.inputs[1]) is not None \
                    and layer_output(before) is tensor:
                return before
    return node


def _name_layers(graph: gs.Graph, layers: dict[str, str]) -> None:
    """The node producing layer PATH's tensor (``layers[PATH]``: PATH itself, or the quant point
    its output is) is named PATH; its initializers become PATH.weight / PATH.bias."""
    tensors = graph.tensors()
    for path, tensor_name in layers.items():
        tensor = tensors.get(tensor_name)
        node = _layer_node(tensor) if tensor is not None else None
        if node is None or node.op not in WEIGHT_LAYER_OPS:
            raise RewriteError(f"layer {path!r}: the exported graph has no {'/'.join(WEIGHT_LAYER_OPS)} "
                               f"producing {tensor_name!r} (found {node.op if node else 'nothing'})")
        node.name = path
        bias = layer_bias(node)
        for holder, index, suffix in ((node, 1, "weight"), (*(bias or (None, None)), "bias")):
            if holder is None or not isinstance(holder.inputs[index], gs.Constant):
                continue
            const = holder.inputs[index]
            if len(const.outputs) > 1:  # shared (reused layer, or exporter de-duplicated equal values)
                const = gs.Constant(f"{path}.{suffix}", const.values.copy())
                holder.inputs[index] = const
            else:
                const.name = f"{path}.{suffix}"


def _fold_weight_transposes(graph: gs.Graph) -> None:
    """``Transpose(W)`` of an initializer becomes the transposed initializer. torch exports a Linear
    on a tensor of rank > 2 as MatMul(x, Transpose(W)); onnxscript's folding leaves the Transpose
    when W is shared (a module called at several places, de-duplicated into layers that share
    their parameters), and each layer needs its own weight initializer."""
    for node in list(graph.nodes):
        if node.op != "Transpose" or len(node.inputs) != 1 or not isinstance(node.inputs[0], gs.Constant):
            continue
        values = np.asarray(node.inputs[0].values)
        perm = node.attrs.get("perm", list(reversed(range(values.ndim))))
        folded = gs.Constant(f"{node.outputs[0].name}_folded", np.ascontiguousarray(values.transpose(perm)))
        for user in consumers(node.outputs[0]):
            user.inputs = [folded if t is node.outputs[0] else t for t in user.inputs]
        node.outputs.clear()
    graph.cleanup()


def _name_aliases(graph: gs.Graph, pinned: set[str]) -> None:
    """Where the exporter wrote a named tensor as ``NAME = Identity(t)`` (an output that is also
    another value: a layer whose output a no-op passed on), the value itself is called NAME: `t`
    takes the name and the Identity goes, so NAME is produced by the node that computes it."""
    for node in list(graph.nodes):
        if node.op != "Identity" or len(node.inputs) != 1 or node.outputs[0].name not in pinned:
            continue
        source, named = node.inputs[0], node.outputs[0]
        if (not isinstance(source, gs.Variable) or source in graph.inputs or source.name in pinned
                or producer(source) is None):
            continue
        for user in consumers(named):
            user.inputs = [source if t is named else t for t in user.inputs]
        graph.outputs = [source if t is named else t for t in graph.outputs]
        node.outputs.clear()
        node.inputs.clear()
        source.name = named.name
    graph.cleanup()


def _dynamic_dims(example: torch.Tensor, batch: torch.export.Dim, dynamic_hw: bool) -> dict:
    if dynamic_hw and example.ndim == 4:
        return {0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    return {0: batch}


def to_onnx(module: ExportModule, example_inputs: Sequence[torch.Tensor], opset: int = 21,
            dynamic_hw: bool = False) -> onnx.ModelProto:
    """The ONNX model of `module` (torch.onnx, dynamo), tensors named as its outputs say.

    The batch dimension is always dynamic; `dynamic_hw` also keeps the height and width of 4-D
    inputs symbolic (a fully convolutional model then runs on whole frames of any size its
    down-sampling allows)."""
    key = _export_key(module.gm, example_inputs, opset, dynamic_hw)
    if key not in _LAST_EXPORT:
        _LAST_EXPORT.clear()
        _LAST_EXPORT[key] = _export(module.gm, module.input_names, module.output_names, module.n_outputs,
                                    module.layers, example_inputs, opset, dynamic_hw)
    out = onnx.ModelProto()
    out.CopyFrom(_LAST_EXPORT[key])
    return out


# The float export of the last model exported, by its key: exporting one model for several targets
# (int8, int16; bits change the quant points' qparams, not the float graph) runs torch.onnx once.
_LAST_EXPORT: dict[str, onnx.ModelProto] = {}


def clear_export_cache() -> None:
    """Forget the last float export (benchmarks time an export from scratch, as a new process does)."""
    _LAST_EXPORT.clear()


def _export_key(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opset: int, dynamic_hw: bool) -> str:
    """What the float export depends on: the modules (with their settings), the graph, every
    parameter and buffer, the example inputs' shapes and types, the opset and dynamic axes."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{gm}\n{gm.code}\n{opset}\n{dynamic_hw}".encode())
    digest.update(repr([(tuple(t.shape), str(t.dtype)) for t in example_inputs]).encode())
    for name, tensor in gm.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _optimize_keeping_values(model: Any) -> None:
    """onnxscript's optimizer as torch.onnx runs it (inlining, constant folding, its rewrite rules,
    unused nodes out, constants as initializers, equal initializers shared), without common-
    subexpression elimination: two layers that compute the same thing (a distillation head beside
    its classifier) are two quant points, each with its own tensor and qparams; merged, one of them
    would vanish into an ``Identity``."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(
                                   shape_inference=True,
                                   input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                   output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                               rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                               common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),  # equal weights shared: _name_layers gives each layer its own
    )(model)
    _register_constants(model)
    ir.passes.Sequential(common.OutputFixPass(), common.NameFixPass())(model)


def _register_constants(model: Any) -> None:
    """Constant inputs the rewrite rules created without registering them as initializers (the
    Min/Max -> Clip rule names every bound after the clipped tensor: with three Clips of one
    tensor, two bounds share a name and are lost when serialized; CSE, which merged those Clips,
    hid it) become initializers, each under a name of its own."""
    graph = model.graph
    taken = set(graph.initializers)
    for node in graph:
        for value in node.inputs:
            if (value is None or value.const_value is None or value.producer() is not None or value.is_graph_input()
                    or graph.initializers.get(value.name) is value):
                continue
            name, i = value.name or "constant", 1
            while name in taken:
                name, i = f"{value.name}_{i}", i + 1
            value.name = name
            taken.add(name)
            graph.register_initializer(value)


def _export(gm: fx.GraphModule, input_names: list[str], output_names: list[str], n_outputs: int,
            layers: dict[str, str], example_inputs: Sequence[torch.Tensor], opset: int,
            dynamic_hw: bool) -> onnx.ModelProto:
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": not ours to report
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch")
        # traced with a batch of 2: torch.export specializes a size-1 dimension to the constant 1
        # wherever the model reshapes with it (LayerNorm over permuted channels, attention)
        examples = tuple(torch.cat([t[:1], t[:1]]) for t in example_inputs)
        program = torch.onnx.export(gm, examples, None, input_names=input_names,
                                    output_names=output_names, opset_version=opset, dynamo=True,
                                    external_data=False, verbose=False, optimize=False,
                                    dynamic_shapes=tuple(_dynamic_dims(t, batch, dynamic_hw) for t in example_inputs))
        _optimize_keeping_values(program.model)
    quiet.setLevel(level)
    model = program.model_proto
    graph = gs.import_onnx(model)
    _fold_weight_transposes(graph)
    _name_aliases(graph, set(output_names))
    graph.outputs = graph.outputs[:n_outputs]
    _name_layers(graph, layers)
    graph.cleanup().toposort()
    graph.doc_string = ""
    for node in graph.nodes:
        node.domain = node.domain or None
    out = to_model(graph, opset)
    for node in out.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del out.metadata_props[:]
    return out
