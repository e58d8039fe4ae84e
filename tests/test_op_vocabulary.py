"""The torch side and the ONNX side name the same data-movement ops.

`deployq.qat.fx_ops` lists the torch ops that carry their input's quantization through (no quant
point after them); `deployq.exporters.graph.DATA_MOVEMENT_OPS` lists the ONNX ops the exporter
treats the same way. Each torch op is exported here, as deployq exports (torch.onnx, dynamo), and
every ONNX op it becomes must be on the ONNX list: otherwise a tensor torch leaves unquantized
would be requantized in ONNX, or kept in float where torch kept codes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deployq.exporters.graph import DATA_MOVEMENT_OPS
from deployq.qat import fx_ops

X = torch.randn(2, 8, 6, 6)
# ops that only compute shapes or constants for the moving op
HELPERS = {"Constant", "Shape", "Cast", "ConstantOfShape", "Range"}
# torch.roll exports as two Slices and a Concat: the values are moved exactly, the Concat runs in
# float in onnxruntime (its output is no quant point on either side, so the two sides agree)
EXCEPTIONS = {"roll": {"Concat"}}


class Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


FUNCTIONS = {  # one call per entry of fx_ops.DATA_MOVEMENT_FUNCTIONS / _METHODS
    "flatten": lambda t: torch.flatten(t, 1), "reshape": lambda t: torch.reshape(t, (2, -1)),
    "permute": lambda t: torch.permute(t, (0, 2, 3, 1)), "transpose": lambda t: torch.transpose(t, 1, 2),
    "squeeze": lambda t: torch.squeeze(t[:, :1], 1), "unsqueeze": lambda t: torch.unsqueeze(t, 1),
    "chunk": lambda t: torch.chunk(t, 2, 1)[1], "split": lambda t: torch.split(t, 4, 1)[0],
    "narrow": lambda t: torch.narrow(t, 1, 2, 3), "flip": lambda t: torch.flip(t, (2,)),
    "roll": lambda t: torch.roll(t, 1, 2), "movedim": lambda t: torch.movedim(t, 1, 3),
    "clone": lambda t: torch.clone(t), "pixel_shuffle": lambda t: F.pixel_shuffle(t, 2),
    "pixel_unshuffle": lambda t: F.pixel_unshuffle(t, 2), "max_pool2d": lambda t: F.max_pool2d(t, 2),
    "getitem": lambda t: t[:, 1:5, ::2], "view": lambda t: t.view(2, -1),
    "expand": lambda t: t[:, :1].expand(2, 8, 6, 6), "repeat": lambda t: t.repeat(1, 2, 1, 1),
    "t": lambda t: t.flatten(1).t(), "contiguous": lambda t: t.permute(0, 2, 3, 1).contiguous(),
    "unflatten": lambda t: t.unflatten(1, (2, 4)),
}
MODULES = {  # every module type of fx_ops.DATA_MOVEMENT_MODULES that torch.export takes on a 4-D tensor
    "MaxPool2d": nn.MaxPool2d(2), "PixelShuffle": nn.PixelShuffle(2), "PixelUnshuffle": nn.PixelUnshuffle(2),
    "Flatten": nn.Flatten(), "Unflatten": nn.Unflatten(1, (2, 4)), "Identity": nn.Identity(),
    "Dropout": nn.Dropout(), "Dropout2d": nn.Dropout2d(), "ReflectionPad2d": nn.ReflectionPad2d(1),
    "ReplicationPad2d": nn.ReplicationPad2d(1), "ChannelShuffle": nn.ChannelShuffle(2),
}


def onnx_ops(module: nn.Module) -> set[str]:
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), (X,), None, dynamo=True, opset_version=21, verbose=False)
    finally:
        quiet.setLevel(level)
    return {n.op_type for n in program.model_proto.graph.node} - HELPERS


def test_the_cases_cover_the_fx_lists():
    """Every torch data-movement module type and method has a case here (the 1-d / 3-d variants
    of pooling, padding and dropout export to the same ONNX ops as the 2-d ones)."""
    names = {t.__name__.replace("1d", "2d").replace("3d", "2d") for t in fx_ops.DATA_MOVEMENT_MODULES}
    assert names <= set(MODULES)
    methods = fx_ops.DATA_MOVEMENT_METHODS - {"__getitem__", "expand_as", "view_as", "reshape_as"}
    assert methods <= set(FUNCTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_a_torch_data_movement_function_exports_to_onnx_data_movement(name):
    ops = onnx_ops(Call(FUNCTIONS[name]))
    assert ops, name
    assert ops - DATA_MOVEMENT_OPS <= EXCEPTIONS.get(name, set()), f"{name} exports to {sorted(ops)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_torch_data_movement_module_exports_to_onnx_data_movement(name):
    ops = onnx_ops(MODULES[name])
    assert ops - DATA_MOVEMENT_OPS == set(), f"{name} exports to {sorted(ops)}"
