"""Capture and normalization: models written the way people write them (timm's habits, each a
small model here) place their quant points by what they compute, export, and pass `check`.

Each model below is one failure seen on timm's registry before capture and normalization existed:
a no-op between BatchNorm and its activation, a BatchNorm subclass with its own activation, a no-op
after the classifier, shape-dependent control flow, two layers computing the same thing, and a
forward that reads a layer's weight attributes.
"""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deployq
from deployq.qat.capture import EXPORT, FX, CaptureError
from deployq.qat.fused import QuantLayer
from deployq.qat.prepare import quant_points


class ConvBnIdentityAct(nn.Module):
    """conv -> bn -> nn.Identity (a disabled DropBlock) -> ReLU, as timm's ResNet-D writes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop_block = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.drop_block(self.bn(self.conv(x)))))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that applies its own activation (timm's BatchNormAct2d)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU6()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class ConvBnActSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn1(self.conv(x)))


class FlattenAfterClassifier(nn.Module):
    """``self.flatten(self.fc(x))`` with a Flatten of a tensor already flat (RegNet, RexNet)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(0.0)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        return self.flatten(self.fc(self.head_drop(x)))


class ShapeBranch(nn.Module):
    """Python control flow on a shape (MobileViT's `if new_h != H`): symbolic fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Resizing()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class Resizing(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.shape[-1] % 4 != 0:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return F.relu(self.proj(x))


class TwoIdenticalHeads(nn.Module):
    """A classifier and a distillation head with the same parameters (LeViT in eval)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)
        self.head_dist = nn.Linear(8, 4)
        self.head_dist.load_state_dict(self.head.state_dict())

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


class ReadsWeightAttributes(nn.Module):
    """``self.proj.weight.dtype`` read in forward (EdgeNeXt's positional encoding)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.proj(x.to(self.proj.weight.dtype)))
        return y * torch.ones(1, device=self.proj.weight.device, dtype=self.bn.weight.dtype)


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass that pads itself, then calls the functional conv (timm's Conv2dSame)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PaddedConv(3, 8, 2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """Control flow on values: neither symbolic fx nor torch.export can capture `gate`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.conv(x))))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.mean() > 0.5:
            return self.inner(x)
        return x * 0.5


class ClampsOneTensorThrice(nn.Module):
    """One tensor clamped three times between buffers (the bounds of a normalization before q, k
    and v), and a clamp whose upper bound is infinite (what decomposed RMS norms compute)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv2d(3, 8, 1) for _ in range(3))
        self.register_buffer("lo", torch.tensor(-1.5))
        self.register_buffer("hi", torch.tensor(1.5))

    def forward(self, x):
        def bounded(t):
            return t.clamp(self.lo, self.hi)
        return self.q(bounded(x)) + self.k(bounded(x)) + self.v(bounded(x)) + x.clamp(1e-3, float("inf")).mean(1, keepdim=True)


class WindowAttention(nn.Module):
    """scaled_dot_product_attention on 5-D (batch, heads, windows, tokens, dim) tensors (Hiera)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2).reshape(b, 4, h * w // 4, c)  # 4 windows
        q, k, v = self.qkv(tokens).reshape(b, 4, -1, 3, c).unbind(3)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return out.mean((1, 2, 3))


class FlatHeadAttention(nn.Module):
    """SAM's form: scaled_dot_product_attention on 3-D (batch·heads, tokens, dim) tensors, with a
    3-D additive mask (a relative-position bias)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Linear(8, 16)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (b, 16, 8)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4).reshape(3, b * 2, h * w, c // 2)
        mask = self.bias(tokens).repeat_interleave(2, 0)  # (b·2, 16, 16)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.mean((1, 2))


class SamePaddedMaxPool(nn.Module):
    """TensorFlow's "SAME" max pooling: pad with −inf (asymmetric), then pool (timm's MaxPool2dSame)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        pooled = F.max_pool2d(F.pad(y, (0, 1, 0, 1), value=-float("inf")), 3, 2)
        return self.proj(pooled)


