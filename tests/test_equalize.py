"""Cross-layer equalization (deployq.ptq.equalize): the function is unchanged, ranges become equal."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deployq
from deployq.examples.torchvision_models import import_torchvision
from deployq.ptq.equalize import EqualizeError, equalize

models = import_torchvision().models  # tolerates the CPU torch / CUDA torchvision operator mismatch


def randomize_bn(model):
    """Uneven BN statistics and affine parameters, so that channel ranges differ a lot."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.copy_(torch.exp(torch.randn(n)))
                m.weight.copy_(torch.exp(torch.randn(n)) * torch.sign(torch.randn(n)))
                m.bias.normal_(0, 0.5)
    return model.eval()


def names(model):
    return [n for n, _ in model.named_modules()]


def assert_same_output(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4 * float(ya.abs().max()))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_resnet18_function_and_paths_unchanged(x):
    torch.manual_seed(0)
    model = randomize_bn(models.resnet18(weights=None))
    saved = state(model)
    eq, report = equalize(model, x)
    assert_state_equal(model, saved)  # the input model is not modified
    assert names(eq) == names(model)
    assert_same_output(model, eq, x)
    # the conv1 -> bn1 -> relu -> conv2 pair of each of the 8 BasicBlocks (the block's relu is called twice)
    assert sorted(p.first for p in report.pairs) == sorted(f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1))
    assert all(p.second == p.first.replace("conv1", "conv2") and p.activation == "relu" for p in report.pairs)
    assert all(p.range_ratio_after < 1.01 < p.range_ratio_before for p in report.pairs)
    assert report.absorbed_bias == 0
    assert not torch.equal(eq.layer1[0].conv2.weight, model.layer1[0].conv2.weight)


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return randomize_bn(models.mobilenet_v2(weights=None))


def test_mobilenet_v2_relu6_skip(mobilenet, x):
    eq, report = equalize(mobilenet, x)
    assert names(eq) == names(mobilenet)
    assert_same_output(mobilenet, eq, x)
    assert report.pairs and all(p.activation == "identity" for p in report.pairs)
    # the projection (conv, BN) of a block feeds the next block's expansion when neither has a residual
    assert [(p.first, p.second) for p in report.pairs] == [("features.1.conv.1", "features.2.conv.0.0"),
                                                            ("features.17.conv.2", "features.18.0")]
    reasons = dict(report.skipped)
    assert "relu6='skip'" in reasons["features.1.conv.0.0"]
    assert "users" in reasons["features.2.conv.2"]  # block 2's output also feeds block 3's residual add


def test_mobilenet_v2_relu6_to_relu(mobilenet, x):
    saved = state(mobilenet)
    eq, report = equalize(mobilenet, x, relu6="relu")
    assert_state_equal(mobilenet, saved)
    assert names(eq) == names(mobilenet)
    replaced = {n for n, m in eq.named_modules()
                if isinstance(m, nn.ReLU) and isinstance(mobilenet.get_submodule(n), nn.ReLU6)}
    assert len(replaced) == 34  # two per inverted-residual block with expansion, one for features.0 and features.1
    assert isinstance(eq.features[18][2], nn.ReLU6)  # before the pooling: not part of a pair
    assert {"relu6->relu", "identity"} == {p.activation for p in report.pairs}
    reference = copy.deepcopy(mobilenet)
    for n in replaced:
        parent, _, leaf = n.rpartition(".")
        reference.get_submodule(parent).add_module(leaf, nn.ReLU())
    assert_same_output(reference, eq, x)
    assert all(p.range_ratio_after < 1.05 for p in report.pairs)


class ConvBnReluConv(nn.Module):
    def __init__(self, padding=1, k2=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=padding)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 4, k2, padding=padding if k2 > 1 else 0)

    def forward(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))


class ConvReluDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)

    def forward(self, x):
        return self.dw(F.relu(self.conv(x)))


def spread(model):
    """Very different channel ranges: channel i of layer 1's weight scaled by 10^k."""
    with torch.no_grad():
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.weight.mul_(torch.logspace(-2, 2, first.out_channels).reshape(-1, 1, 1, 1))
    return model


def numpy_ranges(w1, w2, bn=None, depthwise=False):
    """r1_i (BN folded) and r2_i, in numpy."""
    w1 = w1.detach().numpy().astype(np.float64)
    if bn is not None:
        a = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
        w1 = w1 * a.reshape(-1, 1, 1, 1)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
    w2 = np.abs(w2.detach().numpy().astype(np.float64))
    r2 = w2.reshape(w2.shape[0], -1).max(1) if depthwise else w2.transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
    return r1, r2


