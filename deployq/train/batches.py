"""Batches for a command that reads data without a recipe's loader (``deployq hessian --data``): a
YAML dataset or recipe (its train split, with targets) or input files in the model's input shapes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployq.train.data import RecipeError, build_dataset, data_spec
from deployq.train.hessian import _set_modes
from deployq.train.models import collate


YAML_SUFFIXES = (".yaml", ".yml")


def _dataset_batches(path: Path, batch_size: int, limit: int) -> list[Any]:
    """Batches from a recipe-style dataset: a YAML file with a ``data:`` section (a recipe) or the
    section itself (``kind: ...``); the train split, relative paths from the file's folder."""
    import yaml
    from torch.utils.data import DataLoader

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    section = doc.get("data", doc) if isinstance(doc, dict) else doc
    spec = data_spec(section, path.resolve().parent, str(path))
    loader = DataLoader(build_dataset(spec, "train"), batch_size=batch_size, collate_fn=collate)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == limit:
            break
    return batches


def data_batches(path: str | Path, inputs: list, batch_size: int, limit: int, seed: int = 0) -> tuple[list[Any], str]:
    """At most `limit` batches from `path`, and a line saying what they are: a YAML dataset or
    recipe (its train split, with targets, `batch_size` items each), or input files (raw, images,
    .npy/.npz; .npz keyed by input name for several inputs) in the shapes of `inputs` (InputSpec),
    without targets. Raw and image frames larger than the input give random crops (seeded by
    `seed`), spread over every file, so a few large frames still give `limit` different batches."""
    from deployq.calib.data import files_in, load_feeds

    path = Path(path)
    if path.is_file() and path.suffix.lower() in YAML_SUFFIXES:
        batches = _dataset_batches(path, batch_size, limit)
        return batches, f"{len(batches)} batches of {batch_size} from the train split of {path}"
    files = files_in(path)
    per_batch = inputs[0].shape[0] if len(inputs) == 1 else 1
    crops = max(1, -(-limit * per_batch // len(files)))  # per raw or image file
    feeds = load_feeds(path, [(i.name, i.shape) for i in inputs], limit=limit, crops=crops, seed=seed)
    shapes = ", ".join(f"{tuple(i.shape)}" for i in inputs)
    how = f"{crops} random crops of each of {len(files)} files, seed {seed}" if crops > 1 else f"{len(files)} files"
    return [{"input": tuple(torch.from_numpy(f[i.name]) for i in inputs)} for f in feeds], \
        f"{len(feeds)} batches of {shapes} from {path} ({how})"


PIXELS = 128 * 128  # per sample, by default: the Hessian's time grows with it (deployq hessian --pixels)


def bounded_inputs(model: nn.Module, inputs: list, pixels: int) -> tuple[list, str]:
    """`inputs` (InputSpec) with height and width cut to about `pixels` per sample (aspect kept,
    multiples of 32) where a one-input image model takes more and runs on the smaller size (a fully
    convolutional one does); else as they are. And what was chosen, for the user."""
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[2] * inputs[0].shape[3] <= pixels:
        return inputs, ""
    n, c, h, w = inputs[0].shape
    scale = math.sqrt(pixels / (h * w))
    small = (max(32, int(h * scale) // 32 * 32), max(32, int(w * scale) // 32 * 32))
    if small[0] * small[1] >= h * w:
        return inputs, ""
    saved, training = _set_modes(model, "float"), model.training
    model.eval()  # the probe must not move BatchNorm statistics
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, *small))
    except Exception:  # a model of fixed size (a Linear after a flatten, a reshape): the size it takes
        return inputs, (f"; the input's {h}x{w} is over --pixels {pixels} but the model does not run on "
                        f"{small[0]}x{small[1]}: at full size")
    finally:
        for module, mode in saved.items():
            module.mode = mode
        model.train(training)
    return [replace(inputs[0], shape=(n, c, *small))], f"; crops of {small[0]}x{small[1]}, the input's {h}x{w} " \
        f"being over --pixels {pixels}"
