"""Recipes of ``deployq train``: read, check every key, and say what is wrong before training.

The format is documented in :mod:`deployq.train.loop` (and the README); relative paths are relative
to the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from deployq.core.files import read_yaml
from deployq.qat import onnx_import
from deployq.qat.config import ConfigError, QConfig, load_config
from deployq.qat.config import from_dict as qconfig_from_dict
from deployq.train import distill as dst
from deployq.train import losses
from deployq.train.data import DataSpec, RecipeError, data_spec
from deployq.train.losses import DistillError
from deployq.train.metrics import METRICS

__all__ = ["ModelSpec", "Recipe", "RecipeError", "load_recipe"]



@dataclass(frozen=True)
class ModelSpec:
    factory: str
    kwargs: Mapping[str, Any]
    weights: Optional[Path]  # None for a model imported from ONNX: the file holds its weights


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    data: DataSpec
    loss: Any  # a registered name, pkg.mod:function, or a callable
    epochs: int
    output_dir: Path
    quant: QConfig = field(default_factory=QConfig)
    metric: str = "psnr"
    distill: Optional[dst.DistillConfig] = None
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 4
    calibration_batches: int = 100
    freeze_bn_epoch: Optional[int] = None
    seed: int = 0
    num_workers: int = 0
    compile: bool = True  # the quantizers' fused kernels: C on the CPU, torch.compile on CUDA (fake_quant.use_compiled_kernels)
    input_shape: Optional[tuple[int, ...]] = None  # the deployment input stored in checkpoints
    source: str = "recipe"
    notes: tuple[str, ...] = ()


OPTIONS = {  # key: (type, check, description)
    "optimizer": (str, lambda v: v in ("adam", "sgd"), "adam or sgd"),
    "lr": (float, lambda v: v > 0 and math.isfinite(v), "a number > 0"),
    "weight_decay": (float, lambda v: v >= 0, "a number >= 0"),
    "momentum": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "calibration_batches": (int, lambda v: v >= 1, "an integer >= 1"),
    "freeze_bn_epoch": (int, lambda v: v >= 1, "an epoch number >= 1 (or null)"),
    "seed": (int, lambda v: True, "an integer"),
    "num_workers": (int, lambda v: v >= 0, "an integer >= 0"),
    "compile": (bool, lambda v: True, "true or false"),
}
SECTIONS = {"model", "quant_config", "data", "loss", "metric", "distill", "output_dir", "input_shape"}
SEEDS_MAPPED = {"load_model", "load_teacher_model", "config_file_path", "extra_quantizer_dict",
                "fuse_activations", "distill_config", "distill_coeff", "output_layer_list", "quant_teacher"}
SEEDS_IGNORED = {"gpu_id": "devices come from torchrun / CUDA_VISIBLE_DEVICES",
                 "debug": "no debug mode", "pdb_debug": "no debug mode",
                 "onnx": "export with `deployq export`", "load_quant_model": "continue a run with --resume",
                 "quant": "deployq train always quantizes", "test": "deployq train always trains"}
KNOWN_KEYS = SECTIONS | set(OPTIONS) | SEEDS_MAPPED | set(SEEDS_IGNORED)


def _option(doc: Mapping[str, Any], key: str, source: str) -> Any:
    kind, check, what = OPTIONS[key]
    value = doc[key]
    if value is None and key == "freeze_bn_epoch":
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key} must be {what}, got {value!r}")
        return value
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{source}: {key} must be {what}, got {doc[key]!r}") from None
    if not check(value):
        raise RecipeError(f"{source}: {key} must be {what}, got {doc[key]!r}")
    return value


def _seeds_notes(doc: Mapping[str, Any], source: str) -> list[str]:
    notes = []
    for key, why in SEEDS_IGNORED.items():
        if key not in doc:
            continue
        value = doc[key]
        if (key == "quant" and value is False) or (key == "test" and value is True) or (key == "load_quant_model" and value):
            raise RecipeError(f"{source}: {key}: {value!r} is not supported ({why})")
        notes.append(f"seeds key {key!r} ignored: {why}")
    return notes


def _model_spec(doc: Mapping[str, Any], base: Path, source: str) -> ModelSpec:
    section = doc.get("model")
    if not isinstance(section, Mapping):
        raise RecipeError(f"{source}: missing required key 'model' (factory, kwargs, weights; or onnx)")
    if "onnx" in section:
        return _onnx_model_spec(section, doc, base, source)
    unknown = set(section) - {"factory", "kwargs", "weights"}
    if unknown:
        raise RecipeError(f"{source}: model: unknown keys {sorted(unknown)}; known: factory, kwargs, weights")
    factory = section.get("factory")
    if not isinstance(factory, str) or ":" not in factory:
        raise RecipeError(f"{source}: missing required key 'model.factory' (package.module:function)")
    kwargs = section.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RecipeError(f"{source}: model.kwargs must be a mapping")
    weights = section.get("weights", doc.get("load_model"))
    if "weights" in section and "load_model" in doc:
        raise RecipeError(f"{source}: both model.weights and load_model; give one")
    if not weights:
        raise RecipeError(
            f"{source}: missing required key 'model.weights' (the float state_dict QAT starts from; "
            "the seeds call it load_model). QAT never starts from random weights."
        )
    return ModelSpec(factory, dict(kwargs), base / str(weights))


def _onnx_model_spec(section: Mapping[str, Any], doc: Mapping[str, Any], base: Path, source: str) -> ModelSpec:
    """``model: {onnx: path/to/model.onnx}``: a float ONNX model, graph and weights from the file
    (imported by deployq.qat.onnx_import; the checkpoints record the file and its SHA-256)."""
    if set(section) != {"onnx"} or "load_model" in doc:
        raise RecipeError(f"{source}: model.onnx is the whole model (graph and float weights); give it without "
                          f"{', '.join(sorted(set(section) - {'onnx'}) or ['load_model'])}")
    path = base / str(section["onnx"])
    if not path.is_file():
        raise RecipeError(f"{source}: model.onnx: no such file {path}")
    given = _input_shape(doc.get("input_shape"), source)
    try:  # the sizes the import fixes (what the file computes from its input's shape): input_shape, else the file's
        shapes = onnx_import.resolve_shapes(path, [(None, given)] if given else None)
    except (ValueError, onnx_import.OnnxImportError) as err:
        raise RecipeError(f"{source}: model.onnx: {str(err).replace('pass --input-shape', 'give input_shape: [N, C, H, W]')}") from None
    return ModelSpec(onnx_import.FACTORY, {"path": str(path.resolve()), "sha256": onnx_import.file_digest(path),
                                           "shapes": [list(s) for _, s in shapes]}, None)


def _quant_config(doc: Mapping[str, Any], base: Path, source: str) -> QConfig:
    given = [k for k in ("quant_config", "config_file_path", "extra_quantizer_dict") if k in doc]
    if len(given) > 1:
        raise RecipeError(f"{source}: the quantization config is given twice ({', '.join(given)}); give one")
    if "fuse_activations" in doc and given != ["extra_quantizer_dict"]:
        raise RecipeError(f"{source}: fuse_activations belongs in the quantization config (quant_config), "
                          "or next to the seeds' extra_quantizer_dict")
    if not given:
        return QConfig()
    key = given[0]
    try:
        if key == "extra_quantizer_dict":
            seeds = {k: doc[k] for k in ("extra_quantizer_dict", "fuse_activations") if k in doc}
            return qconfig_from_dict(seeds, source)
        value = doc[key]
        if isinstance(value, Mapping):
            return qconfig_from_dict(value, f"{source}: {key}")
        if isinstance(value, QConfig):
            return value
        return load_config(base / str(value))
    except ConfigError as err:
        raise RecipeError(str(err)) from None


def _distill(doc: Mapping[str, Any], base: Path, source: str) -> tuple[Optional[dst.DistillConfig], list[str]]:
    try:
        config = dst.from_dict(doc, source)
    except DistillError as err:
        raise RecipeError(str(err)) from None
    notes = []
    if config is None:
        for key in ("quant_teacher", "load_teacher_model"):
            if key in doc:
                notes.append(f"{key!r} ignored: the recipe distils no layer")
        return None, notes
    if config.teacher_weights is not None:
        config = dataclasses.replace(config, teacher_weights=str(base / config.teacher_weights))
    return config, notes


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, *, epochs: Optional[int] = None) -> Recipe:
    """Read and check a recipe (YAML path, mapping, or Recipe); `epochs` overrides its epochs."""
    if isinstance(recipe, Recipe):
        return recipe if epochs is None else dataclasses.replace(recipe, epochs=_option({"epochs": epochs}, "epochs", "--epochs"))
    if isinstance(recipe, Mapping):
        doc, base, source = recipe, Path.cwd(), "recipe"
    else:
        path = Path(recipe)
        doc = read_yaml(path, "recipe", RecipeError)
        base, source = path.resolve().parent, str(path)
    if not isinstance(doc, Mapping):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    unknown = set(doc) - KNOWN_KEYS
    if unknown:
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, KNOWN_KEYS, n=1)[0]!r}?)"
                 if difflib.get_close_matches(k, KNOWN_KEYS, n=1) else repr(k) for k in sorted(unknown)]
        raise RecipeError(f"{source}: unknown keys {', '.join(hints)}; known: {', '.join(sorted(SECTIONS | set(OPTIONS)))}")
    for key in ("data", "loss", "output_dir"):
        if doc.get(key) in (None, ""):
            raise RecipeError(f"{source}: missing required key {key!r}")
    if "epochs" not in doc and epochs is None:
        raise RecipeError(f"{source}: missing required key 'epochs'")
    notes = _seeds_notes(doc, source)
    model = _model_spec(doc, base, source)
    quant = _quant_config(doc, base, source)
    data = data_spec(doc["data"], base, source)
    loss = doc["loss"]
    try:
        loss_fn = losses.task_loss(loss)
    except DistillError as err:
        raise RecipeError(f"{source}: loss: {err}") from None
    metric = doc.get("metric") or ("accuracy" if loss_fn is losses.cross_entropy_loss else "psnr")
    if metric not in METRICS:
        raise RecipeError(f"{source}: metric {metric!r} is unknown; known: {', '.join(METRICS)}")
    distill, distill_notes = _distill(doc, base, source)
    options = {key: _option(doc, key, source) for key in OPTIONS if key in doc}
    if epochs is not None:
        options["epochs"] = _option({"epochs": epochs}, "epochs", "--epochs")
    return Recipe(model=model, data=data, loss=loss, output_dir=base / str(doc["output_dir"]), quant=quant,
                  metric=metric, distill=distill, source=source, notes=tuple(notes + distill_notes),
                  input_shape=_input_shape(doc.get("input_shape"), source), **options)


def _input_shape(value: Any, source: str) -> Optional[tuple[int, ...]]:
    """``input_shape: [1, 4, 64, 64]``: the input the checkpoints record for export (the model
    may be trained on smaller crops); default: the shape of one training item."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)):
        raise RecipeError(f"{source}: input_shape must be a list of positive integers, e.g. [1, 4, 64, 64]")
    return tuple(value)
