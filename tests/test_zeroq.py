"""ZeroQ distilled calibration inputs (deployq.ptq.zeroq): the BN-statistics loss falls, the inputs
match the running statistics (checked with hooks written here), the activation ranges they give are
close to those of real data and closer than plain noise's, and the user's model is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deployq.core import progress as progress_module
from deployq.ptq.zeroq import DistilledData, ZeroQError, distilled_data

SHAPE = (4, 3, 16, 16)
CHANNEL_MEAN = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
CHANNEL_STD = 0.2


def real_inputs(count: int, seed: int) -> torch.Tensor:
    """The "training set": per-channel N(mean_c, 0.2^2) images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((count, *SHAPE[1:]), generator=g) * CHANNEL_STD + CHANNEL_MEAN


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (3, 8, 8):
            layers += [nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def trained_bn_model() -> SmallCNN:
    """Random convs; BN running statistics are the cumulative averages over the real inputs."""
    torch.manual_seed(0)
    model = SmallCNN().train()
    with torch.no_grad():
        for seed in range(8):
            model(real_inputs(32, seed))
    return model.eval()


def bn_input_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: (per-channel mean, biased variance) of its input."""
    stats = []

    def hook(module, args):
        a = args[0]
        stats.append((a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return stats


def relu_maxima(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Per ReLU: the max of its output over all batches (what a min/max observer calibrates to)."""
    maxima: dict[int, float] = {}
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]

    def hook_for(i):
        def hook(module, args, out):
            maxima[i] = max(maxima.get(i, 0.0), out.max().item())
        return hook

    handles = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(relus)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return torch.tensor([maxima[i] for i in range(len(relus))])


def worst_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over layers of max(a/b, b/a): 1 means identical ranges."""
    return torch.maximum(a / b, b / a).max().item()


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    return trained_bn_model()


@pytest.fixture(scope="module")
def distilled(model) -> DistilledData:
    return distilled_data(model, SHAPE, batches=2, steps=400, lr=0.2, seed=0)


def test_loss_falls_and_statistics_match(model, distilled):
    assert distilled.bn_layers == 3
    assert len(distilled.batches) == 2
    assert all(b.shape == SHAPE and b.dtype == torch.float32 and not b.requires_grad for b in distilled.batches)
    assert distilled.loss_end < 1e-3 * distilled.loss_start
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for x in distilled.batches:
        for bn, (mean, var) in zip(bns, bn_input_stats(model, x)):
            scale = bn.running_var.sqrt()
            assert ((mean - bn.running_mean).abs() / scale).max() < 0.1
            assert ((var.sqrt() - scale).abs() / scale).max() < 0.1


def test_recovers_input_channel_means(distilled):
    """The first conv has 8 outputs of 3 input channels, so matching its BN's means pins down the
    inputs' channel means (0.2, 0.5, 0.8) from noise of mean 0 (the spread is not pinned down)."""
    for x in distilled.batches:
        assert torch.allclose(x.mean(dim=(0, 2, 3)), CHANNEL_MEAN.flatten(), atol=0.1)


def test_activation_ranges_close_to_real_data(model, distilled):
    """Per ReLU output, max over the same number of samples (8). Maxima of 8 * 16 * 16 values per
    channel are extreme-value statistics, so even two real-data draws differ by some percent; within
    1.5x of the real data's is close (a min/max observer's range, hence the scale, within 1.5x),
    and noise N(0, 1), five times wider than the real inputs, lands farther."""
    real = relu_maxima(model, [real_inputs(4, 100), real_inputs(4, 101)])
    ours = relu_maxima(model, distilled.batches)
    g = torch.Generator().manual_seed(0)
    noise = relu_maxima(model, [torch.randn(SHAPE, generator=g) for _ in range(2)])
    assert worst_ratio(ours, real) < 1.5
    assert worst_ratio(noise, real) > 3 and worst_ratio(noise, real) > 2 * worst_ratio(ours, real)


def test_model_untouched():
    model = trained_bn_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distilled_data(model, SHAPE, batches=1, steps=3)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_seeded(model):
    a = distilled_data(model, SHAPE, batches=2, steps=3, seed=1)
    b = distilled_data(model, SHAPE, batches=2, steps=3, seed=1)
    c = distilled_data(model, SHAPE, batches=2, steps=3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    assert not torch.equal(a.batches[0], c.batches[0])
    assert not torch.equal(a.batches[0], a.batches[1])


def test_value_range(model):
    data = distilled_data(model, SHAPE, batches=1, steps=10, lr=0.5, value_range=(0.0, 1.0))
    x = data.batches[0]
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.min() == 0.0 or x.max() == 1.0  # the clamp was needed: N(0.2..0.8, 0.2) leaves [0, 1]


def test_progress_lines(model, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(progress_module, "QUIET", False)
    distilled_data(model, SHAPE, batches=1, steps=2, progress=True)
    assert "zeroq" in capsys.readouterr().err


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


class UnusedBN(NoBN):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)


@pytest.mark.parametrize("kwargs, named", [
    ({"steps": 0}, "steps"),
    ({"batches": 0}, "batches"),
    ({"value_range": (1.0, 0.0)}, "value_range"),
    ({"value_range": (0.5, 0.5)}, "value_range"),
    ({"lr": 0.0}, "lr"),
    ({"input_shape": (4, 3.5, 16, 16)}, "input_shape"),
    ({"input_shape": (0, 3, 16, 16)}, "input_shape"),
])
def test_bad_options(model, kwargs, named):
    with pytest.raises(ZeroQError, match=named):
        distilled_data(model, **{"input_shape": SHAPE, **kwargs})


def test_model_without_batchnorm():
    with pytest.raises(ZeroQError, match="BatchNorm statistics.*NoBN"):
        distilled_data(NoBN(), SHAPE, steps=1)
    with pytest.raises(ZeroQError, match="UnusedBN"):
        distilled_data(UnusedBN(), SHAPE, steps=1)