class PooledShortcut(nn.Module):
    """A strided average pool on a shortcut (MaxViT's and CSP nets' downsampling)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.proj(self.pool(torch.relu(self.conv(x))))


def _warm(model, size=16):
    """BatchNorm statistics that are not the identity, eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def _pipeline(model, tmp_path, size=16, **prepare_kwargs):
    """prepare, calibrate, export, check: the quantized model, the export and the parity report."""
    x = torch.randn(1, 3, size, size)
    qmodel = deployq.prepare(model, x, **prepare_kwargs)
    deployq.calibrate(qmodel, [torch.randn(4, 3, size, size) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, x, tmp_path, progress=False)
    parity = deployq.check(qmodel, result.files["int8"], inputs=[torch.randn(2, 3, size, size)])
    assert parity.passed(), parity.verdict()
    return qmodel, result, parity


def _quantized_tensors(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_identity_between_batchnorm_and_activation_does_not_split_the_layer(tmp_path):
    qmodel, result, _ = _pipeline(_warm(ConvBnIdentityAct()), tmp_path)
    points = quant_points(qmodel)
    assert "act" in points and "bn" not in points and "drop_block" not in points
    assert points["act"].members == ("conv", "bn", "act")
    assert not any(n.op_type == "BatchNormalization" for n in result.quant_model.graph.node)


def test_batchnorm_subclass_is_folded_and_follows_train_mode(tmp_path):
    model = _warm(ConvBnActSubclass())
    qmodel, result, _ = _pipeline(model, tmp_path)
    points = quant_points(qmodel)
    layer = qmodel.get_submodule("conv")
    assert isinstance(layer, QuantLayer) and type(layer.bn) is nn.BatchNorm2d
    assert points["bn1.act"].members == ("conv", "bn1", "bn1.act")  # one quant point after the ReLU6
    assert layer.bn.weight is model.bn1.weight or torch.equal(layer.bn.weight, model.bn1.weight)
    assert not any(n.op_type == "BatchNormalization" for n in result.quant_model.graph.node)
    # the BatchNorm is a module again: in train mode it normalizes with batch statistics, as the
    # original does (tracing had fixed `training` to the mode at capture)
    deployq.set_mode(qmodel, "float")
    x = torch.randn(4, 3, 16, 16)
    expected = _warm(ConvBnActSubclass()).train()
    expected.load_state_dict(model.state_dict())
    assert torch.allclose(qmodel.train()(x), expected(x), atol=1e-6)


def test_noop_after_the_classifier_gives_no_identity_output(tmp_path):
    qmodel, result, _ = _pipeline(FlattenAfterClassifier().eval(), tmp_path)
    assert "fc" in quant_points(qmodel)
    assert [o.name for o in result.quant_model.graph.output] == ["fc"]
    assert not any(n.op_type == "Identity" for n in result.float_model.graph.node)


def test_shape_dependent_branch_is_captured_by_torch_export(tmp_path):
    model = _warm(ShapeBranch(), size=18)
    qmodel, result, _ = _pipeline(model, tmp_path, size=18)
    points = quant_points(qmodel)
    assert qmodel.get_submodule("act_quant").capture == EXPORT
    assert any("torch.export" in n for n in qmodel.get_submodule("act_quant").notes)
    # names are still module paths, and layers are modules (weights quantized, BN folded)
    assert {"stem.2", "stem.0.weight", "block.proj.weight", "head.weight"} <= set(points)
    assert isinstance(qmodel.get_submodule("stem.0"), QuantLayer)
    # the batch stays dynamic: calibrated above with batches of 4, checked with 2
    diff = deployq.diff(result.files["float"], result.files["int8"], inputs=[torch.randn(3, 3, 18, 18)])
    assert min(r.stats.sqnr_db for r in diff.rows) > 20


def test_traceable_models_keep_symbolic_fx():
    qmodel = deployq.prepare(ConvBnIdentityAct().eval(), torch.randn(1, 3, 16, 16))
    assert qmodel.get_submodule("act_quant").capture == FX


def test_identical_layers_keep_one_quant_point_each(tmp_path):
    qmodel, result, _ = _pipeline(TwoIdenticalHeads().eval(), tmp_path)
    points = quant_points(qmodel)
    assert {"head", "head_dist", "head.weight", "head_dist.weight"} <= set(points)
    assert {"head", "head_dist"} <= _quantized_tensors(result.quant_model)


def test_reading_a_fused_layers_weight_attributes(tmp_path):
    qmodel, _, _ = _pipeline(_warm(ReadsWeightAttributes()), tmp_path)
    assert isinstance(qmodel.get_submodule("proj"), QuantLayer)


def test_functional_convolution_of_a_conv_subclass_is_a_layer(tmp_path):
    model = _warm(FunctionalConv())
    qmodel, _, _ = _pipeline(model, tmp_path)
    points = quant_points(qmodel)
    assert "conv.weight" in points and points["relu"].members == ("conv", "bn", "relu")
    assert qmodel.get_submodule("conv").layer.weight is not None


def test_class_token_expanded_to_the_batch_is_kept():
    """expand() keeps the shape at the example's batch of 1, not at others: not a no-op."""
    class ClassToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            tokens = self.proj(x)
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            return torch.cat([cls, tokens], 1)

    qmodel = deployq.prepare(ClassToken(), torch.randn(1, 5, 8))
    assert qmodel(torch.randn(3, 5, 8)).shape == (3, 6, 8)


def test_uncapturable_module_is_named_with_the_option_that_keeps_it_whole():
    with pytest.raises(CaptureError) as err:
        deployq.prepare(DataDependent().eval(), torch.randn(1, 3, 8, 8))
    assert err.value.module == "gate"
    assert "--leaf gate" in str(err.value) and "leaf_modules: [gate]" in str(err.value)


def test_a_leaf_module_is_quantized_at_its_boundary_and_said_to_stay_float(tmp_path):
    model = _warm(ShapeBranch(), size=18)
    qmodel, result, _ = _pipeline(model, tmp_path, size=18, config={"leaf_modules": ["block"]})
    points = quant_points(qmodel)
    assert qmodel.get_submodule("act_quant").capture == FX  # a leaf keeps symbolic tracing
    notes = qmodel.get_submodule("act_quant").notes
    assert any("'block'" in n and "1 Conv/Linear layer inside stays float" in n for n in notes)
    # its output is a quant point, the layer after it reads those codes, the layer inside is float
    assert "block" in points and points["head.weight"].input == "block" and "block.proj.weight" not in points
    assert "block" in _quantized_tensors(result.quant_model)


def test_leaf_modules_in_the_config_round_trip():
    from deployq.qat.config import ConfigError, load_config

    config = load_config({"leaf_modules": ["backbone.attn"]})
    assert config.leaf_modules == ("backbone.attn",)
    assert load_config(config.to_dict()) == config
    with pytest.raises(ConfigError, match="leaf_modules"):
        load_config({"leaf_modules": "backbone.attn"})


@pytest.mark.parametrize("model", [ConvBnIdentityAct, ConvBnActSubclass, FunctionalConv])
def test_float_mode_is_the_original_model(model):
    model = _warm(model())
    x = torch.randn(2, 3, 16, 16)
    qmodel = deployq.prepare(model, x[:1])
    np.testing.assert_array_equal(qmodel(x).detach().numpy(), model(x).detach().numpy())


def test_cli_says_how_a_model_was_captured_and_takes_leaf_modules(tmp_path):
    from click.testing import CliRunner

    from deployq.cli import main

    runner = CliRunner()
    args = ["inspect", "--model", "deployq.examples.zoo:freely_written", "--input-shape", "1,3,18,18"]
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "captured with torch.export" in done.output and "bn1.act" in done.output
    done = runner.invoke(main, [*args, "--leaf", "block"])
    assert done.exit_code == 0, done.output
    assert "captured with fx" in done.output and "leaf module 'block'" in done.output
    torch.save(zoo_model().state_dict(), tmp_path / "float.pt")
    done = runner.invoke(main, ["export", "--ckpt", str(tmp_path / "float.pt"), *args[1:], "--leaf", "nope",
                                "--calib", "zeroq", "--out", str(tmp_path / "out")])
    assert done.exit_code == 1 and "leaf module 'nope' is neither" in done.output
    assert not (tmp_path / "out").exists()


def zoo_model():
    from deployq.examples import zoo

    return zoo.freely_written()


class AssertsRank(nn.BatchNorm2d):
    """A BatchNorm subclass that checks its input's rank first (timm's BatchNormAct2d does)."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


def test_a_rank_assertion_does_not_keep_a_layer_from_its_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), AssertsRank(8), nn.SiLU())
    qmodel = deployq.prepare(_warm(model), torch.randn(1, 3, 16, 16))
    points = quant_points(qmodel)
    assert points["1"].members == ("0", "1") and "0" not in points  # one quant point after the BN
    layer = qmodel.get_submodule("0")
    assert isinstance(layer, QuantLayer) and not list(layer.bn.children())


def test_position_indices_built_from_the_input_shape_are_constants():
    """Values computed from parameters and the input's *shape* only (position indices expanded to
    the batch) are folded by the exporter: no quant point, in either capture."""
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 8)
            self.embed = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            n = x.shape[1]
            idx = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
            pos = self.proj(idx).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.head(self.embed(x) + pos)

    points = quant_points(deployq.prepare(Positions(), torch.randn(1, 5, 8)))
    assert {"embed", "add", "head"} <= set(points) and "proj" not in points


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(dim=-1)
        return self.proj(attn @ v)


def test_softmax_output_is_on_the_probability_grid(tmp_path):
    """A softmax output gets the grid [0, 1] (scale 1/255, zero point 0) whatever it saw: onnxruntime's
    fused QLinearSoftmax follows the QDQ graph within 1 LSB there (with a calibrated range on this
    flat attention it does not: 0.1 dB), and a certain attention, p = 1, is not clipped."""
    from deployq.verify.diff import diff

    model = Attention().eval()
    x = torch.randn(1, 64, 8) * 0.3  # 64 tokens, small logits: a flat attention that peaks near 1/64
    qmodel = deployq.prepare(model, x)
    deployq.calibrate(qmodel, [torch.randn(4, 64, 8) * 0.3 for _ in range(3)], progress=False)
    point = quant_points(qmodel)["softmax"]
    assert point.spec.observer == "probability"
    scale, zero_point = qmodel.get_submodule(point.quantizer).qparams()
    assert float(scale) == pytest.approx(1 / 255) and int(zero_point) == 0
    assert float(qmodel.get_submodule(point.quantizer)(torch.ones(1))) == 1.0  # p = 1 stays 1
    result = deployq.export(qmodel, x, tmp_path, progress=False)
    name = result.quant_model.graph.input[0].name
    kernel = diff(result.float_model, result.quant_model, [{name: torch.randn(2, 64, 8).numpy() * 0.3}], mode="kernel",
                  progress=False)
    row, = [r for r in kernel.rows if r.point.name == "softmax"]
    assert row.stats.sqnr_db > 30 and row.stats.lsb[2] == 0  # measured 43 dB, 1.6 % of codes 1 LSB off
    override = deployq.prepare(model, x, {"layers": {"softmax": {"activation": {"observer": "kl"}}}})
    assert quant_points(override)["softmax"].spec.observer == "kl"  # the config still decides


def test_probability_observer_ignores_the_data_range():
    from deployq.qat.observers import OBSERVERS
    from deployq.core.qspec import QuantSpec

    for bits, signed, expected_zp in ((8, False, 0), (8, True, -128), (10, False, 0)):
        observer = OBSERVERS.get("probability")(QuantSpec(bits=bits, signed=signed), None, "p")
        observer.update(torch.rand(100) * 0.05)
        scale, zero_point = observer.qparams()
        assert float(scale) == pytest.approx(1 / (2 ** bits - 1)) and int(zero_point) == expected_zp


def test_clamps_of_one_tensor_keep_their_bounds_and_points(tmp_path):
    """Three equal Clips of one tensor each keep their bound initializers (the exporter's rewrite
    gave them one name; serialized, two Clips lost their bounds), and an open-sided clamp is not
    taken for a quantizer's narrowing Clip."""
    qmodel, result, parity = _pipeline(ClampsOneTensorThrice().eval(), tmp_path)
    points = quant_points(qmodel)
    assert {"clamp", "clamp_1", "clamp_2", "clamp_3"} <= set(points)
    onnx.checker.check_model(result.quant_model, full_check=True)
    clips = [n for n in result.float_model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 4 and len({n.output[0] for n in clips}) == 4


def test_attention_on_five_dimensional_windows_exports(tmp_path):
    model = WindowAttention().eval()
    qmodel, result, _ = _pipeline(model, tmp_path)
    assert any(n.op_type == "Softmax" for n in result.float_model.graph.node)


def test_attention_on_three_dimensional_heads_with_a_mask_exports(tmp_path):
    """torch.onnx translates 4-D attention only: the 3-D call (and its mask) runs on 4-D views."""
    qmodel, result, _ = _pipeline(FlatHeadAttention().eval(), tmp_path, size=4)
    assert any(n.op_type == "Softmax" for n in result.float_model.graph.node)


def test_minus_infinity_padding_before_a_max_pool_carries_its_input_quantization(tmp_path):
    """The −inf border never reaches a pool's output: no quant point of its own (an observer there
    saw −inf and refused to calibrate), the pool's output keeps the ReLU's codes."""
    qmodel, result, _ = _pipeline(SamePaddedMaxPool().eval(), tmp_path)
    points = quant_points(qmodel)
    assert "pad" not in points and "max_pool2d" not in points and "relu" in points
    assert "Pad" in [n.op_type for n in result.quant_model.graph.node]


def test_an_average_pool_is_quantized_on_its_inputs_grid(tmp_path):
    """One quantizer for the pool's input and output: the same scale and zero point in the QDQ
    model (what TFLite and NNAPI require of an int8 average pool), one set of qparams in the
    state, and the observer's range covers both tensors (a range of its own, seen on calibration
    data only, clipped held-out values)."""
    qmodel, result, _ = _pipeline(PooledShortcut().eval(), tmp_path)
    points = quant_points(qmodel)
    shared, source = qmodel.get_submodule(points["pool"].quantizer), qmodel.get_submodule(points["relu"].quantizer)
    assert shared.source is source
    assert all(torch.equal(a, b) for a, b in zip(shared.qparams(), source.qparams()))
    assert not any(k.startswith("act_quant.pool.") for k in qmodel.state_dict())
    records = result.records
    assert (records["pool"].scale, records["pool"].zero_point) == (records["relu"].scale, records["relu"].zero_point)


class _PReLUPool(torch.nn.Module):
    """MTCNN's block: conv -> PReLU -> max pool -> conv (the PReLU output read by the pool only),
    the pool a module or a function call."""

    def __init__(self, functional=False):
        super().__init__()
        self.conv1, self.act, self.conv2 = torch.nn.Conv2d(3, 8, 3), torch.nn.PReLU(8, init=0.25), torch.nn.Conv2d(8, 4, 3)
        self.pool = (lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 0, 1, True)) if functional else \
            torch.nn.MaxPool2d(3, 2, ceil_mode=True)

    def forward(self, x):
        return self.conv2(self.pool(self.act(self.conv1(x))))


@pytest.mark.parametrize("functional", [False, True])
def test_a_point_read_only_by_a_max_pool_takes_the_pools_range_and_stays_exact(tmp_path, functional):
    """The PReLU output, read by a max pool alone, is calibrated on what the pool keeps (as a
    quantizer after the pool would be): its range is the pool output's, narrower where the pool
    drops negatives, and the int8 model still checks within 1 LSB (max commutes with rounding)."""
    import deployq
    from deployq.qat.prepare import quant_points

    torch.manual_seed(0)
    model = _PReLUPool(functional).eval()
    calib = [torch.randn(2, 3, 20, 20) for _ in range(4)]
    qmodel = deployq.prepare(model, calib[0])
    (point,) = [p for name, p in quant_points(qmodel).items() if name == "act"]
    deployq.calibrate(qmodel, calib, progress=False)
    with torch.no_grad():
        pre = torch.cat([model.act(model.conv1(x)) for x in calib])
        post = torch.cat([model.pool(model.act(model.conv1(x))) for x in calib])
    scale, zero_point = (t.item() for t in qmodel.get_submodule(point.quantizer).qparams())
    lo, hi = (0 - zero_point) * scale, (255 - zero_point) * scale  # u8 activations
    assert post.min() > pre.min() + 0.1  # the pool discards the most negative values
    assert lo == pytest.approx(min(float(post.min()), 0.0), abs=scale) and hi == pytest.approx(float(post.max()), abs=scale)
    result = deployq.export(qmodel, calib[0], tmp_path, ort_format=False)
    assert deployq.check(qmodel, result.files["int8"], inputs=[torch.randn(2, 3, 20, 20) * 1.5]).ok(max_lsb=1)


class _PositionEncoded(torch.nn.Module):
    """A position encoding computed from the input's shape alone and projected by a Conv (XCiT's
    token projection, Swin V2's coordinate MLP), added to the features."""

    def __init__(self):
        super().__init__()
        self.stem, self.proj, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(2, 8, 1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        ys = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1).expand(1, 1, h, w) / h
        xs = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w).expand(1, 1, h, w) / w
        return self.head(self.stem(x) + self.proj(torch.cat([ys, xs], 1)))


