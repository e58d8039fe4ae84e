"""What each torch.fx node does, for quantization: data movement, fusable activation, or compute.

Data-movement ops only rearrange (or select, or pad with zeros) values that are already on the
quantization grid, so they carry their input's quantization through and get no quant point of
their own (docs/design.md, contract 3). Every other op that produces a float tensor is a compute op and
its output is a quant point. ``torch.cat`` is a compute op here: its inputs have their own scales,
so the result is requantized at the concat's quant point.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

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

# activation name (as used in QConfig.fuse_activations) by module type / function / method
_ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.Hardtanh, "hardtanh"))
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
                  F.hardtanh: "hardtanh"}
_ACT_METHODS = {"relu": "relu"}


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
        if node.target is F.pad:
            return _arg(node, 2, "mode", "constant") != "constant" or not _arg(node, 3, "value", None)
        if node.target is F.interpolate:
            return _arg(node, 3, "mode", "nearest") == "nearest"
        return node.target in DATA_MOVEMENT_FUNCTIONS
    if node.op == "call_method":
        return node.target in DATA_MOVEMENT_METHODS
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
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


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


def float_tensor_output(node: fx.Node) -> bool:
    """True when shape propagation saw `node` produce one floating-point tensor."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[node.target]
        return getattr(m, "kind", type(m).__name__)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return node.op
