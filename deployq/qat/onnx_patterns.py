"""Patterns in an ONNX graph that the importer writes as one torch op (:mod:`deployq.qat.onnx_import`).

Exporters spell some ops out: Paddle writes a layer's bias as an ``Add`` after it (PP-LCNetV3 a
scale and a shift after every convolution) and hard-swish
as ``x * clip(x + 3, 0, 6) / 6``; PyTorch and Paddle write SiLU (swish) as ``x * sigmoid(x)``. As
separate ops each would be a quant point of its own, where one op is rounded once (what a model
written in torch gets); the result keeps the name of the pattern's last tensor, so names still pair.
Each pass takes the node list and returns it rewritten (nodes of ``op_type`` ``SiLU`` are the
importer's own, never written to a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx


def readers_of(nodes: list) -> dict[str, list]:
    found: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def scalar(values: dict[str, Any], name: str) -> Optional[float]:
    v = values.get(name)
    return float(np.asarray(v).reshape(-1)[0]) if isinstance(v, np.ndarray) and v.size == 1 else None


def hardswish(nodes: list, values: dict[str, Any], outputs: set[str]) -> list:
    """``x * clip(x + 3, 0, 6) / 6`` (how Paddle exports hard-swish) as one HardSwish node named
    after the result: one quant point where the decomposition would round three times."""
    readers = readers_of(nodes)

    def only(tensor: str, op: str) -> Optional[Any]:
        users = readers.get(tensor, [])
        ok = len(users) == 1 and users[0].op_type == op and tensor not in outputs
        return users[0] if ok else None

    drop, replace = set(), {}
    for add in nodes:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        x = next((i for i in add.input if scalar(values, i) is None), None)
        if x is None or scalar(values, next(i for i in add.input if i != x)) != 3.0:
            continue
        clip = only(add.output[0], "Clip")
        if clip is None or [scalar(values, i) for i in clip.input[1:]] != [0.0, 6.0]:
            continue
        mul = only(clip.output[0], "Mul")
        if mul is None or x not in mul.input:
            continue
        users = readers.get(mul.output[0], [])
        last = users[0] if len(users) == 1 and mul.output[0] not in outputs else None
        if last is None or not ((last.op_type == "Div" and scalar(values, last.input[1]) == 6.0) or (
                last.op_type == "Mul" and abs((scalar(values, last.input[1]) or 0) - 1 / 6) < 1e-6)):
            continue
        drop.update({id(add), id(clip), id(mul)})
        replace[id(last)] = onnx.helper.make_node("HardSwish", [x], [last.output[0]], name=last.name)
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


@dataclass
class Affine:
    """A Conv / MatMul with what follows it folded in: the new weight and bias, the nodes folded,
    the tensor the layer now computes (the last folded node's output)."""

    weight: np.ndarray
    bias: Optional[np.ndarray]
    folded: list
    output: str


def _per_channel(c: np.ndarray, channels: int, conv: bool) -> Optional[np.ndarray]:
    """A constant operand as one value per output channel: a scalar, or (1, C, 1, 1) / (C, 1, 1) after
    a Conv, (..., C) after a MatMul; else None (it mixes channels or positions)."""
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    fits = (3 <= c.ndim and c.shape[-3] == channels) if conv else (c.ndim >= 1 and c.shape[-1] == channels)
    return c.reshape(-1) if fits and c.size == channels else None


def layer_affine(nodes: list, graph: Any, values: dict[str, Any]) -> dict[str, Affine]:
    """{layer output: Affine} for each Conv / MatMul with a constant weight followed by Mul / Add of
    constants per output channel, each the only reader of the one before: Paddle's bias as an Add,
    PP-LCNetV3's learnable ``scale * conv(x) + bias``. Folded into the layer they are exact (a
    scale per output channel of the weight and the bias) and cost no rounding of their own."""
    readers = readers_of(nodes)
    graph_outputs = {o.name for o in graph.output}
    found = {}
    for n in nodes:
        if n.op_type not in ("Conv", "MatMul") or len(n.input) < 2 or n.input[1] not in values:
            continue
        conv, w = n.op_type == "Conv", np.asarray(values[n.input[1]])
        if (not conv and w.ndim != 2) or (len(n.input) > 2 and n.input[2] and n.input[2] not in values):
            continue
        channels = w.shape[0] if conv else w.shape[1]
        scale = np.ones(channels)
        shift = np.asarray(values[n.input[2]], np.float64).reshape(-1) if len(n.input) > 2 and n.input[2] else None
        out, folded = n.output[0], []
        while len(readers.get(out, [])) == 1 and out not in graph_outputs:
            user = readers[out][0]
            other = next((i for i in user.input if i != out), None)
            per = _per_channel(values[other], channels, conv) if user.op_type in ("Mul", "Add") and \
                len(user.input) == 2 and other in values else None
            if per is None:
                break
            if user.op_type == "Mul":
                scale, shift = scale * per, None if shift is None else shift * per
            else:
                shift = per if shift is None else shift + per
            folded.append(user)
            out = user.output[0]
        if folded:
            axis = (-1,) + (1,) * (w.ndim - 1) if conv else (1, -1)
            weight = (w * scale.reshape(axis)).astype(np.float32)
            found[n.output[0]] = Affine(weight, None if shift is None else shift.astype(np.float32), folded, out)
    return found


def silu(nodes: list, values: dict[str, Any], outputs: set[str]) -> list:
    """``Mul(x, Sigmoid(x))`` (Paddle: ``Mul(x, Sigmoid(Mul(x, 1)))``) as one SiLU node named after
    the Mul's output: the sigmoid's output, which only that Mul reads, is not rounded on its own."""
    readers = readers_of(nodes)
    producers = {o: n for n in nodes for o in n.output}
    drop, replace = set(), {}
    for sigmoid in nodes:
        if sigmoid.op_type != "Sigmoid":
            continue
        x, s, scaled = sigmoid.input[0], sigmoid.output[0], None
        before = producers.get(x)
        if (before is not None and before.op_type == "Mul" and len(readers.get(x, [])) == 1
                and any(scalar(values, i) == 1.0 for i in before.input)):
            scaled, x = before, next(i for i in before.input if scalar(values, i) != 1.0)  # swish with beta = 1
        users = readers.get(s, [])
        if len(users) != 1 or s in outputs or users[0].op_type != "Mul" or sorted(users[0].input) != sorted([x, s]):
            continue
        drop.update({id(sigmoid), id(scaled)})
        replace[id(users[0])] = onnx.helper.make_node("SiLU", [x], [users[0].output[0]], name=users[0].name)
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]