class _Rolled(torch.nn.Module):
    """Swin's shifted window: a quant point rolled (Slice + Concat in ONNX) before the next layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(torch.relu(self.a(x)), shifts=(2, -3), dims=(2, 3)))


@pytest.mark.parametrize("model", [_PositionEncoded, _Rolled])
def test_layers_on_shape_only_values_stay_float_and_rolled_points_keep_their_grid(model, tmp_path):
    """A layer fed by the input's shape only computes a constant: it stays a float module, as the
    exporter folds it (no weight quant point, nothing missing in ONNX); a roll of a quant point
    carries its grid through the Slice + Concat it exports as. Both export and check within 1 LSB."""
    import deployq
    from deployq.qat.prepare import quant_points

    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 16)
    qmodel = deployq.prepare(model().eval(), x)
    points = quant_points(qmodel)
    assert "proj.weight" not in points and "proj" not in points
    deployq.calibrate(qmodel, [torch.rand(2, 3, 12, 16) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, x, tmp_path, ort_format=False)
    assert deployq.check(qmodel, result.files["int8"], inputs=[torch.rand(1, 3, 12, 16)]).ok(max_lsb=1)
    if model is _Rolled:  # the layer after the roll reads the first layer's codes: an integer kernel
        records = {r.name: r for r in result.records.values()}
        assert records["b.weight"].input == "relu" and records["relu"].kind == "activation"
        # 16-bit codes are not carried through data movement (left float): the layer's input is
        # still found back through the Concat
        wide = deployq.export(model().eval(), x, tmp_path / "int16", target="int16", ort_format=False,
                              calib=[torch.rand(2, 3, 12, 16) for _ in range(3)])
        assert {r.name: r for r in wide.records.values()}["b.weight"].input == "relu"


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: x + scale * (pool(norm(x)) - norm(x)), after a stem Conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8)
        self.pool, self.head = nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(x)
        return self.head(x + self.scale * (self.pool(y) - y))


class HandWrittenLayerNorm(nn.Module):
    """A channel LayerNorm written out: (x - mean) / sqrt(var + eps), then an affine Conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        centered = x - x.mean(1, keepdim=True)
        var = centered.pow(2).mean(1, keepdim=True)
        return self.head(centered / torch.sqrt(var + 1e-5))


