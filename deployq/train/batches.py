"""Batches for a command that reads data without a recipe's loader (``deployq hessian --data``): a
YAML dataset or recipe (its train split, with targets) or input files in the model's input shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deployq.train.data import RecipeError, build_dataset, data_spec
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
