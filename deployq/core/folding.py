"""BatchNorm folding, written once for torch tensors and numpy arrays alike.

    y = γ (x − μ) / √(σ² + ε) + β = a·x + b,   a = γ / √(σ² + ε),   b = β − a·μ

and with x = W * z + c (a convolution or linear layer):

    W' = a ⊙ W   (a broadcast along the layer's output-channel axis)
    c' = a·(c − μ) + β

The QAT modules (torch) and the ONNX fold-BN pass (numpy) both call :func:`fold_batchnorm`, so the
folded float32 weights are bit-identical on both sides and their integer codes agree.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


def _sqrt(x: Array) -> Array:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def bn_scale(gamma: Array, var: Array, eps: float) -> Array:
    """a = γ / √(σ² + ε), in the arrays' own precision (float32)."""
    if isinstance(var, np.ndarray):
        eps = np.float32(eps)
    return gamma / _sqrt(var + eps)


def fold_batchnorm(weight: Array, bias: Array | None, gamma: Array, beta: Array, mean: Array,
                   var: Array, eps: float, channel_axis: int) -> tuple[Array, Array]:
    """Folded (W', c') for a layer whose output channels lie along `channel_axis` of `weight`."""
    a = bn_scale(gamma, var, eps)
    shape = [1] * weight.ndim
    shape[channel_axis] = -1
    folded_weight = weight * a.reshape(shape)
    centred = -mean if bias is None else bias - mean
    folded_bias = centred * a + beta
    return folded_weight, folded_bias