def test_conv_bn_relu_conv_ranges_become_equal(x):
    model = randomize_bn(spread(ConvBnReluConv()))
    r1, r2 = numpy_ranges(model.conv1.weight, model.conv2.weight, model.bn)
    eq, report = equalize(model, x)
    after1, after2 = numpy_ranges(eq.conv1.weight, eq.conv2.weight, eq.bn)
    np.testing.assert_allclose(after1, np.sqrt(r1 * r2), rtol=1e-5)
    np.testing.assert_allclose(after2, np.sqrt(r1 * r2), rtol=1e-5)
    assert torch.equal(eq.conv1.weight, model.conv1.weight)  # the scale went into BN's gamma and beta
    torch.testing.assert_close(eq.bn.running_var, model.bn.running_var)
    assert [(p.first, p.second, p.activation) for p in report.pairs] == [("conv1", "conv2", "relu")]
    (pair,) = report.pairs
    assert pair.range_ratio_before == pytest.approx(np.median(np.maximum(r1, r2) / np.minimum(r1, r2)), rel=1e-6)
    assert pair.range_ratio_after == pytest.approx(1.0, abs=1e-5)
    assert_same_output(model, eq, x)


def test_conv_relu_depthwise_ranges_become_equal(x):
    model = spread(ConvReluDepthwise()).eval()
    r1, r2 = numpy_ranges(model.conv.weight, model.dw.weight, depthwise=True)
    eq, report = equalize(model, x)
    after1, after2 = numpy_ranges(eq.conv.weight, eq.dw.weight, depthwise=True)
    np.testing.assert_allclose(after1, np.sqrt(r1 * r2), rtol=1e-5)
    np.testing.assert_allclose(after2, np.sqrt(r1 * r2), rtol=1e-5)
    s = np.sqrt(r1 / r2)
    np.testing.assert_allclose(eq.conv.bias.detach().numpy(), model.conv.bias.detach().numpy() / s, rtol=1e-5)
    assert [(p.first, p.second, p.activation) for p in report.pairs] == [("conv", "dw", "relu")]
    assert_same_output(model, eq, x)


def test_zero_channel_keeps_scale_one(x):
    model = ConvReluDepthwise().eval()
    with torch.no_grad():
        model.dw.weight[2].zero_()
    eq, _ = equalize(model, x)
    assert torch.equal(eq.conv.weight[2], model.conv.weight[2])
    assert torch.isfinite(eq.conv.weight).all() and torch.isfinite(eq.dw.weight).all()


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.fc3(self.act(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def test_linear_chain_converges_over_iterations():
    model = randomize_bn(Chain())
    x = torch.randn(5, 8)
    ratios = {}
    for iterations in (1, 4):
        eq, report = equalize(model, x, iterations=iterations)
        found = [(p.first, p.second, p.activation) for p in report.pairs]
        assert found == [("fc1", "fc2", "relu"), ("fc2", "fc3", "leaky_relu")]
        assert_same_output(model, eq, x)
        ratios[iterations] = report.pairs[0].range_ratio_after
    assert ratios[4] < ratios[1]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.act6 = nn.ReLU6()

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = self.conv2(y) + y
        return self.conv4(self.act6(self.conv3(y)))


def test_residual_and_relu6_pairs_are_skipped(x):
    model = spread(Residual()).eval()
    saved = state(model)
    eq, report = equalize(model, x)
    assert report.pairs == ()
    reasons = dict(report.skipped)
    assert "2 users" in reasons["conv1"]
    assert "ReLU6" in reasons["conv3"] and "relu6='skip'" in reasons["conv3"]
    assert_state_equal(eq, saved)
    _, report = equalize(model, x, relu6="relu")
    assert [(p.first, p.activation) for p in report.pairs] == [("conv3", "relu6->relu")]


class Pair(nn.Module):
    def __init__(self, act, groups=1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=groups)
        self.act = act

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


@pytest.mark.parametrize("act, groups, relu6, reason", [
    (nn.Hardtanh(0.0, 6.0), 1, "relu", "Hardtanh"),
    (F.relu6, 1, "relu", "function call"),
    (nn.ReLU(), 2, "skip", "grouped convolution"),
    (nn.Sigmoid(), 1, "skip", "Sigmoid 'act' before 'conv2' is not supported"),
])
def test_unsupported_pairs_are_skipped_with_a_reason(act, groups, relu6, reason, x):
    model = Pair(act, groups).eval()
    eq, report = equalize(model, x, relu6=relu6)
    assert report.pairs == ()
    assert report.skipped[0][0] == "conv1" and reason in report.skipped[0][1]
    assert_state_equal(eq, model.state_dict())


def test_a_pipeline_whose_cle_changes_nothing_says_so_and_why(x):
    from deployq.ptq.pipeline import PTQOptions, equalized

    model = Pair(nn.Sigmoid()).eval()
    same, notes = equalized(model, (x,), PTQOptions(("cle",)))
    assert same is model and len(notes) == 1
    assert notes[0].startswith("cle changed nothing") and "Sigmoid 'act' before 'conv2' is not supported" in notes[0]
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)).eval()
    _, notes = equalized(pooled, (x,), PTQOptions(("cle",)))  # no reason recorded: the note gives CLE's rule
    assert notes == ["cle changed nothing: no layer pair can be equalized (it rescales pairs of layers joined only "
                     "by BatchNorm and ReLU or LeakyReLU; this model has none)"]
    _, notes = equalized(spread(ConvBnReluConv()).eval(), (x,), PTQOptions(("cle",)))
    assert notes[0].startswith("cle: 1 layer pairs equalized")


