"""What each torch.fx node does, for quantization: data movement, fusable activation, or compute.

Data-movement ops only rearrange (or select, or pad with zeros) values that are already on the
quantization grid, so they carry their input's quantization through and get no quant point of
their own (docs/design.md, contract 3). Every other op that produces a float tensor is a compute op and
its output is a quant point. ``torch.cat`` is a compute op here: its inputs have their own scales,
so the result is requantized at the concat's quant point.

A graph captured by symbolic fx calls modules, torch functions and tensor methods; one captured by
torch.export calls ATen operators (``aten.relu.default``). Every question below is answered for
both forms, so that placement does not depend on how the model was captured.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn

DATA_MOVEMENT_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Flatten,
    nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ChannelShuffle,
)
DATA_MOVEMENT_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.narrow, torch.flip, torch.roll, torch.movedim, torch.clone,
    F.pixel_shuffle, F.pixel_unshuffle, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout,
    F.dropout2d, operator.getitem, torch.pixel_shuffle, torch.pixel_unshuffle,
}
DATA_MOVEMENT_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "contiguous",
    "chunk", "split", "narrow", "flip", "roll", "expand", "expand_as", "repeat", "clone", "view_as",
    "reshape_as", "t", "unflatten", "movedim", "__getitem__",
}

# ATen operators (by their overload packet's name) that move data, for graphs from torch.export
DATA_MOVEMENT_ATEN = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "slice", "select", "split", "split_with_sizes", "chunk", "narrow", "flip", "roll", "expand",
    "clone", "alias", "contiguous", "detach", "unbind", "movedim", "repeat", "dropout", "feature_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "reflection_pad1d", "reflection_pad2d",
    "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
}

# activation name (as used in QConfig.fuse_activations) by module type / function / method / ATen op
_ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.Hardtanh, "hardtanh"))
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
                  F.hardtanh: "hardtanh"}
_ACT_METHODS = {"relu": "relu"}
_ACT_ATEN = {"relu": "relu", "leaky_relu": "leaky_relu", "hardtanh": "hardtanh", "relu6": "relu6"}
_CLAMPS = {torch.clamp, torch.clip}


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def aten_name(target: Any) -> Optional[str]:
    """'relu' for ``aten.relu.default`` (any ATen overload), else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target.overloadpacket.__name__
    return None


def is_add(node: fx.Node) -> bool:
    """``a + b`` in any form (operator, torch.add, Tensor.add, aten.add) without a scaling alpha."""
    if node.op == "call_method":
        return node.target == "add" and "alpha" not in node.kwargs
    if node.op != "call_function":
        return False
    if node.target in (operator.add, torch.add):
        return "alpha" not in node.kwargs
    return aten_name(node.target) == "add" and node.kwargs.get("alpha", 1) == 1


def is_mul(node: fx.Node) -> bool:
    """``a * b`` in any form (operator, torch.mul, Tensor.mul, aten.mul): a gate applied to a
    tensor (squeeze-excitation), or a scaling by a constant."""
    if node.op == "call_method":
        return node.target == "mul"
    if node.op != "call_function":
        return False
    return node.target in (operator.mul, torch.mul) or aten_name(node.target) == "mul"


ALIAS = "deployq_alias"  # node.meta key: shape propagation saw the output share its input's memory