def _output_sqnr(model, qmodel, inputs):
    with torch.no_grad():
        ref = torch.cat([model(x) for x in inputs])
        out = torch.cat([qmodel(x) for x in inputs])
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def test_a_tensor_only_float_ops_read_stays_float_and_that_is_more_accurate(tmp_path):
    """GroupNorm's output is read by an average pool and a subtraction, neither an integer kernel:
    no quant point there (nor on the pool), the difference is quantized where the layer scale
    reads it. Rounding norm(x) before pool(y) - y cancels most of its signal, so the float
    placement is measurably more accurate than quantizing every op (`quantize_float_ops`)."""
    torch.manual_seed(0)
    model = PoolMixer().eval()
    qmodel, result, _ = _pipeline(model, tmp_path / "float")
    points = quant_points(qmodel)
    assert "norm" not in points and "pool" not in points and "sub" in points
    tensors = _quantized_tensors(result.quant_model)
    assert "norm" not in tensors and "pool" not in tensors and "sub" in tensors
    every, _, _ = _pipeline(model, tmp_path / "every", config={"quantize_float_ops": True})
    assert {"norm", "pool", "sub"} <= set(quant_points(every))
    held_out = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    assert _output_sqnr(model, qmodel, held_out) > _output_sqnr(model, every, held_out) + 1.5  # measured +2.4 dB


