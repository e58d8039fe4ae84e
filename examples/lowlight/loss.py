"""The low-light example's training loss, as the paper has it: L1 on the sRGB output plus L1 on
the De-Bayer-Filter's mono output. Recipes name it ``deployq.examples.lowlight.loss:lowlight_loss``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from deployq.train.losses import Batch, DistillError, l1_loss


def lowlight_loss(output: Any, batch: Batch) -> torch.Tensor:
    """``L1(rgb, target) + L1(mono, batch['mono'])`` when the model returns (rgb, mono); else L1."""
    if isinstance(output, (tuple, list)) and len(output) == 2:
        rgb, mono = output
        if "mono" not in batch:
            raise DistillError(f"the lowlight loss needs 'mono' in every batch; the data gives {sorted(batch)}")
        if mono.shape != batch["mono"].shape:
            raise DistillError(f"lowlight loss: the model's mono output has shape {tuple(mono.shape)} but the "
                               f"mono target has shape {tuple(batch['mono'].shape)}")
        return l1_loss(rgb, batch) + F.l1_loss(mono, batch["mono"])
    return l1_loss(output, batch)
