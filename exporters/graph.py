"""Small helpers over onnx-graphsurgeon graphs, shared by the rewrite passes.

Every pass is a function ``Graph -> Graph`` that reports what it changed through a
:class:`PassLog`; an unsupported pattern is a :class:`RewriteError` naming the node.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

LOG = logging.getLogger("deployq.exporters")
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings are about its own optional deps
IR_VERSION = 10  # onnxruntime 1.20+ loads IR 10; opset 21 (int16 Q/DQ) needs IR >= 10

# The op vocabulary, defined once for every pass, diff and check:
WEIGHT_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops whose input 1 is a layer's weight
BN_FOLDABLE_OPS = ("Conv", "ConvTranspose", "Gemm")  # layers a following BatchNormalization folds into
# the ONNX ops of the activations a layer may absorb (QConfig.fuse_activations): what diff looks through
ACTIVATION_OPS = ("Clip", "LeakyRelu", "Relu")
# ops that only move, select or zero-pad values: their output carries their input's quant grid
# (deployq.qat.fx_ops lists the torch ops that export to these; a test keeps the two in step)
DATA_MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "DepthToSpace", "SpaceToDepth", "MaxPool", "Flatten",
                               "Gather", "Squeeze", "Unsqueeze", "Slice", "Split", "Identity", "Pad", "Resize",
                               "Expand", "Tile", "Dropout"})


class RewriteError(ValueError):
    """A pattern the rewriter cannot handle; the message names the node or tensor."""


@dataclass
class PassLog:
    """Counts of what each pass changed, and notes on what it left alone (and why)."""

    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    # what a pass wrote in another layout than the float model's, for verify to read instead of
    # knowing the pass: {tensor or weight name: {"of": the name it stands for, "layout": ..., ...}}
    layouts: dict[str, dict] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def note(self, message: str) -> None:
        self.notes.append(message)
        LOG.info(message)

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "no changes"


def producer(tensor: gs.Tensor) -> Optional[gs.Node]:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor) -> Optional[np.ndarray]:
    """The value of an initializer / Constant-node output, or None for computed tensors."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


class Names:
    """Fresh names for new tensors and nodes of a graph: a base name, or ``base_1``, ``base_2``, ...
    if taken. The names in use are read once, so naming stays cheap on graphs with thousands of
    tensors."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def layer_bias(node: gs.Node) -> Optional[tuple[gs.Node, int]]:
    """(node, input index) of a weight layer's bias: input 2 of Conv / ConvTranspose / Gemm; for a
    MatMul (how torch exports a Linear applied to a tensor of rank > 2), the constant operand of
    the Add that follows it. None if the layer has no bias."""
    if node.op != "MatMul":
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    users = consumers(node.outputs[0])
    if len(users) != 1 or users[0].op != "Add" or node.outputs[0] in users[0].outputs:
        return None
    add = users[0]
    for index, tensor in enumerate(add.inputs):
        if tensor is not node.outputs[0] and constant_value(tensor) is not None:
            return add, index
    return None


def layer_output(node: gs.Node) -> gs.Tensor:
    """The tensor a weight layer produces, its bias added (after the Add of a MatMul layer)."""
    where = layer_bias(node) if node.op == "MatMul" else None
    return where[0].outputs[0] if where is not None else node.outputs[0]


def layer_axis(node: gs.Node) -> int:
    """Output-channel axis of the weight (input 1) of Conv / ConvTranspose / Gemm / MatMul."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return 1
    raise RewriteError(f"node {node.name!r} ({node.op}) is not a weight layer")