def test_a_hand_written_layer_norm_is_computed_in_float_where_a_rule_does_not_ask_otherwise(tmp_path):
    """(x - mean) / sqrt(var): the mean, the centered tensor and its square are read by float ops
    only, so they stay float; the variance is read by `var + eps`, an add (an integer kernel), and
    keeps its point, as do the add and the quotient the Conv reads. A config rule that gives
    the centered tensor activation settings puts a quant point there after all."""
    torch.manual_seed(0)
    qmodel, result, _ = _pipeline(HandWrittenLayerNorm().eval(), tmp_path / "a")
    points = quant_points(qmodel)
    assert not {"mean", "sub", "pow", "sqrt"} & set(points) and {"mean_1", "add", "truediv"} <= set(points)
    asked, _, _ = _pipeline(HandWrittenLayerNorm().eval(), tmp_path / "b", config={"layers": {"sub": {"activation": 10}}})
    assert quant_points(asked)["sub"].spec.bits == 10


class GatedReLU6(nn.Module):
    """ReXNet's block end: a squeeze-excitation gate multiplies the features, then ReLU6."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.ReLU6()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return self.head(self.act(x * gate))


def test_an_activation_after_a_multiply_is_one_quant_point_and_the_multiply_runs_as_an_integer_kernel(tmp_path):
    """relu6(x * gate) is rounded once, after the ReLU6 (as relu(a + b) is): the product is not
    a quant point of its own, and onnxruntime absorbs the Clip into an integer multiply."""
    import onnxruntime as ort

    qmodel, result, _ = _pipeline(GatedReLU6().eval(), tmp_path)
    points = quant_points(qmodel)
    assert "mul" not in points and points["act"].members == ("mul",)
    assert "mul" not in _quantized_tensors(result.quant_model) and "act" in _quantized_tensors(result.quant_model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.files["int8"]), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearMul" in ops and "Clip" not in ops and "Mul" not in ops


def test_quantize_outputs_false_leaves_the_layer_that_makes_the_output_float(tmp_path):
    """With `quantize_outputs: false` the last Linear keeps its quantized weight but not its output
    quant point (NNCF's default): the export has no QuantizeLinear on the model output, check
    still passes, and the output is closer to float (its rounding is gone)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    rounded, _, _ = _pipeline(model, tmp_path / "a")
    kept, result, _ = _pipeline(model, tmp_path / "b", config={"quantize_outputs": False})
    assert "4" in quant_points(rounded) and "4" not in quant_points(kept) and "4.weight" in quant_points(kept)
    output = result.quant_model.graph.output[0].name
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] == output for n in result.quant_model.graph.node)
    held_out = [torch.rand(4, 3, 16, 16) for _ in range(3)]
    assert _output_sqnr(model, kept, held_out) > _output_sqnr(model, rounded, held_out) + 1.0
    from deployq.qat.config import load_config

    assert load_config({"quantize_outputs": False}).to_dict()["quantize_outputs"] is False


