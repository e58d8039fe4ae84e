"""deployq train: quantization-aware training with feature distillation, from a recipe.

    float model + float weights ─ prepare ─► student (QAT GraphModule)
      ─ calibrate once (~100 batches; merged over ranks) ─► initial scales
      ─ epochs of  L_task + Σ_i λ_i·MSE(teacher_i, student_i)  ─ metric on val every epoch
      ─► best.pt / last.pt (deployq checkpoints), metrics.csv / metrics.json, state.pt (resume)

The thesis' rules are built in: QAT starts from the float weights (``model.weights`` is
required), calibration runs once, and the teacher is the float model (fake-quantized with the
student's calibrated qparams when ``quant_teacher`` is set). Every recipe error (a missing key,
a distillation layer the model does not have, data that does not fit the model) is raised
before the first training step.

A recipe (YAML; relative paths are relative to the recipe's folder)::

    model:
      factory: deployq.examples.zoo:unet      # package.module:function, imported because you named it
      kwargs: {width: 8}
      weights: float.pth                      # plain state_dict (the seeds: load_model)
    quant_config: quant.yaml                  # path or inline mapping; native or the seeds' form
    data:
      kind: synthetic_lowlight                # | npz | tensors (Python only)
      size: 64
      ratios: [100, 250, 300]
      train: {length: 512}
      val: {length: 32}
    loss: lowlight                            # l1 | mse | cross_entropy | lowlight | pkg.mod:function
    metric: psnr                              # psnr | accuracy (default: accuracy for cross_entropy)
    distill:
      layers: {DBF.DBF_conv9.lrelu_dup1: 0.35, DBLE.dual_conv9.lrelu_dup1: 0.35}
      quant_teacher: false
    optimizer: adam                           # | sgd (momentum)
    lr: 1.0e-4
    epochs: 20
    batch_size: 4
    calibration_batches: 100
    freeze_bn_epoch: 15                       # BN statistics frozen from this epoch on (1-based)
    compile: true                             # the quantizers' backward through torch.compile (~8x faster; false: eager)
    input_shape: [1, 4, 64, 64]               # recorded for export (default: one training item)
    output_dir: runs/qat

The seeds' keys are read too: ``load_model``, ``load_teacher_model``, ``config_file_path``,
``extra_quantizer_dict``, ``distill_config``, ``distill_coeff``, ``output_layer_list``,
``quant_teacher``, ``batch_size``; their other keys (``gpu_id``, ``debug``, ...) are ignored with a
note. Under ``torchrun --nproc_per_node=N`` the same recipe runs with DistributedDataParallel;
only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Subset,
)

from deployq import checkpoint as ck
from deployq import distill as dst
from deployq import distributed as dd
from deployq import qparams as qp
from deployq.config import ConfigError, QConfig, load_config
from deployq.config import from_dict as qconfig_from_dict
from deployq.files import AtomicOutputs, json_text, read_yaml
from deployq.prepare import prepare
from deployq.progress import progress_bar
from deployq.qat import calibrate, freeze_bn_stats, load_qparams, qparams_of, set_mode
from deployq.quantizers import use_compiled_kernels
from deployq.registry import Registry

STATE_FORMAT, STATE_VERSION = "deployq-train-state", 1
CHECKPOINTS = ("best.pt", "last.pt")
STATE_FILE = "state.pt"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the recipe file and the key."""


# ------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class Metric:
    """A validation metric: ``fn(output, batch) -> (sum, count)``, averaged as Σsum / Σcount."""

    name: str
    fn: Callable[[Any, dst.Batch], tuple[float, int]]
    higher_is_better: bool = True
    unit: str = ""


METRICS: Registry[Metric] = Registry("metric")


