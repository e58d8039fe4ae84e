"""Pass: insert QuantizeLinear / DequantizeLinear with the learned qparams (docs/design.md, contracts 2-4).

* Activations and inputs: ``T -> QuantizeLinear -> DequantizeLinear -> consumers`` at every quant
  point (tensor T named by the record). Codes are stored as (u)int8 up to 8 bits and (u)int16 up
  to 16; a code narrower than its type (2..7 or 9..15 bits, e.g. the 10-bit layers) is preceded by
  ``Clip((qmin − zp)·s, (qmax − zp)·s)``, which makes it bit-exact to the torch reference instead of
  saturating at the type's range. Codes wider than 8 bits run as float emulation in onnxruntime.
* Weights: integer initializers (int8 up to 8 bits, int16 above) + DequantizeLinear, per channel
  along the layer's output axis (0 for Conv / Gemm with transB=1, 1 for ConvTranspose).
* Bias: int32 codes with scale s_in·s_w (what integer kernels add to the accumulator), where both
  the input and the weight are 8-bit (:func:`deployq.core.qformula.bias_is_quantized`); else float.
* Data movement (Reshape, Transpose, DepthToSpace, MaxPool, ...) carries quantization: a Q/DQ pair
  with the *same* qparams follows it, a numerical no-op that lets onnxruntime keep the tensor in
  integers (docs/design.md, contract 3). Only codes up to ``carry_bits`` wide are carried (8 by
  default): onnxruntime's CPU provider moves 8-bit codes, but has no 16-bit kernel for these ops, so
  a pair around a 10-bit tensor's Transpose would only add a Q and a DQ. A device that runs 16-bit
  codes (QNN) carries them too.

Names follow onnxruntime's quantization tools: ``T_QuantizeLinear`` (node), ``T_QuantizeLinear_Output``
(codes), ``T_DequantizeLinear_Output`` (dequantized value); weights ``W_quantized``, ``W_scale``,
``W_zero_point``. A graph output keeps its name on the dequantized value (the float model and the
integer model have the same inputs and outputs); its pre-quantization value becomes ``T_prequant``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from deployq.exporters.graph import (DATA_MOVEMENT_OPS, WEIGHT_LAYER_OPS, PassLog, RewriteError, constant_value, consumers,
                                     layer_axis, layer_bias, Names, producer)
from deployq.core.qformula import bias_is_quantized, bias_scale, onnx_integer_dtype, quantize_bias_np, quantize_np
from deployq.core.qparams import QuantPoint



def carries_quantization(node: gs.Node) -> bool:
    """True for ops that only move (or select, or zero-pad) values: the grid is unchanged. A pad of
    −inf read only by max pools carries it too: the pools never select the border."""
    if node.op not in DATA_MOVEMENT_OPS:
        return False
    if node.op == "MaxPool":
        return len(node.outputs) == 1
    if node.op == "Resize":
        return node.attrs.get("mode", "nearest") == "nearest"
    if node.op == "Pad":
        if node.attrs.get("mode", "constant") != "constant":
            return True
        value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if value is not None and np.all(value == -np.inf):  # "SAME" max pooling (deployq.qat.fx_ops)
            return bool(node.outputs) and all(c.op == "MaxPool" for c in consumers(node.outputs[0]))
        return value is None or not np.any(value)
    return True


class _Inserter:
    def __init__(self, graph: gs.Graph, log: PassLog) -> None:
        self.graph = graph
        self.name = Names(graph)
        self.log = log
        self.dq_record: dict[int, QuantPoint] = {}  # id(DQ output tensor) -> record
        self.constants: dict[str, tuple[gs.Constant, gs.Constant]] = {}

    def _qparam_constants(self, rec: QuantPoint) -> tuple[gs.Constant, gs.Constant]:
        if rec.name not in self.constants:
            dtype = onnx_integer_dtype(rec.bits, rec.signed)
            scale = gs.Constant(self.name(f"{rec.name}_scale"), rec.scale_array)
            zp = gs.Constant(self.name(f"{rec.name}_zero_point"), rec.zero_point_array.astype(dtype))
            self.constants[rec.name] = (scale, zp)
        return self.constants[rec.name]

    def quantize_tensor(self, tensor: gs.Variable, rec: QuantPoint, base: str, clip: bool) -> gs.Variable:
        """Insert (Clip ->) Q -> DQ after `tensor`; consumers and graph outputs read the DQ."""
        g = self.graph
        dtype = onnx_integer_dtype(rec.bits, rec.signed)
        scale, zp = self._qparam_constants(rec)
        attrs = {"axis": rec.axis} if rec.axis is not None else {}
        users = consumers(tensor)
        source = tensor
        new_nodes = []
        if clip and rec.bits not in (8, 16):  # a code narrower than its storage type
            offset = rec.zero_point_array.astype(np.float32)
            lo = np.asarray((np.float32(rec.qmin) - offset) * rec.scale_array, dtype=np.float32)
            hi = np.asarray((np.float32(rec.qmax) - offset) * rec.scale_array, dtype=np.float32)
            if rec.axis is not None:
                raise RewriteError(f"quant point {rec.name!r}: per-channel activations of {rec.bits} bits "
                                   "need a per-channel clip; use per_tensor for this layer (or 8 / 16 bits)")
            clipped = gs.Variable(self.name(f"{base}_Clip_Output"), dtype=np.float32)
            new_nodes.append(gs.Node("Clip", self.name(f"{base}_Clip"), {},
                                     [source, gs.Constant(self.name(f"{base}_clip_min"), lo),
                                      gs.Constant(self.name(f"{base}_clip_max"), hi)], [clipped]))
            source = clipped
        codes = gs.Variable(self.name(f"{base}_QuantizeLinear_Output"), dtype=dtype)
        value = gs.Variable(self.name(f"{base}_DequantizeLinear_Output"), dtype=np.float32)
        new_nodes.append(gs.Node("QuantizeLinear", self.name(f"{base}_QuantizeLinear"), attrs, [source, scale, zp], [codes]))
        new_nodes.append(gs.Node("DequantizeLinear", self.name(f"{base}_DequantizeLinear"), attrs, [codes, scale, zp], [value]))
        g.nodes.extend(new_nodes)
        for node in users:
            node.inputs = [value if t is tensor else t for t in node.inputs]
        if tensor in g.outputs:
            name = tensor.name
            tensor.name = self.name(f"{name}_prequant")
            value.name = name
            value.shape = tensor.shape
            g.outputs = [value if t is tensor else t for t in g.outputs]
        self.dq_record[id(value)] = rec
        return value

    def input_record(self, tensor: gs.Tensor) -> Optional[QuantPoint]:
        """The qparams of the DQ feeding `tensor`, looking back through data-movement ops (and a
        Concat of pieces of one quant point: ``torch.roll`` exports as Slice + Concat)."""
        seen = 0
        while tensor is not None and seen < 1000:
            if id(tensor) in self.dq_record:
                return self.dq_record[id(tensor)]
            node = producer(tensor)
            if node is not None and node.op == "Concat":
                return self._one_record([self.input_record(t) for t in node.inputs], node)
            if node is None or not carries_quantization(node):
                return None
            tensor, seen = node.inputs[0], seen + 1
        return None

    @staticmethod
    def _one_record(records: list[Optional[QuantPoint]], node: gs.Node) -> Optional[QuantPoint]:
        """The record every input of a Concat carries, if it is one and the same (then the Concat
        only moves values of one grid); None otherwise."""
        if not records or len(records) != len(node.inputs) or any(r is None for r in records):
            return None
        return records[0] if all(r.name == records[0].name for r in records) else None

    def quantize_weights(self, node: gs.Node, rec: QuantPoint) -> None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        values = constant_value(weight) if weight is not None else None
        if values is None:
            raise RewriteError(f"weight quant point {rec.name!r}: the weight of node {node.name!r} "
                               f"({node.op}) is not an initializer")
        axis = layer_axis(node)
        if rec.axis is not None and values.shape[axis] != len(rec.scale):
            raise RewriteError(f"weight quant point {rec.name!r}: {len(rec.scale)} scales along axis {rec.axis}, "
                               f"but node {node.name!r} has weight shape {list(values.shape)} (channel axis {axis})")
        use_axis = axis if rec.axis is not None else None
        codes = quantize_np(values, rec.scale_array, rec.zero_point_array, rec.qmin, rec.qmax, use_axis)
        dtype = onnx_integer_dtype(rec.bits, rec.signed)
        g = self.graph
        attrs = {"axis": use_axis} if use_axis is not None else {}
        quantized = gs.Constant(self.name(f"{rec.name}_quantized"), codes.astype(dtype))
        scale = gs.Constant(self.name(f"{rec.name}_scale"), rec.scale_array)
        zp = gs.Constant(self.name(f"{rec.name}_zero_point"), rec.zero_point_array.astype(dtype))
        value = gs.Variable(self.name(f"{rec.name}_DequantizeLinear_Output"), dtype=np.float32)
        g.nodes.append(gs.Node("DequantizeLinear", self.name(f"{rec.name}_DequantizeLinear"), attrs,
                               [quantized, scale, zp], [value]))
        node.inputs[1] = value
        self.log.count(f"{rec.bits}-bit weights")
        self.quantize_bias(node, rec, use_axis)

    def quantize_bias(self, node: gs.Node, rec: QuantPoint, weight_axis: Optional[int]) -> None:
        in_rec = self.input_record(node.inputs[0])
        if rec.input is not None and (in_rec is None or in_rec.name != rec.input):
            found = in_rec.name if in_rec else "no quantized input"
            raise RewriteError(f"layer {node.name!r}: the checkpoint says its input is quant point "
                               f"{rec.input!r}, the ONNX graph feeds it {found!r}")
        where = layer_bias(node)
        values = constant_value(where[0].inputs[where[1]]) if where is not None else None
        if values is None or in_rec is None or not bias_is_quantized(in_rec.bits, rec.bits):
            return
        holder, index = where
        s = np.asarray(bias_scale(in_rec.scale_array, rec.scale_array), dtype=np.float32)  # 0-d when per tensor
        codes = quantize_bias_np(values.astype(np.float32), s)
        g = self.graph
        base = f"{node.name}.bias"
        attrs = {"axis": 0} if s.ndim else {}
        quantized = gs.Constant(self.name(f"{base}_quantized"), codes)
        scale = gs.Constant(self.name(f"{base}_scale"), s)
        zp = gs.Constant(self.name(f"{base}_zero_point"), np.zeros_like(codes) if s.ndim else np.zeros((), np.int32))
        value = gs.Variable(self.name(f"{base}_DequantizeLinear_Output"), dtype=np.float32)
        g.nodes.append(gs.Node("DequantizeLinear", self.name(f"{base}_DequantizeLinear"), attrs,
                               [quantized, scale, zp], [value]))
        holder.inputs[index] = value
        self.log.count("int32 biases")

    def carry(self, activations: dict[str, QuantPoint], carry_bits: int = 8) -> None:
        """Q/DQ with the input's qparams after every data-movement op fed by a DQ of at most `carry_bits`."""
        self.graph.toposort()
        for node in list(self.graph.nodes):
            if node.op == "Concat":
                rec = self._one_record([self.dq_record.get(id(t)) for t in node.inputs], node)
            elif carries_quantization(node) and node.inputs and id(node.inputs[0]) in self.dq_record:
                rec = self.dq_record[id(node.inputs[0])]
            else:
                continue
            if rec is None:
                continue
            if rec.bits > carry_bits:
                self.log.count(f"{rec.bits}-bit data movement left in float")
                continue
            for out in list(node.outputs):
                if out.name in activations or out.dtype not in (None, np.float32):
                    continue
                self.quantize_tensor(out, rec, out.name, clip=False)
                self.log.count("Q/DQ carried through data movement")


