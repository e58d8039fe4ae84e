"""ONNX in: a float ONNX model -> a torch.fx GraphModule that :func:`deployq.prepare` takes as it is.

The importer writes the fx graph itself, one ONNX node at a time (:mod:`deployq.qat.onnx_ops` holds
one handler per op type), rather than converting to Python modules and tracing them: a traced
conversion (``onnx2torch``) branches in Python on its inputs and symbolic fx stops there, while a
graph written directly has nothing to trace. Weight layers become torch.nn modules with the file's
weights; what is computed from constants only (shape arithmetic on initializers, ``Constant`` nodes)
is folded with onnx's own reference evaluator; ``Shape`` reads the batch as ``x.size(0)`` (it stays
symbolic) and the other sizes as the numbers of the input shape the import is given (what the
file's shape arithmetic computes from them becomes a constant). What is written runs on an
example of that shape as it is written (:class:`~deployq.qat.onnx_builder.Builder`), for the ranks
and sizes ONNX shape inference cannot give.

**Names** (docs/design.md, contract 1): every node the importer writes carries the ONNX tensor it
computes (``node.meta["onnx_name"]``), and the quant point there is named after it; the module of a
layer sits at that name made an identifier. ``deployq export`` therefore writes float and QDQ models
whose tensors are the user's own names, and ``deployq diff original.onnx model.int8.onnx`` pairs
them by name. Patterns an exporter spells out (:mod:`deployq.qat.onnx_patterns`: a layer's bias
as a separate ``Add``, hard-swish, SiLU as ``x * sigmoid(x)``) become the one torch op, named after
the pattern's last tensor.

An op or attribute the importer cannot express is an :class:`OnnxImportError` naming every such
node and its op type, raised before any work.

The model factory ``deployq.qat.onnx_import:load`` (registered: it reads a file, it runs no code)
is what a checkpoint records for a model that came from ONNX, with the file's SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import numpy_helper
from torch import fx

from deployq.qat import onnx_patterns, onnx_shape_ops  # noqa: F401 - onnx_shape_ops registers its handlers
from deployq.qat.onnx_builder import Builder, Dims, UnsupportedNode, identifier
from deployq.qat.onnx_ops import HANDLERS

FACTORY = "deployq.qat.onnx_import:load"
ONNX_NAME = "onnx_name"  # node.meta key: the ONNX tensor a node computes
SIZES_FIXED = "onnx_sizes_fixed"  # placeholder meta: sizes read from shapes were folded (no --dynamic-hw)


class OnnxImportError(ValueError):
    """The ONNX file cannot be imported (named nodes, a missing file, a changed file)."""


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path: str, sha256: Optional[str] = None, shapes: Optional[list[list[int]]] = None) -> fx.GraphModule:
    """The model factory for ONNX files: the torch model of `path` (checked against `sha256`), its
    inputs' sizes fixed to `shapes` (the batch stays symbolic), as torch.export fixes them: a
    YOLO head's anchor grid, computed from the feature maps' shapes, becomes a constant."""
    return convert(_read(path, sha256), where=str(path), shapes=shapes)


def _read(path: str | Path, sha256: Optional[str] = None, weights: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file")
    if sha256 is not None and file_digest(p) != sha256:
        raise OnnxImportError(f"{path} changed since the checkpoint was written (SHA-256 differs); "
                              "export from the file the model was quantized from")
    try:
        return onnx.load(str(p), load_external_data=weights)
    except Exception as err:  # noqa: BLE001 - protobuf's errors are not one type
        raise OnnxImportError(f"{path}: not an ONNX model ({type(err).__name__}: {err})") from None


def resolve_shapes(path: str | Path, given: Any = None) -> list[tuple[str, tuple[int, ...]]]:
    """Each input of the file and the shape deployq prepares it at: `given` (``[(name or None,
    shape)]``, as ``--input-shape`` parses), else the file's, a symbolic batch as 1. A size the file
    leaves symbolic and nobody gives is an error asking for ``--input-shape``."""
    model = _read(path, weights=False)
    constants = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    given = dict(given or [])
    if None in given:
        if len(inputs) != 1:
            raise ValueError(f"{path} takes {len(inputs)} inputs; give each as --input-shape NAME:N,C,H,W")
        given = {inputs[0].name: given[None]}
    known = {i.name for i in inputs} | {identifier(i.name) for i in inputs}
    unknown = [n for n in given if n not in known]
    if unknown:
        raise ValueError(f"--input-shape names {', '.join(unknown)}; {path}'s inputs are "
                         f"{', '.join(i.name for i in inputs)}")
    shapes = []
    for i in inputs:
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in i.type.tensor_type.shape.dim]
        shape = given.get(i.name, given.get(identifier(i.name)))
        if shape is None:
            shape = tuple(1 if d is None and k == 0 else d for k, d in enumerate(dims))
            if None in shape or not shape:
                one = "" if len(inputs) == 1 else f"{i.name}:"
                raise ValueError(f"{path}: input {i.name!r} has the shape {[d or '?' for d in dims]} with "
                                 f"symbolic sizes; pass --input-shape {one}N,C,H,W")
        elif len(shape) != len(dims) or any(d is not None and d != s for k, (d, s) in enumerate(zip(dims, shape)) if k):
            raise ValueError(f"--input-shape {list(shape)} does not fit {path}'s input {i.name!r} "
                             f"{[d or '?' for d in dims]}")
        shapes.append((i.name, tuple(int(s) for s in shape)))
    return shapes


def is_imported(graph: fx.Graph) -> bool:
    return any(ONNX_NAME in n.meta for n in graph.nodes if n.op == "placeholder")


def sizes_fixed(graph: fx.Graph) -> bool:
    """The imported graph computes with sizes read from its input's shape, folded at the import's."""
    return any(n.meta.get(SIZES_FIXED) for n in graph.nodes if n.op == "placeholder")


def convert(model: onnx.ModelProto, where: str = "the ONNX model",
            shapes: Optional[list[list[int]]] = None) -> fx.GraphModule:
    """The torch.fx GraphModule computing `model` (float, eval mode); `shapes`: see :func:`load`."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if shapes is not None:
        model = _with_input_shapes(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # sizes through Shape -> Reshape
    except Exception:  # noqa: BLE001 - a model shape inference cannot take still converts, ranks unknown
        inferred = model
    values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # weights written as Constant nodes (Paddle) are initializers too
        if n.op_type == "Constant":
            values[n.output[0]] = _fold(n, [], opset, where)[0]
    _check_supported(model.graph, set(values), where)
    outputs = {o.name for o in model.graph.output}
    nodes = onnx_patterns.silu(onnx_patterns.hardswish(list(model.graph.node), values, outputs), values, outputs)
    affine = onnx_patterns.layer_affine(nodes, model.graph, values)
    skipped = {id(n) for a in affine.values() for n in a.folded}
    b = Builder(opset, _shapes(inferred.graph), shapes)
    for inp in model.graph.input:
        if inp.name not in values:
            values[inp.name] = b.graph.placeholder(b.unique(inp.name))
            _name(b, values[inp.name], inp.name, outputs)
    for onnx_node in nodes:
        if id(onnx_node) in skipped or (onnx_node.op_type == "Constant" and onnx_node.output[0] in values):
            continue  # folded into the layer before it; a constant already read
        args = [values.get(name) if name else None for name in onnx_node.input]
        if all(not isinstance(a, (fx.Node, Dims)) for a in args):
            results = _fold(onnx_node, args, opset, where)
        else:
            if onnx_node.output[0] in affine:
                a = affine[onnx_node.output[0]]
                args = [args[0], a.weight, a.bias]
                onnx_node = _renamed(onnx_node, a.output)
            results = _emit(b, onnx_node, args, where)
        for name, value in zip(onnx_node.output, results):
            if isinstance(value, Dims) and value.constant() is not None:
                value = value.constant()  # sizes fixed by the input shapes: a constant from here on
            values[name] = _name(b, value, name, outputs)
    return _finish(b, [values.get(o.name) for o in model.graph.output], model, where)


def _name(b: Builder, value: Any, name: str, outputs: set[str]) -> Any:
    """`value` computes ONNX tensor `name`: a node gets the name unless it has one (an Identity's
    output is its input's tensor), where a model output's name wins."""
    if isinstance(value, fx.Node) and (ONNX_NAME not in value.meta or name in outputs):
        value.meta[ONNX_NAME] = name
        b.names[value] = name
    return value


def _emit(b: Builder, onnx_node: Any, args: list, where: str) -> list:
    """The node's handler writes its torch ops, which then run on the example input."""
    if onnx_node.op_type not in HANDLERS:  # passed the check as computed from shapes, which it is not
        raise OnnxImportError(f"{where}: node {onnx_node.name!r} ({onnx_node.op_type}) computes from sizes of the "
                              "input that are not fixed (the batch, or sizes no --input-shape gave), and deployq "
                              "cannot import that op")
    try:
        results = HANDLERS[onnx_node.op_type](b, onnx_node, *args)
    except UnsupportedNode as err:
        message = str(err) if str(err).startswith("node ") else f"node {onnx_node.name!r} ({onnx_node.op_type}): {err}"
        raise OnnxImportError(f"{where}: {message}") from None
    try:
        b.evaluate()
    except Exception as err:  # noqa: BLE001 - torch's errors are many types; the node is what the user needs
        raise OnnxImportError(f"{where}: node {onnx_node.name!r} ({onnx_node.op_type}) as imported fails on an "
                              f"input of the given shape: {type(err).__name__}: {str(err)[:300]}") from None
    return results


def _finish(b: Builder, results: list, model: onnx.ModelProto, where: str) -> fx.GraphModule:
    for out, value in zip(model.graph.output, results):
        if not isinstance(value, fx.Node):
            raise OnnxImportError(f"{where}: output {out.name!r} does not depend on the model's inputs")
    b.graph.output(results[0] if len(results) == 1 else tuple(results))
    for node in b.graph.nodes:
        if node.op == "placeholder":
            node.meta[SIZES_FIXED] = b.sizes_fixed
    return fx.GraphModule(b.root, b.graph, class_name="OnnxModel").eval()


def _with_input_shapes(model: onnx.ModelProto, shapes: list[list[int]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the sizes `shapes` gives after the batch (symbolic), and
    no shapes recorded inside (shape inference works them out again from the inputs)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    constants = {i.name for i in fixed.graph.initializer}
    inputs = [i for i in fixed.graph.input if i.name not in constants]
    if len(inputs) != len(shapes):
        raise OnnxImportError(f"{len(shapes)} input shapes for {len(inputs)} inputs")
    for inp, shape in zip(inputs, shapes):
        dims = inp.type.tensor_type.shape.dim
        del dims[:]
        for k, size in enumerate(shape):
            dim = dims.add()
            if k == 0:
                dim.dim_param = "batch"
            else:
                dim.dim_value = int(size)
    return fixed


def _renamed(node: Any, output: str) -> Any:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[0] = output
    return copy


def _shapes(graph: Any) -> dict[str, list]:
    dims = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return dims


def _check_supported(graph: Any, constants: set[str], where: str) -> None:
    """Every node computed from the inputs has a handler: else one error listing all that lack one.
    What is computed from shapes counts as constant here (it is, at fixed input sizes, but for the
    batch); a node that turns out to depend on the batch is named by :func:`convert`."""
    known = set(constants)
    missing = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            missing.append(f"{node.name or node.output[0]!r} ({node.domain}:{node.op_type})")
            continue
        if node.op_type == "Shape":  # its sizes fold where the input's are known; else convert() names the node
            known.update(node.output)
        elif all(not i or i in known for i in node.input):
            known.update(node.output)  # folded
        elif node.op_type not in HANDLERS:
            missing.append(f"{node.name or node.output[0]!r} ({node.op_type})")
    if missing:
        raise OnnxImportError(f"{where}: deployq cannot import {len(missing)} node(s): {', '.join(missing[:20])}"
                              f"{' ...' if len(missing) > 20 else ''}. Supported op types: "
                              f"{', '.join(sorted(HANDLERS))}")


def _fold(node: Any, args: list, opset: int, where: str) -> list:
    from onnx.reference import ReferenceEvaluator
    feeds = {name: value for name, value in zip(node.input, args) if name}
    try:
        out = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as err:  # noqa: BLE001 - the reference evaluator raises many types
        raise OnnxImportError(f"{where}: node {node.name!r} ({node.op_type}) on constants could not be "
                              f"evaluated: {err}") from None
    return [np.asarray(v) for v in out]
