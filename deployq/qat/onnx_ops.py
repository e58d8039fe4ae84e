"""How each ONNX op becomes torch: one handler per op type, for :mod:`deployq.qat.onnx_import`.

This module holds the registry, the helpers, layers, activations and arithmetic;
:mod:`deployq.qat.onnx_shape_ops` registers data movement, shapes, pooling and resizing.

A handler gets the :class:`Builder` (which emits fx nodes and adds modules), the ONNX node and its
inputs, each one of three things:

* an ``fx.Node``: a tensor computed from the model's inputs;
* a ``numpy.ndarray``: a constant (an initializer, a ``Constant`` node, or anything computed from
  constants only, which the importer folds with onnx's reference evaluator before a handler sees it);
* a :class:`Dims`: a shape read from a tensor (``Shape``) and what ``Gather`` / ``Slice`` /
  ``Concat`` / ``Cast`` / arithmetic made of it: a list of ints and ``x.size(i)`` nodes, so that
  a reshape keeps the batch symbolic without tracing anything.

It returns the outputs in the node's output order. Weight layers become torch.nn modules (their
parameters taken from the initializers), so placement fuses and names them as in any model; an
op's attribute that torch cannot express is a :class:`UnsupportedNode` naming the node.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from deployq.qat.onnx_builder import Builder, Dims, UnsupportedNode, Value


class HardSigmoid(nn.Module):
    """ONNX HardSigmoid with any slope: ``clamp(alpha * x + beta, 0, 1)`` (torch's own has 1/6, 1/2)."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.alpha + self.beta, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


HANDLERS: dict[str, Callable[..., list]] = {}


def handles(*ops: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return register


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def const(node: Any, value: Value, what: str) -> np.ndarray:
    if value is None or isinstance(value, np.ndarray):
        return value
    raise UnsupportedNode(f"node {node.name!r} ({node.op_type}): its {what} must be a constant")


def ints(value: Optional[np.ndarray]) -> Optional[list[int]]:
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _param(values: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.array(values, dtype=np.float32)), requires_grad=True)


def pairs(pads: list[int], rank: int) -> tuple[list[int], list[int]]:
    return pads[:rank], pads[rank:]


def torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX's [x1_begin, x2_begin, ..., x1_end, ...] -> F.pad's (last dim first) pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


# ---- weight layers ---------------------------------------------------------------------------


@handles("Conv")
def conv(b: "Builder", node: Any, x: Value, w: Value, bias: Value = None) -> list:
    w, bias = const(node, w, "weight"), const(node, bias, "bias")
    rank = w.ndim - 2
    if rank not in (1, 2) or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedNode(f"node {node.name!r} (Conv): only 1-D and 2-D convolutions with explicit pads")
    begins, ends = pairs(attr(node, "pads", [0] * 2 * rank), rank)
    if begins != ends:
        x = b.call(F.pad, x, torch_pad(begins, ends))
        begins = [0] * rank
    cls = nn.Conv1d if rank == 1 else nn.Conv2d
    groups = attr(node, "group", 1)
    m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(attr(node, "strides", [1] * rank)),
            padding=tuple(begins), dilation=tuple(attr(node, "dilations", [1] * rank)), groups=groups,
            bias=bias is not None)
    m.weight = _param(w)
    if bias is not None:
        m.bias = _param(bias)
    return [b.module(node, m, x)]


@handles("ConvTranspose")
def conv_transpose(b: "Builder", node: Any, x: Value, w: Value, bias: Value = None) -> list:
    w, bias = const(node, w, "weight"), const(node, bias, "bias")
    if w.ndim != 4 or attr(node, "output_shape") is not None or attr(node, "auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedNode(f"node {node.name!r} (ConvTranspose): only 2-D with explicit pads")
    begins, ends = pairs(attr(node, "pads", [0] * 4), 2)
    if begins != ends:
        raise UnsupportedNode(f"node {node.name!r} (ConvTranspose): asymmetric pads {begins + ends}")
    groups = attr(node, "group", 1)
    m = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]),
                           stride=tuple(attr(node, "strides", [1, 1])), padding=tuple(begins),
                           output_padding=tuple(attr(node, "output_padding", [0, 0])),
                           dilation=tuple(attr(node, "dilations", [1, 1])), groups=groups, bias=bias is not None)
    m.weight = _param(w)
    if bias is not None:
        m.bias = _param(bias)
    return [b.module(node, m, x)]


def _linear(b: "Builder", node: Any, x: Value, weight: np.ndarray, bias: Optional[np.ndarray]) -> fx.Node:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    m.weight = _param(weight)
    if bias is not None:
        m.bias = _param(np.broadcast_to(bias, (weight.shape[0],)))
    return b.module(node, m, x)


@handles("Gemm")
def gemm(b: "Builder", node: Any, a: Value, w: Value, c: Value = None) -> list:
    w, c = const(node, w, "B input"), const(node, c, "C input")
    if attr(node, "transA", 0) or not isinstance(a, fx.Node):
        raise UnsupportedNode(f"node {node.name!r} (Gemm): only A x B(ᵀ) + C with a constant B")
    weight = (w if attr(node, "transB", 0) else w.T) * attr(node, "alpha", 1.0)
    bias = None if c is None else np.asarray(c).reshape(-1) * attr(node, "beta", 1.0)
    return [_linear(b, node, a, weight, bias)]


@handles("MatMul")
def matmul(b: "Builder", node: Any, x: Value, w: Value, bias: Value = None) -> list:
    if isinstance(w, np.ndarray) and w.ndim == 2 and isinstance(x, fx.Node):
        return [_linear(b, node, x, w.T, bias)]
    return [b.call(torch.matmul, b.tensor(x), b.tensor(w))]


