"""What training works on: the float model from the recipe's factory and weights, checked against
the data, then the student (prepared, distillation layers exposed) and the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import fx, nn
from torch.utils.data import Dataset

from deployq.qat import checkpoint as ck
from deployq.qat.checkpoint import CheckpointError
from deployq.qat.loading import float_model
from deployq.qat.prepare import prepare
from deployq.train import distill as dst
from deployq.train import losses
from deployq.train.data import RecipeError
from deployq.train.losses import DistillError
from deployq.train.metrics import Metric
from deployq.train.recipe import ModelSpec, Recipe

__all__ = ["Models", "build_float_model", "build_models", "check_data_fits", "collate"]


def build_float_model(spec: ModelSpec, weights: Optional[Path] = None) -> nn.Module:
    """The user's float model (their factory, named in their recipe) with float weights."""
    try:
        return float_model(spec.factory, dict(spec.kwargs), "the recipe", allowed=True,  # the user's own recipe
                           weights=weights or spec.weights).eval()
    except CheckpointError as err:
        raise RecipeError(str(err)) from None


def collate(items: Sequence[Any]) -> losses.Batch:
    return losses.as_batch(torch.utils.data.default_collate(list(items)))


def check_data_fits(model: nn.Module, datasets: Mapping[str, Dataset], loss: losses.TaskLoss, metric: Metric,
                    recipe: Recipe) -> None:
    """Run the float model on the first item of each split and score it, so that data that does
    not fit the model fails here, naming the split and the shapes."""
    for split, dataset in datasets.items():
        where = f"{recipe.source}: data.{split}"
        try:
            batch = collate([dataset[0]])
        except (DistillError, TypeError, RuntimeError) as err:
            raise RecipeError(f"{where}: items cannot be batched: {err}") from None
        x = batch["input"]
        try:
            with torch.no_grad():
                output = model(x)
        except Exception as err:  # whatever the user's model raises on a wrong input
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RecipeError(
                f"{where}: the model {recipe.model.factory} cannot take the data's input "
                f"(item 0: {x.dtype} {tuple(x.shape[1:])}, batched {tuple(x.shape)}): {type(err).__name__}: {first}"
            ) from None
        try:
            with torch.no_grad():
                loss(output, batch)
                metric.fn(output, batch)
        except (DistillError, ValueError, RuntimeError, KeyError, IndexError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise RecipeError(f"{where}: the data does not fit the model's output: {message}") from None


@dataclass
class Models:
    """What training works on: the student (plain and with the distillation layers exposed) and
    the teacher."""

    student: fx.GraphModule
    student_net: fx.GraphModule  # output (output, {layer: activation}) when distilling
    teacher: Optional[dst.Teacher]
    inputs: list[ck.InputSpec]


def build_models(recipe: Recipe, datasets: Mapping[str, Dataset], loss: losses.TaskLoss, metric: Metric,
                 device: torch.device) -> Models:
    """Float model + weights -> data check -> student (prepared, on `device`) -> exposed
    distillation layers -> teacher. Every recipe error surfaces here, before calibration."""
    float_model = build_float_model(recipe.model)
    check_data_fits(float_model, datasets, loss, metric, recipe)
    example = collate([datasets["train"][0]])["input"]
    student = prepare(float_model, (example,), recipe.quant).to(device)
    placeholder = next(n for n in student.graph.nodes if n.op == "placeholder")
    shape = recipe.input_shape or tuple(example.shape)
    inputs = [ck.InputSpec(str(placeholder.target), shape, str(example.dtype).replace("torch.", ""))]
    if recipe.distill is None:
        return Models(student, student, None, inputs)
    names = recipe.distill.names
    try:
        student_net = dst.expose(student, names)
    except DistillError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    teacher_weights = Path(recipe.distill.teacher_weights) if recipe.distill.teacher_weights else None
    teacher_float = build_float_model(recipe.model, teacher_weights) if teacher_weights else float_model
    teacher = dst.Teacher(prepare(teacher_float, (example,), recipe.quant).to(device), names)
    return Models(student, student_net, teacher, inputs)
