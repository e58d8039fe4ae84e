"""The small model the post-training method tests share, and the helpers around it."""

from __future__ import annotations

import torch
from torch import nn

import deployq
from deployq.qat.fused import QuantLayer
from deployq.qat.quantizers import FakeQuantizer

# 4-bit weights over their min/max range (named: at 4 bits the default observer is the MSE search,
# whose clipped ranges are tested on their own), the setting the method tests were sized on
BITS4 = {"weight": {"bits": 4, "observer": "minmax"}}


def tiny_model() -> nn.Module:
    """Conv-BN-ReLU x3 (8 channels, BN with non-trivial statistics), then a Conv without bias."""
    torch.manual_seed(0)
    layers = []
    for cin in (3, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(8, 4, 3, padding=1, bias=False))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def calibrated(batches: list[torch.Tensor], config=None) -> torch.fx.GraphModule:
    """tiny_model prepared under `config` and calibrated on `batches`."""
    qmodel = deployq.prepare(tiny_model(), batches[0], config)
    deployq.calibrate(qmodel, batches, progress=False)
    return qmodel


def modes(model: nn.Module) -> set[str]:
    """The modes of every quantizer and quantized layer (all "quantize" after a method ran)."""
    return {m.mode for m in model.modules() if isinstance(m, (FakeQuantizer, QuantLayer))}
