"""Task losses, the first term of the training objective (:mod:`deployq.train.distill` has the
second): a registered name (``l1``, ``mse``, ``cross_entropy``), the user's own
``package.module:function``, or a callable ``fn(output, batch) -> scalar``. A batch is a dict with
``input`` (and ``target``, plus whatever else the dataset's items carry).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from deployq.core.registry import Registry
from deployq.qat.checkpoint import CheckpointError
from deployq.qat.loading import import_factory

Batch = dict[str, Any]
TaskLoss = Callable[[Any, Batch], torch.Tensor]


class DistillError(ValueError):
    """The training objective's one error type: a loss, a batch or a distillation setting that
    cannot be used; the message names the key, the layer or the shapes."""


def as_batch(batch: Any) -> Batch:
    """A batch as a dict: ``input`` (and ``target``, plus any other entries of dict items).

    Accepts a dict with 'input', an (input, target) pair, or a bare input tensor.
    """
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise DistillError(f"a data item is a dict without 'input' (keys: {sorted(batch)})")
        return dict(batch)
    if isinstance(batch, torch.Tensor):
        return {"input": batch}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"input": batch[0], "target": batch[1]}
    raise DistillError(
        f"cannot read a batch of type {type(batch).__name__}: expected a dict with 'input' "
        "(and 'target'), an (input, target) pair, or an input tensor"
    )


def first_output(output: Any) -> torch.Tensor:
    """The model's main output: itself, or the first element of a tuple / list."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _target(batch: Batch, key: str, loss: str) -> torch.Tensor:
    if key not in batch:
        raise DistillError(f"the {loss} loss needs '{key}' in every batch; the data gives {sorted(batch)}")
    return batch[key]


def _same_shape(pred: torch.Tensor, target: torch.Tensor, loss: str, what: str = "target") -> None:
    if pred.shape != target.shape:
        raise DistillError(
            f"{loss} loss: the model output has shape {tuple(pred.shape)} but the {what} has shape "
            f"{tuple(target.shape)}"
        )


TASK_LOSSES: Registry[TaskLoss] = Registry("task loss")


@TASK_LOSSES.register("l1")
def l1_loss(output: Any, batch: Batch) -> torch.Tensor:
    """mean |ŷ − y| of the main output."""
    pred, target = first_output(output), _target(batch, "target", "l1")
    _same_shape(pred, target, "l1")
    return F.l1_loss(pred, target)


@TASK_LOSSES.register("mse")
def mse_loss(output: Any, batch: Batch) -> torch.Tensor:
    """mean (ŷ − y)² of the main output."""
    pred, target = first_output(output), _target(batch, "target", "mse")
    _same_shape(pred, target, "mse")
    return F.mse_loss(pred, target)


@TASK_LOSSES.register("cross_entropy")
def cross_entropy_loss(output: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the logits (N, C, ...) against integer class targets (N, ...)."""
    logits, target = first_output(output), _target(batch, "target", "cross_entropy")
    if target.is_floating_point() or logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise DistillError(
            f"cross_entropy loss: expected integer class targets of shape {tuple(logits.shape[:1] + logits.shape[2:])} "
            f"for logits {tuple(logits.shape)}, got {target.dtype} {tuple(target.shape)}"
        )
    return F.cross_entropy(logits, target)


def task_loss(name: str | TaskLoss) -> TaskLoss:
    """A registered task loss by name, ``package.module:function`` (the user's own), or a callable
    ``fn(output, batch) -> scalar``."""
    if callable(name):
        return name
    if ":" in name:
        try:
            return import_factory(name, allowed=True, what="loss")
        except CheckpointError as err:
            raise DistillError(str(err)) from None
    try:
        return TASK_LOSSES.get(name)
    except KeyError as err:
        raise DistillError(err.args[0]) from None
