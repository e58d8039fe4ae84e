"""Training steps the speed benchmarks time: one step of a model (forward, backward, Adam) on a
fixed batch, for a float model, a deployq QAT model and torch.ao's FX QAT of the same network.
Imports nothing of deployq's export side, so it runs where only torch is (a GPU machine)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from benchmarks import common


def step_fn(net: nn.Module, inputs: torch.Tensor, loss: Callable[[object], torch.Tensor]) -> Callable[[], None]:
    """One training step (forward, backward, Adam) of `net` on `inputs`."""
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-5, fused=True)
    net.train()

    def step() -> None:
        value = loss(net(inputs))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def output_l1(output: object) -> torch.Tensor:
    """A task loss for timing: mean |y| over every output tensor."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return sum(o.abs().mean() for o in outputs)


def torch_ao_step(float_model: nn.Module, example: torch.Tensor, inputs: torch.Tensor) -> Callable[[], None]:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with common.quiet():
        prepared = prepare_qat_fx(copy.deepcopy(float_model).train(), get_default_qat_qconfig_mapping("x86"), (example,))
    return step_fn(prepared, inputs, output_l1)
