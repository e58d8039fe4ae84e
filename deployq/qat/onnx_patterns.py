"""Patterns in an ONNX graph that the importer writes as one torch op (:mod:`deployq.qat.onnx_import`).

Exporters spell some ops out: Paddle writes a layer's bias as an ``Add`` after it and hard-swish
as ``x * clip(x + 3, 0, 6) / 6``; PyTorch and Paddle write SiLU (swish) as ``x * sigmoid(x)``. As
separate ops each would be a quant point of its own, where one op is rounded once (what a model
written in torch gets); the result keeps the name of the pattern's last tensor, so names still pair.
Each pass takes the node list and returns it rewritten (nodes of ``op_type`` ``SiLU`` are the
importer's own, never written to a file).
"""

from __future__ import annotations

from collections import Counter
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


def bias_adds(nodes: list, graph: Any, values: dict[str, Any]) -> dict[str, tuple[Any, np.ndarray]]:
    """{layer output: (the Add node, the bias)} for each Conv / MatMul with a constant weight and no
    bias whose only reader is an Add of a per-output-channel constant (how Paddle writes a bias)."""
    readers: Counter[str] = Counter(i for n in nodes for i in n.input)
    graph_outputs = {o.name for o in graph.output}
    first_reader: dict[str, Any] = {}
    for n in nodes:
        for i in n.input:
            first_reader.setdefault(i, n)
    folded = {}
    for n in nodes:
        bias_free = len(n.input) == 2 or (len(n.input) > 2 and not n.input[2])
        if n.op_type not in ("Conv", "MatMul") or not bias_free or n.input[1] not in values:
            continue
        out = n.output[0]
        add = first_reader.get(out)
        if readers[out] != 1 or out in graph_outputs or add is None or add.op_type != "Add":
            continue
        other = next((i for i in add.input if i != out), None)
        if other not in values:
            continue
        w, c = values[n.input[1]], np.asarray(values[other])
        if n.op_type == "Conv":
            channels, fits = w.shape[0], 3 <= c.ndim <= w.ndim and c.shape[-3] == w.shape[0]
        else:
            channels, fits = w.shape[-1], w.ndim == 2 and c.ndim >= 1 and c.shape[-1] == w.shape[-1]
        if fits and c.size == channels:
            folded[out] = (add, c.reshape(-1).astype(np.float32))
    return folded


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
