"""Small models with the structures deployq must handle, used by tests, benchmarks and docs.

Each factory takes keyword arguments only and returns a float ``nn.Module`` in eval mode with
deterministic weights (``seed``), so checkpoints can name them (``deployq.examples.zoo:unet``).

| factory          | structure                                                                      |
|------------------|--------------------------------------------------------------------------------|
| plain_cnn        | Conv+BN+ReLU stack, max-pool, F.relu, global average pool, Linear (classifier)  |
| unet             | encoder / decoder with ConvTranspose2d and torch.cat skips                      |
| resnet           | residual blocks ``relu(x + f(x))`` with BN                                      |
| channel_attention| ``x * sigmoid(conv(relu(conv(avgpool(x)))))`` (squeeze-excitation)              |
| reused           | one LeakyReLU module called at four places, one Conv called twice               |
| space_to_depth   | pixel_unshuffle, view+permute space-to-depth, pixel_shuffle output              |
| upsampler        | ConvTranspose2d before a LeakyReLU, fused with a ReLU, and at the output         |
| freely_written   | written as timm writes models: a BatchNorm subclass with its own activation, an  |
|                  | Identity between BatchNorm and ReLU, a shape-dependent branch (symbolic fx       |
|                  | cannot trace it: torch.export captures it), a Flatten after the classifier       |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights and non-trivial BN statistics (so folding BN actually changes weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self, in_ch: int = 3, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.block1 = conv_bn_relu(in_ch, width)
        self.pool = nn.MaxPool2d(2)
        self.block2 = conv_bn_relu(width, 2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.pool(self.block1(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, width: int = 8, out_ch: int = 3) -> None:
        super().__init__()
        self.enc1 = conv_bn_relu(in_ch, width)
        self.enc2 = conv_bn_relu(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.mid = conv_bn_relu(2 * width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(width, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        m = self.mid(self.enc2(self.pool(e1)))
        d = self.dec(torch.cat([self.up(m), e1], dim=1))
        return self.out(d)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self, in_ch: int = 3, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_ch, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.head = nn.Conv2d(width, in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ChannelAttention(nn.Module):
    """Squeeze-excitation: per-channel weights from global context."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, max(1, ch // reduction), 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(max(1, ch // reduction), ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * w


class AttentionNet(nn.Module):
    def __init__(self, in_ch: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.ca = ChannelAttention(width)
        self.out = nn.Conv2d(width, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ca(self.act(self.conv(x))))


class Reused(nn.Module):
    """The seeds' pattern: one `lrelu` module called after several convolutions."""

    def __init__(self, in_ch: int = 3, width: int = 8) -> None:
        super().__init__()
        self.Conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.Conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shared = nn.Conv2d(width, width, 1)
        self.lrelu = nn.LeakyReLU(0.2)
        self.out = nn.Conv2d(width, in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrelu(self.Conv1(x))
        x = self.lrelu(self.Conv2(x))
        x = self.lrelu(self.shared(x))
        x = self.lrelu(self.shared(x))
        return self.out(x)


class SpaceToDepth(nn.Module):
    def __init__(self, in_ch: int = 1, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4 * in_ch, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * width, 4 * width, 3, padding=1)
        self.out = nn.Conv2d(4 * width, 4 * in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(F.pixel_unshuffle(x, 2)))
        n, c, h, w = y.shape
        y = y.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        y = self.relu(self.conv2(y))
        y = F.pixel_shuffle(y, 2)
        return F.pixel_shuffle(self.out(F.pixel_unshuffle(y, 2)), 2)


class Upsampler(nn.Module):
    """Transposed convolutions in the three places a quant point can sit: before a LeakyReLU (its own
    quant point), fused with a ReLU, and at the model output."""

    def __init__(self, in_ch: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_ch, width, stride=2)
        self.up1 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.act1 = nn.LeakyReLU(0.1)
        self.down = conv_bn_relu(width, width, stride=2)
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.act2 = nn.ReLU()
        self.head = nn.ConvTranspose2d(width, in_ch, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.up1(self.stem(x)))
        y = self.act2(self.up2(self.down(y)))
        return self.head(F.max_pool2d(y, 2))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass that applies its own activation (timm's BatchNormAct2d)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class ResizeTo(nn.Module):
    """Resizes only when the input is not already `size` (Python control flow on a shape)."""

    def __init__(self, width: int, size: int = 16) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.act(self.drop_block(self.bn(self.conv(x))))


class FreelyWritten(nn.Module):
    def __init__(self, in_ch: int = 3, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct(width)
        self.block = ResizeTo(width)
        self.fc = nn.Linear(width, classes)
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.bn1(self.stem(x)))
        return self.flatten(self.fc(y.mean((2, 3))))


def plain_cnn(seed: int = 0, **kw) -> nn.Module:
    return _init(PlainCNN(**kw), seed)


def unet(seed: int = 0, **kw) -> nn.Module:
    return _init(UNet(**kw), seed)


def resnet(seed: int = 0, **kw) -> nn.Module:
    return _init(ResNet(**kw), seed)


def channel_attention(seed: int = 0, **kw) -> nn.Module:
    return _init(AttentionNet(**kw), seed)


def reused(seed: int = 0, **kw) -> nn.Module:
    return _init(Reused(**kw), seed)


def space_to_depth(seed: int = 0, **kw) -> nn.Module:
    return _init(SpaceToDepth(**kw), seed)


def upsampler(seed: int = 0, **kw) -> nn.Module:
    return _init(Upsampler(**kw), seed)


def freely_written(seed: int = 0, **kw) -> nn.Module:
    return _init(FreelyWritten(**kw), seed)


FACTORIES = {
    "plain_cnn": (plain_cnn, (1, 3, 16, 16)),
    "unet": (unet, (1, 3, 16, 16)),
    "resnet": (resnet, (1, 3, 16, 16)),
    "channel_attention": (channel_attention, (1, 3, 16, 16)),
    "reused": (reused, (1, 3, 16, 16)),
    "space_to_depth": (space_to_depth, (1, 1, 16, 16)),
    "upsampler": (upsampler, (1, 3, 16, 16)),
    "freely_written": (freely_written, (1, 3, 18, 18)),
}