def _psnr(output: Any, batch: dst.Batch) -> tuple[float, int]:
    """PSNR = 10·log10(1 / MSE) per image, the prediction clamped to [0, 1] (the thesis' metric)."""
    if "target" not in batch:
        raise dst.DistillError(f"psnr needs 'target' in every batch; the data gives {sorted(batch)}")
    pred, target = dst.first_output(output), batch["target"]
    if pred.shape != target.shape:
        raise dst.DistillError(f"psnr: output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    mse = (pred.clamp(0, 1) - target).square().flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).sum()), int(mse.numel())


def _accuracy(output: Any, batch: dst.Batch) -> tuple[float, int]:
    """Share of samples whose arg-max class is the target."""
    if "target" not in batch:
        raise dst.DistillError(f"accuracy needs 'target' in every batch; the data gives {sorted(batch)}")
    logits, target = dst.first_output(output), batch["target"]
    if logits.ndim < 2 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise dst.DistillError(f"accuracy: logits {tuple(logits.shape)} do not fit targets {tuple(target.shape)}")
    return float((logits.argmax(1) == target).sum()), int(target.numel())


METRICS.register("psnr")(Metric("psnr", _psnr, True, " dB"))
METRICS.register("accuracy")(Metric("accuracy", _accuracy, True))


# ------------------------------------------------------------------------------------ data


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


@DATASETS.register("synthetic_lowlight")
def synthetic_lowlight(spec: DataSpec, split: str) -> Dataset:
    """``deployq.calib.synthetic.SyntheticLowLight(size, length, split, ratios, seed)``; a split's
    value is a mapping of those options (or just its length)."""
    from deployq.calib.synthetic import SyntheticLowLight

    value = spec.split(split)
    options = {"length": value} if isinstance(value, int) and not isinstance(value, bool) else value
    where = f"{spec.source}: data.{split}"
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}: expected a mapping like {{length: 256}} or a length")
    args = {**spec.common, **options}
    unknown = set(args) - {"size", "length", "ratios", "seed"}
    if unknown:
        raise RecipeError(f"{where}: unknown synthetic_lowlight options {sorted(unknown)}; known: length, ratios, seed, size")
    if "ratios" in args:
        args["ratios"] = tuple(args["ratios"])
    return SyntheticLowLight(split=split, **args)


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


def build_dataset(spec: DataSpec, split: str) -> Dataset:
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
    if kind not in DATASETS:
        close = difflib.get_close_matches(kind, list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{source}: data.kind {kind!r} is unknown; known: {', '.join(DATASETS)}.{hint}")
    return DataSpec(kind, common, section["train"], section["val"], base, source)


# ------------------------------------------------------------------------------------ recipe


@dataclass(frozen=True)
class ModelSpec:
    factory: str
    kwargs: Mapping[str, Any]
    weights: Path


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
    compile: bool = True  # the quantizers' backward through torch.compile (deployq.quantizers.use_compiled_kernels)
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
        raise RecipeError(f"{source}: missing required key 'model' (factory, kwargs, weights)")
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
    except dst.DistillError as err:
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
        loss_fn = dst.task_loss(loss)
    except dst.DistillError as err:
        raise RecipeError(f"{source}: loss: {err}") from None
    metric = doc.get("metric") or ("accuracy" if loss_fn is dst.cross_entropy_loss else "psnr")
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


# ------------------------------------------------------------------------------ model set-up


def load_float_weights(model: nn.Module, path: Path, factory: str) -> None:
    """Load a plain float state_dict (``torch.load(weights_only=True)``), strictly."""
    payload = ck.read_payload(path)
    if ck.is_checkpoint(payload):
        raise RecipeError(
            f"{path} is a deployq checkpoint (already quantized); QAT starts from the float model's "
            "state_dict. To continue a QAT run use --resume."
        )
    try:
        ck.load_weights(model, ck.plain_state_dict(payload, path), str(path), f"the model {factory} builds")
    except ck.CheckpointError as err:
        raise RecipeError(str(err)) from None


def build_float_model(spec: ModelSpec, weights: Optional[Path] = None) -> nn.Module:
    """The user's float model (their factory, named in their recipe) with float weights."""
    build = ck.import_factory(spec.factory, allowed=True)
    model = ck.call_factory(build, spec.factory, spec.kwargs, "the recipe")
    load_float_weights(model, weights or spec.weights, spec.factory)
    return model.eval()


def collate(items: Sequence[Any]) -> dst.Batch:
    return dst.as_batch(torch.utils.data.default_collate(list(items)))


def check_data_fits(model: nn.Module, datasets: Mapping[str, Dataset], loss: dst.TaskLoss, metric: Metric,
                    recipe: Recipe) -> None:
    """Run the float model on the first item of each split and score it, so that data that does
    not fit the model fails here, naming the split and the shapes."""
    for split, dataset in datasets.items():
        where = f"{recipe.source}: data.{split}"
        try:
            batch = collate([dataset[0]])
        except (dst.DistillError, TypeError, RuntimeError) as err:
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
        except (dst.DistillError, ValueError, RuntimeError, KeyError, IndexError) as err:
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


def build_models(recipe: Recipe, datasets: Mapping[str, Dataset], loss: dst.TaskLoss, metric: Metric,
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
    except dst.DistillError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    teacher_weights = Path(recipe.distill.teacher_weights) if recipe.distill.teacher_weights else None
    teacher_float = build_float_model(recipe.model, teacher_weights) if teacher_weights else float_model
    teacher = dst.Teacher(prepare(teacher_float, (example,), recipe.quant).to(device), names)
    return Models(student, student_net, teacher, inputs)


# ------------------------------------------------------------------------------------ running


@dataclass
class TrainResult:
    model: fx.GraphModule  # the student after the last epoch (calibrated, quantize mode)
    history: list[dict[str, Any]]
    best_value: Optional[float]
    best_epoch: Optional[int]
    output_dir: Path
    is_main: bool
    notes: tuple[str, ...] = ()

    @property
    def checkpoints(self) -> dict[str, Path]:
        return {name.removesuffix(".pt"): self.output_dir / name for name in CHECKPOINTS}


def _to(batch: dst.Batch, device: torch.device) -> dst.Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train_loader(dataset: Dataset, recipe: Recipe, ctx: dd.Context, epoch: int) -> DataLoader:
    """Shuffled with a seed per epoch (so resumed runs see the same order); sharded over ranks."""
    if ctx.distributed:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=recipe.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(recipe.seed + epoch))
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=recipe.num_workers,
                      collate_fn=collate)


