"""Training data of a recipe: ``data.kind`` picks how each split is built.

    npz                      a ``.npz`` file per split with arrays ``input`` and ``target``
    tensors                  in-memory arrays or a Dataset (Python recipes)
    package.module:function  the user's own: ``function(split="train" | "val", **options)``
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from deployq.core.registry import Registry
from deployq.qat.checkpoint import CheckpointError
from deployq.qat.loading import import_factory

__all__ = ["DATASETS", "DataSpec", "PairDataset", "RecipeError", "build_dataset", "data_spec"]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the recipe file and the key."""




class PairDataset(Dataset):
    """Items ``{'input': inputs[i], 'target': targets[i]}`` from two aligned arrays/tensors."""

    def __init__(self, inputs: Any, targets: Any, where: str) -> None:
        self.inputs, self.targets = _tensor(inputs, f"{where}.input"), _tensor(targets, f"{where}.target")
        if len(self.inputs) != len(self.targets):
            raise RecipeError(f"{where}: {len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input": self.inputs[index], "target": self.targets[index]}


def _tensor(value: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if t.ndim == 0:
        raise RecipeError(f"{where}: expected an array with one item per sample, got a scalar")
    if t.is_floating_point():
        return t.float()
    if t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return t.long()
    raise RecipeError(f"{where}: unsupported dtype {t.dtype}")


@dataclass(frozen=True)
class DataSpec:
    """``kind`` + options shared by both splits (``common``) + the split values."""

    kind: str
    common: Mapping[str, Any]
    train: Any
    val: Any
    base: Path = Path(".")
    source: str = "recipe"

    def split(self, name: str) -> Any:
        return self.train if name == "train" else self.val


DatasetBuilder = Callable[[DataSpec, str], Dataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


@DATASETS.register("npz")
def npz(spec: DataSpec, split: str) -> Dataset:
    """A ``.npz`` file with arrays ``input`` (N, ...) and ``target`` (N, ...) per split."""
    where = f"{spec.source}: data.{split}"
    value = spec.split(split)
    if not isinstance(value, (str, Path)):
        raise RecipeError(f"{where}: expected the path of a .npz file, got {value!r}")
    path = spec.base / value
    if not path.is_file():
        raise RecipeError(f"{where}: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"input", "target"} - set(arrays.files)
            if missing:
                raise RecipeError(f"{where}: {path} has no array {sorted(missing)} (it has {sorted(arrays.files)})")
            inputs, targets = arrays["input"], arrays["target"]
    except (OSError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"{where}: cannot read {path}: {err}") from None
    return PairDataset(inputs, targets, f"{where} ({path.name})")


@DATASETS.register("tensors")
def tensors(spec: DataSpec, split: str) -> Dataset:
    """In-memory data (Python recipes): a split is ``{'input': X, 'target': Y}``, an (X, Y) pair,
    or a Dataset whose items are such dicts."""
    value, where = spec.split(split), f"{spec.source}: data.{split}"
    if isinstance(value, Dataset):
        return value
    if isinstance(value, Mapping) and {"input", "target"} <= set(value):
        return PairDataset(value["input"], value["target"], where)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return PairDataset(value[0], value[1], where)
    raise RecipeError(f"{where}: expected {{'input': X, 'target': Y}}, an (X, Y) pair, or a Dataset")


def python_dataset(spec: DataSpec, split: str) -> Dataset:
    """``kind: package.module:function``: ``function(split=..., **options)``, the options being
    the shared ones plus the split's own (a mapping, or just a length). Imported because the
    recipe, which the user wrote, names it."""
    value = spec.split(split)
    options = {"length": value} if isinstance(value, int) and not isinstance(value, bool) else value
    where = f"{spec.source}: data.{split}"
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}: expected a mapping of {spec.kind} options, or a length")
    try:
        build = import_factory(spec.kind, allowed=True, what="dataset")
    except CheckpointError as err:
        raise RecipeError(f"{spec.source}: data.kind: {err}") from None
    try:
        dataset = build(split=split, **{**spec.common, **options})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {spec.kind} rejected the options {sorted({**spec.common, **options})}: {err}") from None
    if not isinstance(dataset, Dataset):
        raise RecipeError(f"{where}: {spec.kind} returned {type(dataset).__name__}, not a torch Dataset")
    return dataset


def build_dataset(spec: DataSpec, split: str) -> Dataset:
    if ":" in spec.kind:
        dataset = python_dataset(spec, split)
    else:
        try:
            builder = DATASETS.get(spec.kind)
        except KeyError as err:
            raise RecipeError(f"{spec.source}: data.kind: {err.args[0]}") from None
        dataset = builder(spec, split)
    if len(dataset) == 0:
        raise RecipeError(f"{spec.source}: data.{split} is empty")
    return dataset


def data_spec(section: Any, base: Path, source: str) -> DataSpec:
    """A DataSpec from a recipe's ``data`` mapping (``kind``, ``train``, ``val`` + shared options)."""
    if not isinstance(section, Mapping):
        raise RecipeError(f"{source}: data must be a mapping with kind, train and val")
    for key in ("kind", "train", "val"):
        if key not in section:
            raise RecipeError(f"{source}: missing required key 'data.{key}'")
    common = {k: v for k, v in section.items() if k not in ("kind", "train", "val")}
    kind = str(section["kind"])
    if kind not in DATASETS and ":" not in kind:
        close = difflib.get_close_matches(kind, list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{source}: data.kind {kind!r} is unknown; known: {', '.join(DATASETS)}, or "
                          f"package.module:function.{hint}")
    return DataSpec(kind, common, section["train"], section["val"], base, source)

