"""ONNX data movement, shapes, pooling, reductions and resizing as torch: handlers registered in
:data:`deployq.qat.onnx_ops.HANDLERS` (that module says what a handler gets and returns)."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deployq.qat.onnx_builder import Builder, Dims, UnsupportedNode, Value
from deployq.qat.onnx_ops import attr, const, handles, ints, pairs, torch_pad


# ---- data movement and shapes -------------------------------------------------------------------


@handles("Identity", "Dropout")
def identity(b: "Builder", node: Any, x: Value, *rest: Value) -> list:
    return [x] + [None] * (len(node.output) - 1)


@handles("Cast")
def cast(b: "Builder", node: Any, x: Value) -> list:
    from onnx import TensorProto
    to = attr(node, "to")
    if isinstance(x, Dims) or to == TensorProto.FLOAT:
        return [x]
    raise UnsupportedNode(f"node {node.name!r} (Cast): a cast of a tensor to type {to} (only to float)")


@handles("Shape")
def shape(b: "Builder", node: Any, x: Value) -> list:
    if isinstance(x, Dims):
        return [np.array([len(x.values)], np.int64)]
    rank = b.rank(x)
    if rank is None:
        raise UnsupportedNode(f"node {node.name!r} (Shape): the rank of its input is unknown")
    start, end = attr(node, "start", 0), attr(node, "end", rank)
    known = b.shape_of(x) or [None] * rank
    sizes = [known[i] if i > 0 and isinstance(known[i], int) and known[i] > 0 else b.call_method("size", x, i)
             for i in range(rank)]  # the batch stays symbolic; sizes fixed by the inputs' shapes are ints
    b.sizes_fixed = b.sizes_fixed or any(isinstance(v, int) for v in sizes[start:end])
    return [Dims(sizes[start:end])]


@handles("Gather")
def gather(b: "Builder", node: Any, x: Value, index: Value) -> list:
    index = const(node, index, "indices")
    axis = attr(node, "axis", 0)
    if isinstance(x, Dims):
        return [Dims([x.values[int(i)] for i in np.asarray(index).reshape(-1)], scalar=np.ndim(index) == 0)]
    if np.ndim(index) == 0:
        return [b.call(torch.select, x, axis, int(index))]
    return [b.call(torch.index_select, x, axis, b.operand(np.asarray(index, np.int64)))]


@handles("Slice")
def slice_(b: "Builder", node: Any, x: Value, starts: Value = None, ends: Value = None, axes: Value = None,
           steps: Value = None) -> list:
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")
    starts, ends = ints(const(node, np.asarray(starts), "starts")), ints(const(node, np.asarray(ends), "ends"))
    axes = list(range(len(starts))) if axes is None else ints(const(node, np.asarray(axes), "axes"))
    steps = [1] * len(starts) if steps is None else ints(const(node, steps, "steps"))
    if any(s <= 0 for s in steps):
        raise UnsupportedNode(f"node {node.name!r} (Slice): negative steps")
    big = 2 ** 62
    if isinstance(x, Dims):
        s, e = starts[0], min(ends[0], big)
        return [Dims(x.values[s:e:steps[0]])]
    rank = b.rank(x)
    index: list = [slice(None)] * (max(a % rank for a in axes) + 1 if rank else max(axes) + 1)
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a % rank if rank else a] = slice(s, None if e >= big else e, st)
    return [b.call(operator.getitem, x, tuple(index))]


@handles("Concat")
def concat(b: "Builder", node: Any, *xs: Value) -> list:
    if any(isinstance(x, Dims) for x in xs):
        values: list = []
        for x in xs:
            values += x.values if isinstance(x, Dims) else ints(x)
        return [Dims(values)]
    return [b.call(torch.cat, [b.tensor(x) for x in xs], attr(node, "axis"))]


@handles("Unsqueeze", "Squeeze")
def squeeze(b: "Builder", node: Any, x: Value, axes: Value = None) -> list:
    axes = ints(attr(node, "axes")) if axes is None and attr(node, "axes") is not None else ints(
        const(node, axes, "axes"))
    if isinstance(x, Dims):  # a scalar unsqueezed is a 1-D shape; a 1-D one of one entry squeezed a scalar
        return [Dims(x.values, scalar=node.op_type == "Squeeze" and len(x.values) == 1)]
    if node.op_type == "Unsqueeze":
        for a in sorted(axes or []):
            x = b.call(torch.unsqueeze, x, a)
        return [x]
    return [b.call(torch.squeeze, x, tuple(axes)) if axes else b.call(torch.squeeze, x)]


@handles("Reshape")
def reshape(b: "Builder", node: Any, x: Value, shape: Value) -> list:
    if isinstance(x, Dims):  # a shape vector reshaped to a vector (how torch.onnx writes expand)
        return [Dims(x.values)]
    dims = shape.values if isinstance(shape, Dims) else ints(const(node, shape, "shape"))
    if not attr(node, "allowzero", 0):
        dims = [b.call_method("size", x, i) if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    return [b.call(torch.reshape, x, tuple(dims))]


@handles("Expand")
def expand(b: "Builder", node: Any, x: Value, shape: Value) -> list:
    """ONNX's broadcast to `shape`: a size 1 there keeps the input's size (torch's -1)."""
    dims = shape.values if isinstance(shape, Dims) else ints(const(node, shape, "shape"))
    return [b.call_method("expand", b.tensor(x), *(-1 if isinstance(d, int) and d == 1 else d for d in dims))]


@handles("Flatten")
def flatten(b: "Builder", node: Any, x: Value) -> list:
    axis = attr(node, "axis", 1)
    if axis == 0:
        return [b.call(torch.reshape, x, (1, -1))]
    lead = [b.call_method("size", x, i) for i in range(axis)]
    return [b.call(torch.reshape, x, (*lead, -1))]


@handles("Transpose")
def transpose(b: "Builder", node: Any, x: Value) -> list:
    perm = attr(node, "perm") or list(reversed(range(b.rank(x))))
    return [b.call(torch.permute, x, tuple(perm))]


@handles("Split")
def split(b: "Builder", node: Any, x: Value, sizes: Value = None) -> list:
    axis = attr(node, "axis", 0)
    sizes = ints(const(node, sizes, "split")) if sizes is not None else attr(node, "split")
    if sizes is None:
        width = b.size(x, axis)
        sizes = [width // len(node.output)] * len(node.output)
    parts = b.call(torch.split, x, list(sizes), axis)
    return [b.call(operator.getitem, parts, i) for i in range(len(node.output))]


@handles("Pad")
def pad(b: "Builder", node: Any, x: Value, pads: Value = None, value: Value = None) -> list:
    pads = ints(const(node, pads, "pads")) if pads is not None else attr(node, "pads")
    mode = attr(node, "mode", "constant")
    rank = len(pads) // 2
    torch_pads = torch_pad(pads[:rank], pads[rank:])
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:
        torch_pads = torch_pads[:-2]
    fill = 0.0 if value is None else float(const(node, value, "value"))
    if mode == "constant":
        return [b.call(F.pad, x, torch_pads, "constant", fill)]
    return [b.call(F.pad, x, torch_pads, {"reflect": "reflect", "edge": "replicate"}[mode])]


@handles("DepthToSpace")
def depth_to_space(b: "Builder", node: Any, x: Value) -> list:
    r = attr(node, "blocksize")
    if attr(node, "mode", "DCR") == "CRD":
        return [b.call(F.pixel_shuffle, x, r)]
    n, c, h, w = (b.call_method("size", x, i) for i in range(4))
    y = b.call(torch.reshape, x, (n, r, r, b.call(operator.floordiv, c, r * r), h, w))
    y = b.call(torch.permute, y, (0, 3, 4, 1, 5, 2))
    return [b.call(torch.reshape, y, (n, b.call(operator.floordiv, c, r * r), b.call(operator.mul, h, r),
                                      b.call(operator.mul, w, r)))]


# ---- pooling, reductions, resizing ---------------------------------------------------------------


def _pool_pads(b: "Builder", node: Any, x: Value, fill: float) -> tuple[Value, list[int]]:
    kernel = attr(node, "kernel_shape")
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedNode(f"node {node.name!r} ({node.op_type}): auto_pad {attr(node, 'auto_pad')}")
    begins, ends = pairs(attr(node, "pads", [0] * 2 * len(kernel)), len(kernel))
    if begins != ends or any(2 * p > k for p, k in zip(begins, kernel)):
        x = b.call(F.pad, x, torch_pad(begins, ends), "constant", fill)
        begins = [0] * len(kernel)
    return x, begins


@handles("MaxPool")
def max_pool(b: "Builder", node: Any, x: Value) -> list:
    if len(node.output) > 1 or len(attr(node, "kernel_shape")) != 2:
        raise UnsupportedNode(f"node {node.name!r} (MaxPool): only 2-D pooling without indices")
    x, begins = _pool_pads(b, node, x, -math.inf)
    m = nn.MaxPool2d(tuple(attr(node, "kernel_shape")), tuple(attr(node, "strides", [1, 1])), tuple(begins),
                     tuple(attr(node, "dilations", [1, 1])), ceil_mode=bool(attr(node, "ceil_mode", 0)))
    return [b.module(node, m, x)]


@handles("AveragePool")
def average_pool(b: "Builder", node: Any, x: Value) -> list:
    if len(attr(node, "kernel_shape")) != 2:
        raise UnsupportedNode(f"node {node.name!r} (AveragePool): only 2-D pooling")
    include = bool(attr(node, "count_include_pad", 0))
    begins, ends = pairs(attr(node, "pads", [0] * 4), 2)
    if begins != ends and not include:
        raise UnsupportedNode(f"node {node.name!r} (AveragePool): asymmetric pads that are not counted")
    x, begins = _pool_pads(b, node, x, 0.0)
    m = nn.AvgPool2d(tuple(attr(node, "kernel_shape")), tuple(attr(node, "strides", [1, 1])), tuple(begins),
                     ceil_mode=bool(attr(node, "ceil_mode", 0)), count_include_pad=include)
    return [b.module(node, m, x)]


@handles("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b: "Builder", node: Any, x: Value) -> list:
    cls = nn.AdaptiveAvgPool2d if node.op_type == "GlobalAveragePool" else nn.AdaptiveMaxPool2d
    return [b.module(node, cls(1), x)]


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}


@handles(*_REDUCE)
def reduce(b: "Builder", node: Any, x: Value, axes: Value = None) -> list:
    axes = ints(const(node, axes, "axes")) if axes is not None else attr(node, "axes")
    keep = bool(attr(node, "keepdims", 1))
    if axes is None:
        axes = list(range(b.rank(x)))
    return [b.call(_REDUCE[node.op_type], x, tuple(axes), keepdim=keep)]


@handles("Resize", "Upsample")
def resize(b: "Builder", node: Any, x: Value, *rest: Value) -> list:
    if node.op_type == "Upsample":
        scales, sizes = rest[0], None
    else:
        scales = rest[1] if len(rest) > 1 else None
        sizes = rest[2] if len(rest) > 2 else None
    mode = attr(node, "mode", "nearest")
    coords = attr(node, "coordinate_transformation_mode", "half_pixel" if node.op_type == "Resize" else "asymmetric")
    if mode == "nearest" and coords == "asymmetric" and attr(node, "nearest_mode", "round_prefer_floor") == "floor":
        kwargs: dict = {"mode": "nearest"}
    elif mode == "linear" and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kwargs = {"mode": "bilinear", "align_corners": coords == "align_corners"}
    else:
        raise UnsupportedNode(f"node {node.name!r} ({node.op_type}): mode {mode!r} with coordinates {coords!r}")
    if sizes is not None and (isinstance(sizes, Dims) or np.size(sizes)):
        dims = sizes.values if isinstance(sizes, Dims) else ints(sizes)
        return [b.call(F.interpolate, x, size=tuple(dims[2:]), **kwargs)]
    factors = [float(s) for s in np.asarray(const(node, scales, "scales")).reshape(-1)]
    if factors[:2] != [1.0, 1.0]:
        raise UnsupportedNode(f"node {node.name!r} ({node.op_type}): scales {factors} resize batch or channels")
    return [b.call(F.interpolate, x, scale_factor=tuple(factors[2:]), **kwargs)]