def _optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _output_state(recipe: Recipe, resume: bool) -> Optional[dict[str, Any]]:
    """The saved training state when resuming; refuses to overwrite a run without --resume."""
    path = recipe.output_dir / STATE_FILE
    if not resume:
        if path.exists():
            raise RecipeError(f"{recipe.output_dir} already holds a run ({STATE_FILE}); pass --resume to "
                              "continue it, or choose another output_dir")
        return None
    if not path.is_file():
        raise RecipeError(f"nothing to resume: {path} does not exist")
    state = ck.read_payload(path)
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and state.get("version") == STATE_VERSION):
        raise RecipeError(f"{path} is not a deployq training state (version {STATE_VERSION})")
    if state["epoch"] >= recipe.epochs:
        raise RecipeError(f"{path}: the run already has {state['epoch']} epochs and the recipe asks for "
                          f"{recipe.epochs}; pass --epochs N with N > {state['epoch']} to train more")
    return state


@dataclass
class _Objective:
    loss: dst.TaskLoss
    distill: Optional[dst.DistillationLoss]
    teacher: Optional[dst.Teacher]

    def __call__(self, net: nn.Module, batch: dst.Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total, task, {layer: unweighted MSE}) of one batch."""
        if self.teacher is None:
            task = self.loss(net(batch["input"]), batch)
            return task, task, {}
        output, features = net(batch["input"])
        task = self.loss(output, batch)
        _, teacher_features = self.teacher(batch["input"])
        terms = self.distill.terms(features, teacher_features)
        total = task + sum(self.distill.weights[n] * t for n, t in terms.items())
        return total, task, terms


def _train_epoch(net: nn.Module, objective: _Objective, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 ctx: dd.Context, epoch: int, recipe: Recipe, progress: bool) -> dict[str, float]:
    net.train()
    layers = list(objective.distill.weights) if objective.distill else []
    sums = np.zeros(3 + len(layers))  # samples, total, task, per-layer terms
    description = f"epoch {epoch}/{recipe.epochs}"
    for step, batch in enumerate(progress_bar(loader, description, enabled=progress and ctx.is_main), 1):
        batch = _to(batch, ctx.device)
        total, task, terms = objective(net, batch)
        if not torch.isfinite(total):
            raise RuntimeError(f"the training loss is {float(total)} at epoch {epoch}, step {step}; "
                               f"lower lr (now {recipe.lr:g}) or check the data")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        n = batch["input"].shape[0]
        values = [total, task] + [terms[name] for name in layers]
        sums += n * np.array([1.0] + [v.item() for v in values])
    sums = dd.all_reduce_sums(sums.tolist(), ctx)
    samples = max(sums[0], 1.0)
    record = {"loss": sums[1] / samples, "task_loss": sums[2] / samples}
    record["distill_loss"] = record["loss"] - record["task_loss"]
    record.update({f"distill/{name}": sums[3 + i] / samples for i, name in enumerate(layers)})
    return record


def evaluate(model: nn.Module, dataset: Dataset, metric: Metric, loss: dst.TaskLoss, ctx: dd.Context,
             batch_size: int) -> tuple[float, float]:
    """(metric, task loss) over the whole dataset: each rank scores its shard, sums are reduced."""
    was_training = model.training
    model.eval()
    loader = DataLoader(Subset(dataset, dd.shard(len(dataset), ctx)), batch_size=batch_size, collate_fn=collate)
    value_sum, count, loss_sum, samples = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = _to(batch, ctx.device)
            output = model(batch["input"])
            s, c = metric.fn(output, batch)
            n = batch["input"].shape[0]
            value_sum, count = value_sum + s, count + c
            loss_sum, samples = loss_sum + float(loss(output, batch)) * n, samples + n
    model.train(was_training)
    value_sum, count, loss_sum, samples = dd.all_reduce_sums([value_sum, count, loss_sum, samples], ctx)
    return value_sum / max(count, 1), loss_sum / max(samples, 1)


def _better(value: float, best: Optional[float], metric: Metric) -> bool:
    if best is None:
        return True
    return value > best if metric.higher_is_better else value < best


def _csv(history: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
    return out.getvalue()


def _write_epoch(recipe: Recipe, models: Models, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]],
                 best: tuple[Optional[float], Optional[int]], is_best: bool, teacher_qparams: Optional[dict]) -> None:
    """Publish last.pt (+ best.pt), state.pt, metrics.csv and metrics.json together, atomically."""
    epoch = history[-1]["epoch"]
    meta = {"epoch": epoch, "metric": recipe.metric, "value": history[-1][recipe.metric],
            "recipe": recipe.source, "best_epoch": best[1]}

    def save_checkpoint(tmp: str) -> None:
        ck.save(tmp, models.student, factory=recipe.model.factory, factory_kwargs=dict(recipe.model.kwargs),
                inputs=models.inputs, meta=meta)

    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "best_value": best[0],
             "best_epoch": best[1], "history": history, "optimizer": optimizer.state_dict(),
             "model": {k: v.detach().cpu() for k, v in models.student.state_dict().items()},
             "teacher_qparams": teacher_qparams}
    summary = {"recipe": recipe.source, "metric": recipe.metric, "higher_is_better": METRICS.get(recipe.metric).higher_is_better,
               "best": {"epoch": best[1], "value": best[0]}, "epochs": history}
    out_dir = recipe.output_dir
    with AtomicOutputs() as out:
        out.write(out_dir / "last.pt", save_checkpoint)
        if is_best:
            out.write(out_dir / "best.pt", save_checkpoint)
        out.write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
        out.write_text(out_dir / "metrics.csv", _csv(history))
        out.write_text(out_dir / "metrics.json", json_text(summary, indent=2))


def _restore(state: dict[str, Any], models: Models, optimizer_factory: Callable[[], torch.optim.Optimizer],
             recipe: Recipe) -> torch.optim.Optimizer:
    path = recipe.output_dir / STATE_FILE
    try:
        models.student.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RecipeError(f"{path} does not fit this recipe's model: {str(err).splitlines()[0]}") from None
    set_mode(models.student, "quantize")
    if models.teacher is not None and recipe.distill.quant_teacher:
        if not state.get("teacher_qparams"):
            raise RecipeError(f"{path} has no teacher qparams, but the recipe sets quant_teacher")
        _quantize_teacher(models.teacher, qp.load(state["teacher_qparams"]))
    optimizer = optimizer_factory()
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise RecipeError(f"{path}: the optimizer state does not fit this recipe ({err})") from None
    return optimizer


def _quantize_teacher(teacher: dst.Teacher, records: dict[str, qp.QParams]) -> None:
    load_qparams(teacher.model, records)
    set_mode(teacher.model, "quantize")


def train(recipe: str | Path | Mapping[str, Any] | Recipe, *, resume: bool = False, epochs: Optional[int] = None,
          progress: bool = True, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Run a recipe (see the module docstring): QAT from the float weights with distillation.

    Works alone or under ``torchrun`` (one process per device; DDP). `resume` continues the run
    in the recipe's output_dir (model, optimizer, epoch, best metric); `epochs` overrides the
    recipe's. `log` receives one line per event on rank 0.
    """
    recipe = load_recipe(recipe, epochs=epochs)
    ctx = dd.init()
    say = log if (log is not None and ctx.is_main) else (lambda line: None)
    try:
        return _run(recipe, resume, progress, ctx, say)
    finally:
        dd.shutdown(ctx)


