"""prepare(): tracing, de-duplication, fusion, quant points, modes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deployq
from deployq.examples import zoo
from deployq.qat.fused import QuantLayer
from deployq.qat.prepare import quant_points
from deployq.qat.trace import TraceError


@pytest.mark.parametrize("name", sorted(zoo.FACTORIES))
def test_float_mode_is_bit_identical_to_the_original(name):
    factory, shape = zoo.FACTORIES[name]
    model = factory()
    x = torch.randn(*shape)
    qmodel = deployq.prepare(model, x)
    assert torch.equal(qmodel(x), model(x))
    model.train(), qmodel.train()
    assert torch.equal(qmodel(x), model(x))  # BN in training mode too


def test_prepare_leaves_the_input_model_alone():
    model = zoo.resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = deployq.prepare(model, torch.randn(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.randn(2, 3, 16, 16)], progress=False)
    qmodel.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_reused_modules_get_a_name_and_quantizer_per_call_site():
    qmodel = deployq.prepare(zoo.reused(), torch.randn(1, 3, 16, 16))
    points = quant_points(qmodel)
    assert [n for n in points if n.startswith("lrelu")] == ["lrelu", "lrelu_dup1", "lrelu_dup2", "lrelu_dup3"]
    assert "shared.weight" in points and "shared_dup1.weight" in points
    a, b = qmodel.get_submodule("shared").layer, qmodel.get_submodule("shared_dup1").layer
    assert a.weight is b.weight  # the copy shares the parameters: same model, own quantizer
    assert qmodel.get_submodule("act_quant.lrelu") is not qmodel.get_submodule("act_quant.lrelu_dup1")


def test_a_model_output_is_quantized_only_where_a_layer_makes_it():
    """After pooling (a classifier's features), an add or a resize, rounding the output adds error
    and saves nothing; a Conv / Linear output keeps its quant point (integer kernels make it)."""
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            pooled = F.adaptive_avg_pool2d(y, 1).flatten(1)
            return self.fc(pooled), pooled, y + 1

    points = quant_points(deployq.prepare(Heads(), torch.randn(1, 3, 8, 8)))
    assert {"fc", "adaptive_avg_pool2d", "relu"} <= set(points)  # pooled also feeds fc: quantized
    assert "add" not in points  # y + 1 is an output only


def test_structures_have_the_expected_quant_points():
    def names(factory, shape):
        return list(quant_points(deployq.prepare(factory(), torch.randn(*shape))))

    unet = names(zoo.unet, (1, 3, 16, 16))
    assert {"x", "enc1.2", "up.weight", "up", "cat", "dec.0.weight", "dec.1", "out"} <= set(unet)
    assert "pool" not in unet  # max-pool carries quantization
    res = names(zoo.resnet, (1, 3, 16, 16))
    assert {"blocks.0.bn2", "blocks.0.relu_1"} <= set(res)
    assert "blocks.0.add" not in res  # relu(x + f(x)): one quant point, after the ReLU
    points = quant_points(deployq.prepare(zoo.resnet(), torch.randn(1, 3, 16, 16)))
    assert points["blocks.0.relu_1"].members == ("blocks.0.add",)
    ca = names(zoo.channel_attention, (1, 3, 16, 16))
    assert {"ca.pool", "ca.relu", "ca.sigmoid", "ca.mul"} <= set(ca)
    s2d = names(zoo.space_to_depth, (1, 1, 16, 16))
    assert s2d == ["x", "conv1.weight", "relu", "conv2.weight", "relu_dup1", "out.weight", "out"]
    cnn = names(zoo.plain_cnn, (1, 3, 16, 16))
    assert {"relu", "fc.weight", "fc", "adaptive_avg_pool2d"} <= set(cnn)


def test_weight_points_know_the_quant_point_that_feeds_them():
    points = quant_points(deployq.prepare(zoo.unet(), torch.randn(1, 3, 16, 16)))
    assert points["enc2.0.weight"].input == "enc1.2"  # through the max-pool
    assert points["dec.0.weight"].input == "cat"
    assert points["enc1.0.weight"].input == "x"


def test_leaky_relu_fuses_only_when_configured():
    plain = quant_points(deployq.prepare(zoo.unet(), torch.randn(1, 3, 16, 16)))
    assert "dec.0" in plain and "dec.1" in plain
    fused = quant_points(deployq.prepare(zoo.unet(), torch.randn(1, 3, 16, 16),
                                         {"fuse_activations": ["relu", "leaky_relu"]}))
    assert "dec.0" not in fused and fused["dec.1"].op == "Conv2d+LeakyReLU"


def test_fused_conv_bn_equals_conv_then_bn():
    model = zoo.plain_cnn()
    qmodel = deployq.prepare(model, torch.randn(1, 3, 16, 16))
    layer = qmodel.get_submodule("block2.0")
    assert isinstance(layer, QuantLayer) and layer.kind == "Conv2d+BatchNorm2d+ReLU"
    x = torch.randn(4, 8, 8, 8)
    conv, bn = model.block2[0], model.block2[1]
    assert torch.equal(layer(x), F.relu(bn(conv(x))))  # float mode
    w, b = layer.folded_weight_and_bias()
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_bn_statistics_update_in_qat_and_freeze_on_request():
    qmodel = deployq.prepare(zoo.plain_cnn(), torch.randn(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.randn(4, 3, 16, 16)], progress=False)
    bn = qmodel.get_submodule("block1.0").bn
    qmodel.train()
    before = bn.running_mean.clone()
    qmodel(torch.randn(4, 3, 16, 16) + 1)
    assert not torch.equal(bn.running_mean, before)
    deployq.freeze_bn_stats(qmodel)
    frozen = bn.running_mean.clone()
    qmodel(torch.randn(4, 3, 16, 16) + 1)
    assert torch.equal(bn.running_mean, frozen)


def test_qat_step_sends_gradients_to_weights_and_learned_scales():
    config = {"weight": {"quantizer": "lsq"}, "activation": {"quantizer": "lsq+"}}
    qmodel = deployq.prepare(zoo.unet(), torch.randn(1, 3, 16, 16), config)
    deployq.calibrate(qmodel, [torch.randn(2, 3, 16, 16) for _ in range(3)], progress=False)
    qmodel.train()
    qmodel(torch.randn(2, 3, 16, 16)).square().mean().backward()
    assert qmodel.get_submodule("out").layer.weight.grad.abs().sum() > 0
    assert qmodel.get_submodule("act_quant.cat").log_scale.grad.abs() > 0
    assert qmodel.get_submodule("out.weight_quant").log_scale.grad.abs().sum() > 0


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


class HasBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Branchy()
        self.out = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.out(self.gate(self.conv(x)))


def test_trace_failure_names_the_module_and_the_fix():
    with pytest.raises(TraceError, match=r"(?s)'gate' \(Branchy\).*leaf_modules=\['gate'\]"):
        deployq.prepare(HasBranchy(), torch.randn(1, 3, 4, 4))
    qmodel = deployq.prepare(HasBranchy(), torch.randn(1, 3, 4, 4), leaf_modules=["gate"])
    assert "gate" in quant_points(qmodel)


def test_bad_example_inputs_are_reported(capfd):
    with pytest.raises(ValueError, match=r"shape \[\(1, 5, 16, 16\)\] failed at 'enc1_0' .*channels"):
        deployq.prepare(zoo.unet(), torch.randn(1, 5, 16, 16))
    assert "Traceback" not in capfd.readouterr().err  # the message says it all, no torch traceback first


def test_set_mode_rejects_unknown_modes():
    qmodel = deployq.prepare(zoo.reused(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="float, observe, quantize"):
        deployq.set_mode(qmodel, "int8")


def test_empty_calibration_set_is_an_error():
    qmodel = deployq.prepare(zoo.reused(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="calibration set is empty"):
        deployq.calibrate(qmodel, [], progress=False)


def test_an_add_before_a_fused_activation_is_quantized_once_after_it():
    """relu(a + b) gets one quant point (the sum is not rounded on its own); with ReLU not fused,
    or when the sum has another reader, the add keeps its own."""
    class Residual(torch.nn.Module):
        def __init__(self, also_return_sum=False):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Conv2d(3, 3, 1)
            self.also = also_return_sum

        def forward(self, x):
            s = self.conv(x) + x
            y = self.head(torch.relu(s))
            return (y, self.head(s)) if self.also else y

    x = torch.randn(1, 3, 8, 8)
    assert list(quant_points(deployq.prepare(Residual(), x))) == ["x", "conv.weight", "conv", "relu", "head.weight", "head"]
    unfused = {"fuse_activations": ["relu6"]}
    assert "add" in quant_points(deployq.prepare(Residual(), x, unfused))
    assert "add" in quant_points(deployq.prepare(Residual(also_return_sum=True), x))
    qmodel = deployq.prepare(Residual(), x)
    deployq.calibrate(qmodel, [torch.randn(2, 3, 8, 8)], progress=False)
    relu = qmodel.get_submodule("act_quant.relu")
    seen = []
    relu.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        qmodel(x)
    steps = (seen[0] / relu.qparams()[0]).numpy()
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-4)  # the sum goes on the relu's grid


class _SkipJoin(torch.nn.Module):
    """A 10-bit skip (the input) joined to an 8-bit path, then a layer: a U-Net decoder's concat."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.out = torch.nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.down(x)), x], 1))


def test_a_concatenation_is_as_wide_as_the_widest_tensor_it_joins():
    """The concat of a 10-bit input and an 8-bit layer output gets 10 bits (8 would throw away what
    the skip kept); a rule naming the concat, or ``concat_keeps_bits: false``, sets it as asked."""
    x = torch.randn(1, 3, 8, 8)
    base = {"input": 10}
    bits = lambda config: {n: p.bits for n, p in quant_points(deployq.prepare(_SkipJoin(), x, config)).items()}
    assert bits(base)["cat"] == 10 and bits(base)["relu"] == 8
    assert bits({**base, "concat_keeps_bits": False})["cat"] == 8
    assert bits({**base, "layers": {"cat": {"activation": {"bits": 6}}}})["cat"] == 6
    assert bits({**base, "layers": {"cat": {"activation": {"observer": "mse"}}}})["cat"] == 10  # no width set there
    assert bits({})["cat"] == 8  # nothing wider joined: the default


def test_a_wide_concatenation_keeps_the_skips_precision():
    """What the rule is for: the skip's values after the concat are as close to the input as its own
    10-bit grid allows (8 bits: 4x the step, 16x the squared error)."""
    torch.manual_seed(0)
    model, x = _SkipJoin().eval(), torch.randn(16, 3, 8, 8)
    errors = {}
    for keep in (True, False):
        qmodel = deployq.prepare(model, x[:1], {"input": 10, "concat_keeps_bits": keep,
                                               "activation": {"observer": "minmax"}})
        deployq.calibrate(qmodel, [x], progress=False)
        seen = []
        qmodel.get_submodule("act_quant.cat").register_forward_hook(lambda m, args, out: seen.append(out))
        with torch.no_grad():
            qmodel(x)
        errors[keep] = float((seen[0][:, 3:] - x).pow(2).mean())
    assert errors[True] < errors[False] / 8