def is_data_movement(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for ops that carry their input's quantization through (the module docstring).

    Besides the ops listed above: any op whose output was seen to be a view of its input (an
    eval-mode ``StochasticDepth``, ``x.contiguous()``, ``x.detach()``: shape propagation marks
    them), and ``torch.cat`` of a single tensor.
    """
    if node.meta.get(ALIAS):
        return True
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        return isinstance(tensors, (list, tuple)) and len(tensors) == 1
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
            return m.value == 0
        if isinstance(m, nn.Upsample):
            return m.mode == "nearest"
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return not m.return_indices
        return isinstance(m, DATA_MOVEMENT_MODULES)
    if node.op == "call_function":
        if _pads_for_max_pool(node, modules):
            return True
        if node.target is F.pad:
            return _arg(node, 2, "mode", "constant") != "constant" or not _arg(node, 3, "value", None)
        if node.target is F.interpolate:
            return _arg(node, 3, "mode", "nearest") == "nearest"
        aten = aten_name(node.target)
        if aten == "constant_pad_nd":
            return not _arg(node, 2, "value", 0)
        if aten == "pad":
            return _arg(node, 2, "mode", "constant") != "constant" or not _arg(node, 3, "value", None)
        if aten == "cat":
            return len(node.args[0]) == 1
        return node.target in DATA_MOVEMENT_FUNCTIONS or aten in DATA_MOVEMENT_ATEN
    if node.op == "call_method":
        return node.target in DATA_MOVEMENT_METHODS
    return False


T = TypeVar("T")

_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}


def joined_tensors(node: fx.Node) -> list[fx.Node]:
    """The tensors a concatenation (``torch.cat`` / ``stack`` in any form) joins; [] for other ops."""
    if node.op != "call_function" or not (node.target in _CONCATENATIONS or aten_name(node.target) in ("cat", "stack")):
        return []
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []


def upstream(node: fx.Node, modules: dict[str, nn.Module], found: Mapping[fx.Node, T]) -> Optional[T]:
    """What `found` holds for the nearest node `node`'s first input comes from, looking back through
    data movement (views, pads, max pools...); None where a computing op comes first."""
    return carried_from(node.args[0] if node.args else None, modules, found)


def carried_from(value: Any, modules: dict[str, nn.Module], found: Mapping[fx.Node, T]) -> Optional[T]:
    """What `found` holds for `value` or the nearest node it comes from through data movement."""
    current = value
    while isinstance(current, fx.Node):
        if current in found:
            return found[current]
        if not is_data_movement(current, modules) or not current.args:
            return None
        current = current.args[0]
    return None


def _pads_for_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A constant pad of −inf read only by max pools (TensorFlow's "SAME" max pooling, timm's
    MaxPool2dSame): no window is all padding, so the pool never selects it and the values that
    come out are the input's own. It carries its input's quantization like the pool does."""
    aten = aten_name(node.target) if node.op == "call_function" else None
    if node.op == "call_function" and (node.target is F.pad or aten == "pad"):
        value = _arg(node, 3, "value", None) if _arg(node, 2, "mode", "constant") == "constant" else None
    elif aten == "constant_pad_nd":
        value = _arg(node, 2, "value", 0)
    else:
        return False
    if not isinstance(value, (int, float)) or value != float("-inf") or not node.users:
        return False
    return all(_is_max_pool(user, modules) for user in node.users)


def _is_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
    if node.op == "call_function":
        return node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d) or aten_name(node.target) in (
            "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices")
    return False


def activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
    """'relu' | 'relu6' | 'leaky_relu' | 'hardtanh' for an activation node, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        for cls, kind in _ACT_MODULES:
            if isinstance(m, cls):
                return kind
        return None
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[node.target]
        aten = aten_name(node.target)
        if aten == "hardtanh":
            return "relu6" if (_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)) == (0, 6) else "hardtanh"
        if node.target in _CLAMPS or aten in ("clamp", "clip"):
            return _clamp_kind(node)
        return _ACT_ATEN.get(aten)
    if node.op == "call_method":
        if node.target in ("clamp", "clip"):
            return _clamp_kind(node)
        return _ACT_METHODS.get(node.target)
    return None


def is_sloped_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A PReLU or a LeakyReLU (a negative slope): after a convolution, onnxruntime's CPU provider
    runs it in float between a DequantizeLinear and a QuantizeLinear."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.PReLU, nn.LeakyReLU))
    return node.op == "call_function" and (node.target in (F.prelu, F.leaky_relu) or aten_name(node.target) in (
        "prelu", "_prelu_kernel", "leaky_relu"))


def _clamp_kind(node: fx.Node) -> Optional[str]:
    """``clamp(x, 0)`` is a ReLU and ``clamp(x, 0, 6)`` a ReLU6 (how some models write them)."""
    bounds = (_arg(node, 1, "min", None), _arg(node, 2, "max", None))
    return {(0, None): "relu", (0, 6): "relu6"}.get(bounds)  # 0 == 0.0: one key serves both


def activation_module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module:
    """The activation of `node` as a module (functional calls become their module twins)."""
    if node.op == "call_module":
        return modules[node.target]
    kind = activation_kind(node, modules)
    if kind == "relu":
        return nn.ReLU()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "leaky_relu":
        return nn.LeakyReLU(float(_arg(node, 1, "negative_slope", 0.01)))
    if kind == "hardtanh":
        return nn.Hardtanh(float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0)))
    raise ValueError(f"{node.name} is not an activation")


_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}


def is_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A softmax in any form (module, function, method, ATen op): its output is a probability."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Softmax)
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS or aten_name(node.target) in ("softmax", "_softmax")
    return node.op == "call_method" and node.target == "softmax"


# Ops that no deployq target runs on integer codes (onnxruntime has no QLinear kernel for them):
# they read their inputs as float. A quant point between two of them rounds a value no integer
# kernel reads; see :func:`computes_in_float`.
_FLOAT_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                  nn.LocalResponseNorm, nn.GELU)
_FLOAT_FUNCTIONS = {F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize, F.gelu,
                    operator.sub, operator.truediv, torch.sub, torch.div, torch.true_divide, torch.pow, torch.sqrt,
                    torch.rsqrt, torch.exp, torch.log, torch.erf, torch.reciprocal, torch.var, torch.std}
_FLOAT_METHODS = {"sub", "rsub", "div", "true_divide", "pow", "sqrt", "rsqrt", "exp", "log", "erf",
                  "reciprocal", "var", "std"}
_FLOAT_ATEN = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "gelu",
               "sub", "rsub", "div", "pow", "sqrt", "rsqrt", "exp", "log", "erf", "reciprocal", "var", "std",
               "var_mean", "std_mean"}


def computes_in_float(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for an op with no integer kernel on any target: a normalization (LayerNorm, GroupNorm,
    InstanceNorm), GELU, subtraction, division, powers, roots, exp / log, variance, a mean over
    other axes than height and width. It reads its
    inputs as float, whatever grid they are on (onnxruntime's quantize_static leaves them float too)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _FLOAT_MODULES)
    if _is_mean(node):
        return not _over_height_and_width(node)
    if node.op == "call_function":
        return node.target in _FLOAT_FUNCTIONS or aten_name(node.target) in _FLOAT_ATEN
    return node.op == "call_method" and node.target in _FLOAT_METHODS


def _is_mean(node: fx.Node) -> bool:
    return ((node.op == "call_function" and (node.target is torch.mean or aten_name(node.target) == "mean"))
            or (node.op == "call_method" and node.target == "mean"))


def _over_height_and_width(node: fx.Node) -> bool:
    """A mean over the last two axes of a 4-D tensor: the global average pool the exporter writes
    as GlobalAveragePool (an integer kernel). Any other mean is a float ReduceMean."""
    source = node.args[0] if node.args else None
    meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    dims = _arg(node, 1, "dim", None)
    dims = (dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, (list, tuple)) else None
    return rank == 4 and dims is not None and {d % 4 for d in dims if isinstance(d, int)} == {2, 3} and len(dims) == 2


_MAX_POOLS = ((nn.MaxPool1d, F.max_pool1d), (nn.MaxPool2d, F.max_pool2d), (nn.MaxPool3d, F.max_pool3d))


def max_pool_function(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What a max pool node computes, as a function of its input alone (the same kernel, stride,
    padding, dilation and ceil mode); None if `node` is not a max pool returning one tensor."""
    if node.op == "call_module":
        m = modules[node.target]
        for cls, fn in _MAX_POOLS:
            if isinstance(m, cls) and not m.return_indices:
                return functools.partial(fn, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                         dilation=m.dilation, ceil_mode=m.ceil_mode)
        return None
    functions = tuple(fn for _, fn in _MAX_POOLS)
    if node.op != "call_function" or not (node.target in functions or aten_name(node.target) in (
            "max_pool1d", "max_pool2d", "max_pool3d")):
        return None
    # F.max_pool2d and aten.max_pool2d name their arguments alike after the input
    keywords = {**dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                           node.args[1:])), **node.kwargs}
    if any(isinstance(a, fx.Node) for a in keywords.values()) or keywords.pop("return_indices", False):
        return None
    return functools.partial(node.target, **keywords)


def is_window_average(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An average over sliding windows (AvgPool, avg_pool2d; not an adaptive or global mean): every
    output is a mean of a few input values, so it stays within the input's range."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
    if node.op == "call_function":
        return node.target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d) or aten_name(node.target) in (
            "avg_pool1d", "avg_pool2d", "avg_pool3d")
    return False


def float_tensor_output(node: fx.Node) -> bool:
    """True when shape propagation saw `node` produce one floating-point tensor."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[node.target]
        return getattr(m, "kind", type(m).__name__)
    if node.op == "call_function":
        return aten_name(node.target) or getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return node.op