def _run(recipe: Recipe, resume: bool, progress: bool, ctx: dd.Context, say: Callable[[str], None]) -> TrainResult:
    torch.manual_seed(recipe.seed)
    torch.set_flush_denormal(True)  # Adam's tiny second moments turn denormal: ~16x slower on CPUs
    use_compiled_kernels(recipe.compile)
    for note in recipe.notes:
        say(note)
    state = _output_state(recipe, resume)
    loss = dst.task_loss(recipe.loss)
    metric = METRICS.get(recipe.metric)
    datasets = {split: build_dataset(recipe.data, split) for split in ("train", "val")}
    models = build_models(recipe, datasets, loss, metric, ctx.device)
    params = [p for p in models.student.parameters() if p.requires_grad]

    def make_optimizer() -> torch.optim.Optimizer:
        return _optimizer(recipe, params)

    teacher_qparams = None
    if state is None:
        per_rank = math.ceil(recipe.calibration_batches / ctx.world_size)
        seen = calibrate(models.student, _train_loader(datasets["train"], recipe, ctx, 0), max_batches=per_rank,
                         device=ctx.device, progress=progress and ctx.is_main, reduce=dd.all_reduce_observers)
        say(f"calibrated on {seen} batches per rank x {ctx.world_size} rank(s) (observers merged)")
        if models.teacher is not None and recipe.distill.quant_teacher:
            records = qparams_of(models.student)
            _quantize_teacher(models.teacher, records)
        optimizer = make_optimizer()
        history: list[dict[str, Any]] = []
        best: tuple[Optional[float], Optional[int]] = (None, None)
        start = 1
    else:
        optimizer = _restore(state, models, make_optimizer, recipe)
        history, best, start = list(state["history"]), (state["best_value"], state["best_epoch"]), state["epoch"] + 1
        say(f"resuming {recipe.output_dir} after epoch {state['epoch']} (best {recipe.metric} {best[0]})")
    if models.teacher is not None and recipe.distill.quant_teacher:
        teacher_qparams = qp.dump(qparams_of(models.teacher.model).values())
    net: nn.Module = models.student_net
    if ctx.distributed:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(models.student_net, device_ids=device_ids)
    objective = _Objective(loss, dst.DistillationLoss(recipe.distill.weights) if recipe.distill else None,
                           models.teacher)
    for epoch in range(start, recipe.epochs + 1):
        t0 = perf_counter()
        if recipe.freeze_bn_epoch is not None and epoch >= recipe.freeze_bn_epoch:
            freeze_bn_stats(models.student)
        loader = _train_loader(datasets["train"], recipe, ctx, epoch)
        record = {"epoch": epoch, **_train_epoch(net, objective, optimizer, loader, ctx, epoch, recipe, progress)}
        dd.broadcast_buffers(models.student, ctx)
        value, val_loss = evaluate(models.student, datasets["val"], metric, loss, ctx, recipe.batch_size)
        record.update({"val_loss": val_loss, recipe.metric: value})
        is_best = _better(value, best[0], metric)
        if is_best:
            best = (value, epoch)
        record.update({"best": is_best, "lr": optimizer.param_groups[0]["lr"], "seconds": perf_counter() - t0})
        history.append(record)
        if ctx.is_main:
            _write_epoch(recipe, models, optimizer, history, best, is_best, teacher_qparams)
        say(f"epoch {epoch}/{recipe.epochs}  loss {record['loss']:.4g} (task {record['task_loss']:.4g}, "
            f"distill {record['distill_loss']:.4g})  val {recipe.metric} {value:.4g}{metric.unit}"
            f"{'  best' if is_best else ''}  {record['seconds']:.1f} s")
        dd.barrier(ctx)
    return TrainResult(models.student, history, best[0], best[1], recipe.output_dir, ctx.is_main, recipe.notes)