def test_absorb_bias_shrinks_range_and_keeps_output():
    torch.manual_seed(0)
    model = ConvBnReluConv(padding=0, k2=1).eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.0)
        model.bn.bias.copy_(torch.linspace(-1.0, 20.0, 6))  # large positive beta for most channels
    x = torch.randn(2, 3, 16, 16)
    eq0, plain = equalize(model, x)
    eq, report = equalize(model, x, absorb_bias=True)
    assert plain.absorbed_bias == 0
    c = torch.clamp(eq0.bn.bias - 3 * eq0.bn.weight.abs(), min=0).detach()
    assert report.absorbed_bias == int((c > 0).sum()) >= 4
    torch.testing.assert_close(eq.bn.bias, eq0.bn.bias - c)
    assert (eq.bn.bias <= eq0.bn.bias).all() and (eq.bn.bias < eq0.bn.bias).sum() == report.absorbed_bias
    with torch.no_grad():  # exact where no pre-activation falls below c
        pre = eq0.bn(eq0.conv1(x))
        c4 = c.reshape(1, -1, 1, 1)
        assert ((pre >= c4) | (c4 == 0)).all()
        assert eq.relu(eq.bn(eq.conv1(x))).amax() < eq0.relu(pre).amax()
    assert_same_output(model, eq, x)


def test_absorb_bias_creates_missing_bias():
    model = ConvBnReluConv(padding=0, k2=1).eval()
    model.conv2 = nn.Conv2d(6, 4, 1, bias=False)
    with torch.no_grad():
        model.bn.bias.fill_(30.0)
    x = torch.randn(1, 3, 8, 8)
    eq, report = equalize(model, x, absorb_bias=True)
    assert report.absorbed_bias == 6 and eq.conv2.bias is not None and model.conv2.bias is None
    assert_same_output(model, eq, x)


def test_bad_relu6_option_is_named(x):
    with pytest.raises(EqualizeError, match="relu6='clip'"):
        equalize(ConvReluDepthwise(), x, relu6="clip")
    assert issubclass(EqualizeError, ValueError)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_untraceable_model_names_its_class(x):
    with pytest.raises(EqualizeError, match="Untraceable"):
        equalize(Untraceable(), x)


def _imbalanced(model: ConvBnReluConv) -> ConvBnReluConv:
    """The same float function with channel ranges 10^-2..10^2 apart: BN's output channel i scaled
    by k_i > 0, conv2's input channel i by 1/k_i (ReLU commutes with positive scaling)."""
    out = copy.deepcopy(model)
    k = torch.logspace(-2, 2, out.bn.num_features)
    with torch.no_grad():
        out.bn.weight.mul_(k)
        out.bn.bias.mul_(k)
        out.conv2.weight.div_(k.reshape(1, -1, 1, 1))
    return out


def test_cle_stays_only_where_the_quantized_model_gains_by_it(x):
    """The export keeps CLE's model when its output SQNR on the calibration samples is at least the
    plain model's: kept where it balances spread channels, undone (with a note) where the 'equalized'
    model is the one with spread channels."""
    from deployq.ptq.pipeline import better_of_equalization

    torch.manual_seed(0)
    balanced = ConvBnReluConv().eval()
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prepared = lambda m: deployq.prepare(m, x[:1])
    spread_model = spread(copy.deepcopy(balanced)).eval()
    equalized_model, report = equalize(spread_model, x)
    assert report.pairs
    assert better_of_equalization(prepared(spread_model), prepared(equalized_model), batches) == (True, None)
    keep, note = better_of_equalization(prepared(balanced), prepared(_imbalanced(balanced).eval()), batches)
    assert not keep and note.startswith("cle: undone, it lowered the output SQNR on the 12 calibration samples from")
    assert_same_output(balanced, _imbalanced(balanced).eval(), x)  # the planted model computes the same function
