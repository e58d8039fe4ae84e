"""Models the benchmarks build that deployq's examples do not have.

Factories take keyword arguments only and return a float ``nn.Module`` in eval mode with
deterministic weights, so deployq checkpoints can name them (``benchmarks.models:conv_stack``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployq.examples.zoo import plain_cnn


def conv_stack(depth: int = 10, channels: int = 8, in_ch: int = 3, seed: int = 0) -> nn.Sequential:
    """`depth` × (3×3 Conv + ReLU): the plainest deep network, for export/diff time against depth.

    He-initialised so activations neither vanish nor explode over 200 layers.
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        conv = nn.Conv2d(in_ch if i == 0 else channels, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / conv.weight[0].numel()) ** 0.5)
            conv.bias.zero_()
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers).eval()


class TinyRawToRGB(nn.Module):
    """A two-layer stand-in with the low-light network's interface: packed raw (4, h, w) ->
    (sRGB (3, 2h, 2w), mono (1, 2h, 2w)). Keeps the harness's smoke test fast."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, width, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2)
        self.rgb = nn.Conv2d(width, 12, 1)
        self.mono = nn.Conv2d(width, 4, 1)

    def forward(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.lrelu(self.conv1(packed))
        return F.pixel_shuffle(self.rgb(x), 2), F.pixel_shuffle(self.mono(x), 2)


def tiny_raw_to_rgb(width: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyRawToRGB(width).eval()


def digits_cnn(seed: int = 0) -> nn.Module:
    """The digits classifier: deployq's zoo ``plain_cnn`` (Conv+BN+ReLU ×2, max-pool, Conv+BN+ReLU,
    global average pool, Linear) on one 8×8 channel, width 16, ten classes."""
    return plain_cnn(seed=seed, in_ch=1, width=16, classes=10)
