"""Validation metrics of ``deployq train``: ``fn(output, batch) -> (sum, count)``, averaged as
Σsum / Σcount over the validation split (so the mean is exact whatever the batch size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


from deployq.core.decibels import psnr_db
from deployq.core.registry import Registry
from deployq.train import losses
from deployq.train.losses import DistillError

__all__ = ["METRICS", "Metric"]



@dataclass(frozen=True)
class Metric:
    """A validation metric: ``fn(output, batch) -> (sum, count)``, averaged as Σsum / Σcount."""

    name: str
    fn: Callable[[Any, losses.Batch], tuple[float, int]]
    higher_is_better: bool = True
    unit: str = ""


METRICS: Registry[Metric] = Registry("metric")


def _psnr(output: Any, batch: losses.Batch) -> tuple[float, int]:
    """PSNR = 10·log10(1 / MSE) per image, the prediction clamped to [0, 1] (the thesis' metric)."""
    if "target" not in batch:
        raise DistillError(f"psnr needs 'target' in every batch; the data gives {sorted(batch)}")
    pred, target = losses.first_output(output), batch["target"]
    if pred.shape != target.shape:
        raise DistillError(f"psnr: output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    mse = (pred.clamp(0, 1) - target).square().flatten(1).mean(1).clamp_min(1e-12)
    return sum(psnr_db(float(m)) for m in mse), int(mse.numel())


def _accuracy(output: Any, batch: losses.Batch) -> tuple[float, int]:
    """Share of samples whose arg-max class is the target."""
    if "target" not in batch:
        raise DistillError(f"accuracy needs 'target' in every batch; the data gives {sorted(batch)}")
    logits, target = losses.first_output(output), batch["target"]
    if logits.ndim < 2 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise DistillError(f"accuracy: logits {tuple(logits.shape)} do not fit targets {tuple(target.shape)}")
    return float((logits.argmax(1) == target).sum()), int(target.numel())


METRICS.register("psnr")(Metric("psnr", _psnr, True, " dB"))
METRICS.register("accuracy")(Metric("accuracy", _accuracy, True))
