"""The fx graph the ONNX importer writes, and what its op handlers pass around.

:class:`Builder` emits nodes and adds modules (at identifiers of the ONNX names) and constants
(as buffers), and runs what it wrote on an example input of the given shapes, for the ranks and
sizes shape inference cannot give. A value is an ``fx.Node`` (a tensor computed from the inputs),
a ``numpy.ndarray`` (a constant) or :class:`Dims` (a shape being computed with). Used by
:mod:`deployq.qat.onnx_import` and the handlers in :mod:`deployq.qat.onnx_ops` and
:mod:`deployq.qat.onnx_shape_ops`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import fx, nn


class UnsupportedNode(ValueError):
    """An ONNX node the importer cannot express in torch (the op, or one of its attributes)."""


@dataclass
class Dims:
    """A 1-D integer tensor made from tensor shapes: each entry an int or an fx node (``x.size(i)``);
    `scalar`: a 0-d one (``Gather`` with one index). Once every entry is an int it is a constant."""

    values: list
    scalar: bool = False

    def constant(self) -> Optional[np.ndarray]:
        if not all(isinstance(v, int) for v in self.values):
            return None
        return np.array(self.values[0] if self.scalar else self.values, np.int64)


Value = Any  # fx.Node | np.ndarray | Dims


def identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name).strip("_") or "t"
    return f"t_{ident}" if ident[0].isdigit() else ident


class Builder:
    """Writes the fx graph: modules at identifiers of the ONNX names, constants as buffers."""

    def __init__(self, opset: int, dims: dict[str, list], shapes: Optional[list[list[int]]]) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.opset = opset
        self.dims = dims  # sizes from shape inference, by ONNX name (None where unknown)
        self.shapes = shapes
        self.names: dict[fx.Node, str] = {}
        self.used: Counter[str] = Counter()
        self.constants = 0
        # each node's value on an example input, where the input sizes are known: the ranks and
        # sizes shape inference cannot give (a Reshape to a shape computed from shapes)
        self.sizes_fixed = False  # a size read with Shape became a constant: the graph holds at these sizes only
        self.examples: Optional[dict[fx.Node, Any]] = {} if shapes is not None else None
        self.evaluated = 0

    def unique(self, name: str) -> str:
        base = identifier(name)
        self.used[base] += 1
        return base if self.used[base] == 1 else f"{base}_{self.used[base] - 1}"

    def module(self, node: Any, m: nn.Module, *args: Any) -> fx.Node:
        path = self.unique(node.output[0])
        self.root.add_module(path, m)
        return self.graph.call_module(path, tuple(self.operand(a) for a in args))

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(self.operand(a) for a in args), kwargs)

    def call_method(self, method: str, *args: Any) -> fx.Node:
        return self.graph.call_method(method, args)

    def tensor(self, value: Any) -> fx.Node:
        if isinstance(value, fx.Node):
            return value
        array = np.asarray(value)
        name = f"const_{self.constants}"
        self.constants += 1
        dtype = torch.float32 if array.dtype.kind == "f" else torch.int64
        self.root.register_buffer(name, torch.from_numpy(np.array(array)).to(dtype))
        return self.graph.get_attr(name)

    def operand(self, value: Any) -> Any:
        """A tensor operand: an fx node; a one-element constant of rank <= 1 as a Python number,
        any other constant as a buffer. Python values (ints, tuples, slices) pass unchanged."""
        if isinstance(value, np.ndarray):
            if value.size == 1 and value.ndim <= 1:
                item = value.reshape(-1)[0]
                return float(item) if value.dtype.kind == "f" else int(item)
            return self.tensor(value)
        if isinstance(value, Dims):
            raise UnsupportedNode("a shape is used as a tensor")
        return value

    def evaluate(self) -> None:
        """Run the nodes written since the last call on an example input of the given shapes."""
        if self.examples is None:
            return
        env = self.examples
        load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
        nodes = list(self.graph.nodes)[self.evaluated:]
        self.evaluated += len(nodes)
        for node in nodes:
            if node.op == "placeholder":
                env[node] = torch.full(tuple(self.shapes[sum(n.op == "placeholder" for n in env)]), 0.5)
            elif node.op == "get_attr":
                env[node] = getattr(self.root, str(node.target))
            elif node.op == "call_module":
                env[node] = self.root.get_submodule(str(node.target))(*load(node.args))
            elif node.op == "call_function":
                env[node] = node.target(*load(node.args), **load(node.kwargs))
            elif node.op == "call_method":
                args = load(node.args)
                env[node] = getattr(args[0], str(node.target))(*args[1:], **load(node.kwargs))

    def shape_of(self, x: Any) -> Optional[list]:
        if isinstance(x, np.ndarray):
            return list(x.shape)
        if self.examples is not None and x in self.examples and isinstance(self.examples[x], torch.Tensor):
            return list(self.examples[x].shape)
        name = self.names.get(x) if isinstance(x, fx.Node) else None
        return self.dims.get(name) if name is not None else None

    def rank(self, x: Any) -> Optional[int]:
        shape = self.shape_of(x)
        return None if shape is None else len(shape)

    def size(self, x: Any, axis: int) -> int:
        dims = self.shape_of(x) or []
        if axis < len(dims) and isinstance(dims[axis], int):
            return dims[axis]
        raise UnsupportedNode(f"the size of {self.names.get(x)!r} along axis {axis} is not known")

    def dims_math(self, node: Any, fn: Callable, x: Any, y: Any) -> Dims:
        left = x.values if isinstance(x, Dims) else [int(v) for v in np.asarray(x).reshape(-1)]
        right = y.values if isinstance(y, Dims) else [int(v) for v in np.asarray(y).reshape(-1)]
        if len(left) == 1:
            left = left * len(right)
        if len(right) == 1:
            right = right * len(left)
        fn = {"Div": lambda a, b: a // b}.get(node.op_type, fn)
        out = [fn(a, b) if isinstance(a, int) and isinstance(b, int)
               else self.graph.call_function(fn if node.op_type != "Div" else _floordiv, (a, b))
               for a, b in zip(left, right)]
        return Dims(out)


def _floordiv(a: Any, b: Any) -> Any:
    return a // b