def to_model(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """Export a graph with the opset and IR version deployq targets."""
    graph.opset = opset
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.producer_name = "deployq"
    return model


# ---------------------------------------------------------------------------------------------
# Reading QDQ models at the proto level (diff, check and the benchmarks read graphs through these)
# ---------------------------------------------------------------------------------------------


# What a graph output's value before quantization is called once the output name moves to the
# dequantized value: deployq's exporter, and onnxruntime.quantization.
PREQUANT_SUFFIXES = ("_prequant", "_QuantizeLinear_Input")


def base_name(tensor: str) -> str:
    """The quant-point name of the tensor a QuantizeLinear reads (suffixes above removed)."""
    for suffix in PREQUANT_SUFFIXES:
        if tensor.endswith(suffix):
            return tensor[: -len(suffix)]
    return tensor


def constant_array(name: str, initializers: dict[str, onnx.TensorProto],
                   producers: dict[str, onnx.NodeProto]) -> Optional[np.ndarray]:
    """The value of an initializer or of a Constant node's output; None for computed tensors."""
    if name in initializers:
        return onnx.numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is not None:
            return onnx.numpy_helper.to_array(value.t)
    return None


def narrowing_clip_bits(clip: onnx.NodeProto, quantize: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
                        producers: dict[str, onnx.NodeProto]) -> Optional[int]:
    """The code width if `clip` is the Clip that keeps codes narrower than their storage type.

    A 9..15-bit code stored in int16 (or a 2..7-bit one in int8) is preceded by
    ``Clip((qmin − zp)·s, (qmax − zp)·s)``: its bounds are exactly 2^b − 1 steps of the
    QuantizeLinear's scale apart, with b below the storage width. Any other Clip (a model's ReLU6
    or Hardtanh) is the model's own op, and the tensor it produces is the quant point.
    """
    if clip.op_type != "Clip" or len(clip.input) != 3 or len(quantize.input) < 2:
        return None
    lo, hi = (constant_array(n, initializers, producers) for n in clip.input[1:3])
    scale = constant_array(quantize.input[1], initializers, producers)
    zp = constant_array(quantize.input[2], initializers, producers) if len(quantize.input) > 2 else None
    if lo is None or hi is None or scale is None or scale.size != 1 or lo.size != 1 or hi.size != 1:
        return None
    storage_bits = 8 * (zp.dtype.itemsize if zp is not None else 1)
    steps = (float(hi) - float(lo)) / float(scale)
    if not math.isfinite(steps):  # a model's own clamp with one open side (clamp(x, min=eps))
        return None
    levels = round(steps) + 1
    if abs(steps - round(steps)) > 1e-3 or levels < 4 or levels & (levels - 1):
        return None
    bits = levels.bit_length() - 1
    return bits if bits < storage_bits else None


def quantized_tensor(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                     initializers: dict[str, onnx.TensorProto]) -> tuple[str, Optional[onnx.NodeProto]]:
    """(tensor, clip) for a QuantizeLinear: the tensor it quantizes, looking through the Clip that
    keeps a narrower code in its storage type (:func:`narrowing_clip_bits`), and that Clip (or None)."""
    source, clip = node.input[0], producers.get(node.input[0])
    if clip is not None and narrowing_clip_bits(clip, node, initializers, producers) is not None:
        return clip.input[0], clip
    return source, None


def quantize_count(model: onnx.ModelProto) -> int:
    """How many QuantizeLinear nodes `model` has (0: a float model)."""
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


# ---- layout records: what the passes say they moved (docs/design.md, "What a pass declares")

LAYOUTS_KEY = "deployq.layouts"  # model metadata: the PassLog's layouts, as JSON
DEPTH_TO_SPACE = "depth_to_space"  # a tensor in the channel layout DepthToSpace(DCR) turns into its `of`
CONV_TRANSPOSE_BLOCKS = "conv_transpose_blocks"  # a ConvTranspose weight (Cin, C, s, s) as 1x1 Conv (s²·C, Cin)


def write_layouts(model: onnx.ModelProto, layouts: dict[str, dict]) -> None:
    """Record `layouts` in the model's metadata (replacing an earlier record)."""
    kept = [p for p in model.metadata_props if p.key != LAYOUTS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if layouts:
        model.metadata_props.add(key=LAYOUTS_KEY, value=json.dumps(layouts, sort_keys=True))


def layouts_of(model: onnx.ModelProto) -> dict[str, dict]:
    """The layout records of a model deployq exported ({} for any other model)."""
    for prop in model.metadata_props:
        if prop.key == LAYOUTS_KEY:
            return json.loads(prop.value)
    return {}


def to_blocks(w: np.ndarray) -> np.ndarray:
    """ConvTranspose weight (Cin, C, s, s) -> 1×1 Conv weight (s²·C, Cin, 1, 1), channel (i·s+j)·C + c."""
    cin, c, s, _ = w.shape
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(s * s * c, cin, 1, 1))


def undo_layout(values: np.ndarray, record: dict, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """`values` as a pass recorded them (`record`) back in the float model's layout (of `shape`,
    else the shape the record implies)."""
    if record.get("layout") != CONV_TRANSPOSE_BLOCKS:
        raise RewriteError(f"unknown layout record {record!r}")
    if shape is None:  # a 1x1 Conv weight (s²·C, Cin, 1, 1) of block size s
        s = int(record["blocksize"])
        shape = (values.shape[1], values.shape[0] // (s * s), s, s)
    cin, c, s, _ = shape
    return np.ascontiguousarray(values.reshape(s, s, c, cin).transpose(3, 2, 0, 1))


def layout_view(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What a model's layout records undo, for pairing it with a model written without the pass:
    ({weight name: the weight in its original layout}, {a layer's copy output: the tensor it stands for})."""
    layouts = layouts_of(model)
    inits = {i.name: i for i in model.graph.initializer}
    weights = {name: undo_layout(onnx.numpy_helper.to_array(inits[name]), r) for name, r in layouts.items()
               if r.get("layout") == CONV_TRANSPOSE_BLOCKS and name in inits}
    copies = {name: r["of"] for name, r in layouts.items() if r.get("layout") == DEPTH_TO_SPACE}
    return weights, copies
