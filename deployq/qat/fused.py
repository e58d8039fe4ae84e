"""QuantLayer: a Conv / ConvTranspose / Linear, with its BatchNorm and activation, as one QAT module.

In ``float`` and ``observe`` mode it runs the original modules one after the other
(act(bn(layer(x)))), bit-identical to the float model. In ``quantize`` mode it runs the layer with
fake-quantized folded weights and a fake-quantized bias:

    W' , c' = fold_batchnorm(W, c, γ, β, μ, σ², ε)          (deployq.core.folding)
    y = act( layer(x, Q_w(W'), Q_b(c')) )

Q_b is the int32 bias integer kernels add to their accumulator, scale s_in·s_w, where s_in is the
scale of the quantizer that feeds this layer (see :func:`deployq.core.qformula.bias_is_quantized`).

While BN is training (model.train() and BN not frozen) the folded weight uses the running
statistics and the output is rescaled so BN can normalize with batch statistics and keep
updating its running estimates (Jacob et al., 2018; torch.ao's ConvBn):

    y = bn( layer(x, Q_w(a ⊙ W)) / a + c )
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deployq.core.folding import bn_scale, fold_batchnorm
from deployq.core.qformula import INT32_QMAX, bias_is_quantized, bias_scale, quantize_bias
from deployq.qat.fake_quant import straight_through
from deployq.qat.quantizers import FakeQuantizer

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def output_channel_axis(layer: nn.Module) -> int:
    """Axis of the weight that indexes output channels: 1 for ConvTranspose, else 0."""
    return 1 if isinstance(layer, TRANSPOSED) else 0


class QuantLayer(nn.Module):
    def __init__(self, layer: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module],
                 weight_quant: Optional[FakeQuantizer]) -> None:
        super().__init__()
        if not isinstance(layer, WEIGHT_LAYERS):
            raise TypeError(f"QuantLayer wraps {', '.join(t.__name__ for t in WEIGHT_LAYERS)}, got {type(layer).__name__}")
        self.layer = layer
        self.bn = bn
        self.act = act
        self.weight_quant = weight_quant  # None: this layer's weight is not quantized
        self.mode = "float"  # set with the quantizers by deployq.qat.calibrate.set_mode
        self.freeze_bn = False
        self.channel_axis = output_channel_axis(layer)
        # The quantizer feeding this layer (its scale sets the bias scale). A plain reference, not
        # a submodule: it is registered where it sits in the graph.
        self.__dict__["input_quant"] = None
        # (state, (Q_w(W'), Q_b(c'))) kept while reuse_deployed is on: see deployed_weight_and_bias
        self.reuse_deployed = False
        self.__dict__["_deployed"] = None

    @property
    def kind(self) -> str:
        parts = [type(self.layer).__name__]
        if self.bn is not None:
            parts.append(type(self.bn).__name__)
        if self.act is not None:
            parts.append(type(self.act).__name__)
        return "+".join(parts)

    def set_input_quantizer(self, quantizer: Optional[FakeQuantizer]) -> None:
        wq = self.weight_quant
        if (quantizer is not None and quantizer.spec.per_channel and wq is not None
                and bias_is_quantized(quantizer.spec.bits, wq.spec.bits)):
            raise ValueError(
                f"{self.weight_quant.name if self.weight_quant else 'layer'}: its input {quantizer.name} is quantized per channel; "
                "the int32 bias needs one input scale (use a per-tensor scheme for that activation)"
            )
        self.__dict__["input_quant"] = quantizer

    # --- the layer's own computation -------------------------------------------------------
    def _run_layer(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(layer, TRANSPOSED):
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.ndim - 2]
            return conv(x, weight, bias, layer.stride, layer.padding, layer.output_padding,
                        layer.groups, layer.dilation)
        return layer._conv_forward(x, weight, bias)

    def fold_factor(self) -> Optional[torch.Tensor]:
        """a = γ / √(σ² + ε) per output channel (γ = 1 without affine): the fold multiplies the
        layer's weight and bias by it, so a method that sets the folded values divides by it.
        None without BatchNorm."""
        if self.bn is None:
            return None
        bn = self.bn
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
        return bn_scale(gamma, bn.running_var, bn.eps)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W', c') of the deployed layer: BatchNorm (eval statistics) folded in, not quantized."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        return fold_batchnorm(w, b, gamma, beta, bn.running_mean, bn.running_var, bn.eps, self.channel_axis)

    def bound_weight_scale(self, bias: Optional[torch.Tensor]) -> None:
        """Keep the int32 bias codes rint(c' / (s_in·s_w)) within range: a channel whose bias is
        large next to its weights (weights near zero, bias near one: a gate initialized to pass
        everything through) needs s_w ≥ |c'| / (s_in·2^30). Without the bound its bias saturates;
        with it that channel's weights round more coarsely, which costs them little since they are
        small. Sets the weight quantizer's ``scale_floor``; everything that reads the weight's
        qparams (forward, export, check) then sees the bounded scale."""
        wq = self.weight_quant
        if wq is None:
            return
        s_in = self._int32_bias_input_scale(bias)
        if s_in is None:
            wq.scale_floor = None
            return
        floor = bias.detach().abs() / (s_in * INT32_QMAX)
        wq.scale_floor = floor if wq.axis is not None else floor.max()

    def _int32_bias_input_scale(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """s_in, where the bias is deployed as int32 codes of scale s_in·s_w; else None."""
        inq, wq = self.input_quant, self.weight_quant
        if (bias is None or inq is None or wq is None or not inq.is_ready()
                or not bias_is_quantized(inq.spec.bits, wq.spec.bits)):
            return None
        return inq.scale_used()

    def quantized_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Q_w(W') with the scale bounded for `bias` (the folded bias it is deployed with)."""
        self.bound_weight_scale(bias)
        return self.weight_quant(weight)

    def quantize_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Fake-quantized int32 bias (scale s_in·s_w), or the float bias where it stays float."""
        s_in = self._int32_bias_input_scale(bias)
        if s_in is None:
            return bias
        s = bias_scale(s_in, self.weight_quant.scale_used())
        return straight_through(quantize_bias(bias.detach(), s) * s, bias)

    def deployed_weight_and_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(Q_w(W'), Q_b(c')): the weight and bias the deployed layer computes with. While
        ``reuse_deployed`` is on and no gradient is taken (the post-training passes, which run the
        same weights through the model batch after batch), they are computed once and reused until
        a tensor they depend on changes: parameters, statistics and qparams of the layer and of the
        quantizer feeding it, all changed in place, so their version counters tell."""
        cached = self.__dict__.get("_deployed")
        reuse = getattr(self, "reuse_deployed", False) and not torch.is_grad_enabled()
        if reuse and cached is not None and cached[0] == self._state():
            return cached[1]
        weight, bias = self.folded_weight_and_bias()
        if self.weight_quant is not None:
            weight = self.quantized_weight(weight, bias)
        deployed = (weight, self.quantize_bias(bias))
        self.__dict__["_deployed"] = (self._state(), deployed) if reuse else None
        return deployed

    def _state(self) -> tuple:
        inq = self.input_quant
        tensors = [*self.parameters(), *self.buffers(), *(() if inq is None else (*inq.parameters(), *inq.buffers()))]
        floor = getattr(self.weight_quant, "scale_floor", None)
        return tuple((t.data_ptr(), t._version) for t in tensors) + (id(floor),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            y = self.layer(x)
            if self.bn is not None:
                y = self.bn(y)
        elif self.bn is not None and self.bn.training and not self.freeze_bn:
            y = self._forward_training_bn(x)
        else:
            y = self._run_layer(x, *self.deployed_weight_and_bias())
        return self.act(y) if self.act is not None else y

    def _forward_training_bn(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        a = bn.weight / std if bn.affine else 1.0 / std
        w_shape = [1] * self.layer.weight.ndim
        w_shape[self.channel_axis] = -1
        weight = self.layer.weight * a.reshape(w_shape)
        if self.weight_quant is not None:  # bounded for the bias it will be deployed with
            weight = self.quantized_weight(weight, self.folded_weight_and_bias()[1])
        y = self._run_layer(x, weight, None)
        y_shape = [1] * y.ndim
        y_shape[1] = -1
        y = y / a.reshape(y_shape)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(y_shape)
        return bn(y)
