"""DBF + DBLE: the raw low-light enhancement network of "Abandoning the Bayer-Filter to See in the Dark"
(Xing et al., CVPR 2022), the network the thesis quantizes, with a width multiplier.

    packed colour raw (4, H/2, W/2), short exposure × ratio
        │ DBF: U-Net (DBF_conv1..9) -> DBF_out (4 ch) -> pixel_shuffle          "De-Bayer-Filter"
        ▼
    mono (1, H, W): what a sensor without colour filters would have seen
        │ pixel_unshuffle -> packed mono (4, H/2, W/2)
        ▼
    DBLE: a colour branch (color_conv1..5, on the packed raw) and a mono branch (mono_conv1..5, on
          the packed mono), fused by concatenation; the decoder (dual_conv6..9) concatenates both
          branches' skips and recalibrates them with channel attention (ca6..9) before each block;
          DBLE_out (12 ch) -> pixel_shuffle -> sRGB (3, H, W)

Every block is Conv1 -> lrelu -> Conv2 -> lrelu, the *same* LeakyReLU module called twice, as in
the original code: deployq's de-duplication names the second call ``lrelu_dup1``, the names the
seeds' configs use (``DBF.DBF_conv9.lrelu_dup1``, ``DBLE.dual_conv9.lrelu_dup1``).

Parameters: 22 M at width 32 (the SID U-Net widths); 1.37 M at width 8, the shipped example,
small enough to train on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    """Conv1 -> lrelu -> Conv2 -> lrelu (one LeakyReLU module, called twice)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.Conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.Conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.Conv2(self.lrelu(self.Conv1(x))))


class ChannelAttention(nn.Module):
    """x · σ(W2 · relu(W1 · avgpool(x))) (squeeze-and-excitation, Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))


class DBF(nn.Module):
    """De-Bayer-Filter: packed colour raw -> full-resolution mono (a SID-style U-Net)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 16 * width]
        self.DBF_conv1 = DoubleConv(4, w[0])
        self.DBF_conv2 = DoubleConv(w[0], w[1])
        self.DBF_conv3 = DoubleConv(w[1], w[2])
        self.DBF_conv4 = DoubleConv(w[2], w[3])
        self.DBF_conv5 = DoubleConv(w[3], w[4])
        self.pool = nn.MaxPool2d(2)
        self.up6 = nn.ConvTranspose2d(w[4], w[3], 2, stride=2)
        self.DBF_conv6 = DoubleConv(2 * w[3], w[3])
        self.up7 = nn.ConvTranspose2d(w[3], w[2], 2, stride=2)
        self.DBF_conv7 = DoubleConv(2 * w[2], w[2])
        self.up8 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2)
        self.DBF_conv8 = DoubleConv(2 * w[1], w[1])
        self.up9 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2)
        self.DBF_conv9 = DoubleConv(2 * w[0], w[0])
        self.DBF_out = nn.Conv2d(w[0], 4, 1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        c1 = self.DBF_conv1(packed)
        c2 = self.DBF_conv2(self.pool(c1))
        c3 = self.DBF_conv3(self.pool(c2))
        c4 = self.DBF_conv4(self.pool(c3))
        c5 = self.DBF_conv5(self.pool(c4))
        c6 = self.DBF_conv6(torch.cat([self.up6(c5), c4], 1))
        c7 = self.DBF_conv7(torch.cat([self.up7(c6), c3], 1))
        c8 = self.DBF_conv8(torch.cat([self.up8(c7), c2], 1))
        c9 = self.DBF_conv9(torch.cat([self.up9(c8), c1], 1))
        return F.pixel_shuffle(self.DBF_out(c9), 2)


class DBLE(nn.Module):
    """Dual-Branch Low-light Enhancement: colour + mono branches -> sRGB."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 16 * width]
        self.pool = nn.MaxPool2d(2)
        for branch in ("color", "mono"):
            self.add_module(f"{branch}_conv1", DoubleConv(4, w[0]))
            for i in range(1, 5):
                self.add_module(f"{branch}_conv{i + 1}", DoubleConv(w[i - 1], w[i]))
        self.fuse = nn.Conv2d(2 * w[4], w[4], 1)
        for level, i in zip((6, 7, 8, 9), (3, 2, 1, 0)):
            self.add_module(f"up{level}", nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            self.add_module(f"ca{level}", ChannelAttention(3 * w[i]))
            self.add_module(f"dual_conv{level}", DoubleConv(3 * w[i], w[i]))
        self.DBLE_out = nn.Conv2d(w[0], 12, 1)

    def _encode(self, branch: str, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [getattr(self, f"{branch}_conv1")(x)]
        for i in range(2, 6):
            skips.append(getattr(self, f"{branch}_conv{i}")(self.pool(skips[-1])))
        return skips

    def forward(self, packed: torch.Tensor, mono: torch.Tensor) -> torch.Tensor:
        color = self._encode("color", packed)
        gray = self._encode("mono", F.pixel_unshuffle(mono, 2))
        x = self.fuse(torch.cat([color[4], gray[4]], 1))
        for level, i in zip((6, 7, 8, 9), (3, 2, 1, 0)):
            up = getattr(self, f"up{level}")(x)
            merged = getattr(self, f"ca{level}")(torch.cat([up, color[i], gray[i]], 1))
            x = getattr(self, f"dual_conv{level}")(merged)
        return F.pixel_shuffle(self.DBLE_out(x), 2)


class LowLightNet(nn.Module):
    """(packed short-exposure raw × ratio) -> (sRGB image, mono image)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.DBF = DBF(width)
        self.DBLE = DBLE(width)

    def forward(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mono = self.DBF(packed)
        return self.DBLE(packed, mono), mono


def build(width: int = 8, seed: int = 0) -> LowLightNet:
    """The factory checkpoints name (``deployq.examples.lowlight.model:build``)."""
    torch.manual_seed(seed)
    return LowLightNet(width)