def test_quantize_before_sloped_false_leaves_a_layer_read_only_by_prelu_float(tmp_path):
    """With `quantize_before_sloped: false` a Conv whose output only a PReLU or a LeakyReLU reads
    keeps that output float (NNCF's placement on MTCNN): its weight and the PReLU's output stay
    quantized, a Conv read by a Conv keeps its point, check still passes, and the output is closer
    to float (one rounding less per layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.1),
                          nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)).eval()
    rounded, _, _ = _pipeline(model, tmp_path / "a")
    kept, result, _ = _pipeline(model, tmp_path / "b", config={"quantize_before_sloped": False})
    assert {"0", "2", "4"} <= set(quant_points(rounded))
    assert not {"0", "2"} & set(quant_points(kept)) and {"0.weight", "1", "3", "4", "5.weight"} <= set(quant_points(kept))
    assert not {"0", "2"} & _quantized_tensors(result.quant_model)
    held_out = [torch.randn(4, 3, 16, 16) for _ in range(3)]  # as calibrated
    assert _output_sqnr(model, kept, held_out) > _output_sqnr(model, rounded, held_out) + 0.25  # measured +0.54 dB
    from deployq.qat.config import load_config

    assert load_config({"quantize_before_sloped": False}).to_dict()["quantize_before_sloped"] is False