def insert_qdq(graph: gs.Graph, records: dict[str, QuantPoint], log: Optional[PassLog] = None,
               carry_bits: int = 8) -> gs.Graph:
    """Quantize `graph` as `records` say: activation records name tensors, weight records name
    their layer node (``record.layer``). Data movement carries codes up to `carry_bits` wide.

    A layer and the activation it absorbs are one quant point after the activation because the
    records have no quant point between them (prepare decided it); this pass adds none of its own."""
    log = log or PassLog()
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    activations = {name: r for name, r in records.items() if r.kind in ("input", "activation")}
    weights = [r for r in records.values() if r.kind == "weight"]
    inserter = _Inserter(graph, log)
    for name, rec in activations.items():
        tensor = tensors.get(name)
        if tensor is None or isinstance(tensor, gs.Constant):
            raise RewriteError(f"quant point {name!r} has no tensor of that name in the ONNX graph")
        inserter.quantize_tensor(tensor, rec, name, clip=True)
        log.count(f"{rec.bits}-bit activations")
    inserter.carry(activations, carry_bits)
    for rec in weights:
        node = nodes.get(rec.layer or "")
        if node is None or node.op not in WEIGHT_LAYER_OPS:
            raise RewriteError(f"weight quant point {rec.name!r}: no Conv/ConvTranspose/Gemm/MatMul node "
                               f"named {rec.layer!r} in the ONNX graph")
        inserter.quantize_weights(node, rec)
    return graph