@handles("BatchNormalization")
def batch_norm(b: "Builder", node: Any, x: Value, scale: Value, shift: Value, mean: Value, var: Value) -> list:
    values = [const(node, v, "statistics") for v in (scale, shift, mean, var)]
    rank = b.rank(x)
    cls = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d if rank in (2, 3, None) else None
    if cls is None:
        raise UnsupportedNode(f"node {node.name!r} (BatchNormalization) on a rank-{rank} tensor")
    m = cls(len(values[0]), eps=attr(node, "epsilon", 1e-5), momentum=1.0 - attr(node, "momentum", 0.9))
    m.weight, m.bias = _param(values[0]), _param(values[1])
    m.running_mean.copy_(torch.from_numpy(np.array(values[2], np.float32)))
    m.running_var.copy_(torch.from_numpy(np.array(values[3], np.float32)))
    return [b.module(node, m.eval(), x)]


@handles("LayerNormalization")
def layer_norm(b: "Builder", node: Any, x: Value, scale: Value, shift: Value = None) -> list:
    scale, shift = const(node, scale, "scale"), const(node, shift, "bias")
    rank, axis = b.rank(x), attr(node, "axis", -1)
    if rank is None or len(node.output) > 1 or attr(node, "stash_type", 1) != 1:
        raise UnsupportedNode(f"node {node.name!r} (LayerNormalization): unknown rank, or statistics outputs")
    shape = tuple(b.shape_of(x)[axis % rank:])
    if any(not isinstance(d, int) for d in shape):
        raise UnsupportedNode(f"node {node.name!r} (LayerNormalization): sizes of the normalized axes unknown")
    m = nn.LayerNorm(shape, eps=attr(node, "epsilon", 1e-5), elementwise_affine=True)
    m.weight = _param(np.broadcast_to(scale, shape))
    m.bias = _param(np.broadcast_to(shift if shift is not None else np.zeros(1, np.float32), shape))
    return [b.module(node, m, x)]


@handles("PRelu")
def prelu(b: "Builder", node: Any, x: Value, slope: Value) -> list:
    slope = const(node, slope, "slope").reshape(-1)
    m = nn.PReLU(len(slope))
    m.weight = _param(slope)
    return [b.module(node, m, x)]


# ---- activations and elementwise math ----------------------------------------------------------


def _module_op(factory: Callable[[Any], nn.Module]) -> Callable:
    def handler(b: "Builder", node: Any, x: Value) -> list:
        return [b.module(node, factory(node), x)]
    return handler


for _op, _factory in {
    "Relu": lambda n: nn.ReLU(), "Sigmoid": lambda n: nn.Sigmoid(), "Tanh": lambda n: nn.Tanh(),
    "LeakyRelu": lambda n: nn.LeakyReLU(attr(n, "alpha", 0.01)), "HardSwish": lambda n: nn.Hardswish(),
    "Elu": lambda n: nn.ELU(attr(n, "alpha", 1.0)), "Gelu": lambda n: nn.GELU(attr(n, "approximate", "none")),
    "Softplus": lambda n: nn.Softplus(), "SiLU": lambda n: nn.SiLU(),  # SiLU: onnx_patterns.silu's node
    "HardSigmoid": lambda n: (nn.Hardsigmoid() if math.isclose(attr(n, "alpha", 0.2), 1 / 6, rel_tol=1e-5)
                              and attr(n, "beta", 0.5) == 0.5 else HardSigmoid(attr(n, "alpha", 0.2), attr(n, "beta", 0.5))),
}.items():
    HANDLERS[_op] = _module_op(_factory)


@handles("Clip")
def clip(b: "Builder", node: Any, x: Value, low: Value = None, high: Value = None) -> list:
    low = attr(node, "min") if low is None else float(const(node, low, "minimum"))
    high = attr(node, "max") if high is None else float(const(node, high, "maximum"))
    if low == 0 and high == 6:
        return [b.module(node, nn.ReLU6(), x)]
    if low == 0 and (high is None or high == math.inf):
        return [b.module(node, nn.ReLU(), x)]
    if low is not None and high is not None:
        return [b.module(node, nn.Hardtanh(low, high), x)]
    return [b.call(torch.clamp, x, min=low, max=high)]


@handles("Softmax", "LogSoftmax")
def softmax(b: "Builder", node: Any, x: Value) -> list:
    rank, axis = b.rank(x), attr(node, "axis", -1 if b.opset >= 13 else 1)
    if b.opset < 13 and rank is not None and axis % rank != rank - 1:
        raise UnsupportedNode(f"node {node.name!r} ({node.op_type}): opset {b.opset} softmax over axes "
                              f"{axis}.. of a rank-{rank} tensor (flattened)")
    cls = nn.Softmax if node.op_type == "Softmax" else nn.LogSoftmax
    return [b.module(node, cls(dim=axis), x)]


_UNARY = {"Erf": torch.erf, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg,
          "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
          "Sin": torch.sin, "Cos": torch.cos}
for _op, _fn in _UNARY.items():
    HANDLERS[_op] = (lambda fn: lambda b, node, x: [b.call(fn, x)])(_fn)

_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
           "Pow": torch.pow}


@handles(*_BINARY)
def binary(b: "Builder", node: Any, x: Value, y: Value) -> list:
    fn = _BINARY[node.op_type]
    if isinstance(x, Dims) or isinstance(y, Dims):
        return [b.dims_math(node, fn, x, y)]
    return [b.call(fn, b.operand(x), b.operand(y))]
