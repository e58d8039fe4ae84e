"""The Python API: one function per command, taking the command's options by the same names.

    import deployq
    result = deployq.export(qmodel, example, "build/")                      # a QAT model in memory
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=batches)
    print(report.verdict()); report.worst(5); open("diff.html", "w").write(report.to_html())
    parity = deployq.check(qmodel, result.files["int8"], inputs=batches)
    assert parity.ok()

| command           | functions here                                  |
|-------------------|-------------------------------------------------|
| deployq export    | :func:`load_model` (the model options), :func:`export` |
| deployq diff      | :func:`diff`                                    |
| deployq check     | :func:`check`                                   |
| deployq inspect   | :func:`load_model`, :func:`inspect`             |
| deployq hessian   | :func:`load_model`, :func:`hessian`, :func:`write_distill` |
| deployq train     | :func:`train`                                   |
| deployq run       | :func:`run`, :func:`latency`                    |

Every CLI option is a parameter of one of its command's functions, with the same name and the
default read from the signature here (``deployq.cli.common.api_option``); the CLI only parses,
calls these and prints what they return. docs/api.md describes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch
from torch import fx, nn

from deployq.qat.checkpoint import InputSpec
from deployq.qat.config import load_config
from deployq.verify.diff import diff as _diff
from deployq.verify.stats import DiffReport
from deployq.verify.match import match_inputs
from deployq.verify.positions import names_differ
from deployq.deploy.export import ExportResult, export as _export
from deployq.qat.loading import ModelSource, forward_arguments, resolve_model
from deployq.verify.check import FormatAgreement, ParityReport, check_parity, compare_ort_format
from deployq.qat.prepare import ACT_QUANT, prepare
from deployq.qat.calibrate import is_calibrated
from deployq.ptq.pipeline import PTQOptions
from deployq.calib.feeds import file_feeds, shape_from_files
from deployq.core.runtime import InputInfo, ModelFileError, check_same_inputs, inputs_of, is_ort_format, load_onnx, random_feeds, with_shapes
from deployq.exporters.graph import quantize_count
from deployq.core.progress import stage
from deployq.core.qparams import QuantPoint
from deployq.qat.prepare import capture_notes, quant_points
from deployq.train.batches import PIXELS, bounded_inputs, data_batches
from deployq.train.distill import DistillConfig
from deployq.train.hessian import DEFAULT_MAX_ITER, DEFAULT_TOL, hessian_traces
from deployq.train.hessian_report import HessianReport, write_distill_config
from deployq.train.loop import train
from deployq.infer.engine import Bench, bench, load_engine
from deployq.infer.files import enhance

ModelLike = Union[nn.Module, str, Path, ModelSource]
OnnxLike = Union[onnx.ModelProto, str, Path]
Inputs = Union[str, Path, Iterable, None]  # a file or folder, or batches (arrays / tensors / dicts of them)


def _is_prepared(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and hasattr(model, ACT_QUANT)


def _as_tuple(example: object) -> tuple[torch.Tensor, ...]:
    items = example if isinstance(example, (tuple, list)) else (example,)
    return tuple(torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t) for t in items)


def _source(model: ModelLike, example_inputs: object, config: object) -> ModelSource:
    """A ModelSource for a float ONNX file, a checkpoint path, a model prepared by deployq, or a float model."""
    if isinstance(model, ModelSource):
        if example_inputs is not None or config is not None:
            raise ValueError("a loaded model carries its inputs and config: pass neither example_inputs nor config")
        return model
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        examples = _as_tuple(example_inputs) if example_inputs is not None else ()
        if len(examples) > 1:
            raise ValueError("example_inputs of an ONNX model give one input's shape; for a model with several "
                             "inputs use the CLI's --input-shape NAME:N,C,H,W, or fixed sizes in the file")
        return resolve_model(onnx_file=model, config=config,
                             input_shape=[(None, tuple(examples[0].shape))] if examples else None)
    if isinstance(model, (str, Path)):
        if example_inputs is not None or config is not None:
            raise ValueError("a checkpoint carries its inputs and config: pass neither example_inputs nor config")
        return resolve_model(ckpt=str(model))
    if example_inputs is None:
        raise ValueError("example_inputs are needed to trace and export an nn.Module (a tensor, or a tuple of them)")
    examples = _as_tuple(example_inputs)
    names = forward_arguments(model)
    if len(names) != len(examples):
        raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}); example_inputs has {len(examples)}")
    inputs = [InputSpec(n, tuple(t.shape)) for n, t in zip(names, examples)]
    if _is_prepared(model):
        if config is not None:
            raise ValueError("the model is already prepared with its config; pass config only with a float model")
        qconfig = model.get_submodule(ACT_QUANT).config
        calibrated = is_calibrated(model)
        return ModelSource(model, model, inputs, "", {}, qconfig, calibrated)
    qconfig = load_config(config)
    return ModelSource(prepare(model, examples, qconfig), model, inputs, "", {}, qconfig, False)


def export(model: ModelLike, example_inputs: object = None, out_dir: Union[str, Path] = "deployq-out", *,
           config: object = None, calib: Inputs = None, calib_limit: int = 100,
           ptq: Union[Sequence[str], PTQOptions] = (),
           target: str = "int8", device: str = "cpu", opset: int = 21, dynamic_hw: bool = False,
           ort_format: bool = True, weight_bits: Optional[int] = None, act_signed: bool = False,
           output_names: Optional[Sequence[str]] = None, adaround_iterations: int = PTQOptions.adaround_iterations,
           refine_samples: int = PTQOptions.refine_samples, search_samples: int = PTQOptions.search_samples,
           bias_shrink: float = PTQOptions.bias_shrink, progress: bool = False) -> ExportResult:
    """Export to ``out_dir``: model.float.onnx, model.<target>.onnx, qparams.json (and the ORT file).

    `model`: a model from :func:`deployq.qat.prepare` (calibrated or trained), a float ``nn.Module``
    (post-training quantization: give `calib`, and `config` if not the default), the path of a
    float ONNX model (``*.onnx``: imported as ``deployq export --onnx`` does; `example_inputs` gives
    its input shape where the file leaves sizes symbolic), the path of a deployq checkpoint, or
    what :func:`load_model` returns (what the CLI passes). `calib`: a folder or file of inputs (what ``--calib`` takes), or an iterable
    of batches (tensors, or tuples of tensors for several inputs), or ``"zeroq"`` (inputs synthesized
    from the model's BatchNorm statistics). `ptq`: post-training methods to apply with the
    calibration, a subset of ("cle", "search", "adaround", "bias"), with their budgets
    `adaround_iterations`, `refine_samples`, `search_samples` and `bias_shrink` (or a
    :class:`deployq.ptq.pipeline.PTQOptions` holding methods and budgets).
    `calib_limit`, `target`, `device`, `opset`, `dynamic_hw`, `ort_format`, `weight_bits`,
    `act_signed` and `output_names` are ``deployq export``'s options of the same names (``--help``).
    Nothing is written unless everything succeeds.
    """
    source = _source(model, example_inputs, config)
    prepared = source.qmodel is model
    if prepared and calib is not None:  # the caller's trained qparams are never overwritten
        raise ValueError("the model is already prepared: calibrate it with deployq.calibrate() (or train it), "
                         "then export it without calib")
    if prepared and target == "int16":
        raise ValueError("target='int16' prepares the float model again at 16 bits: pass the float model "
                         "(with calib) or a checkpoint path instead of a prepared one")
    if calib is not None and not isinstance(calib, (str, Path)):
        calib = _batches(calib)
    return _export(source, out_dir, target=target, opset=opset, calib=calib, calib_limit=calib_limit,
                   ptq=ptq if isinstance(ptq, PTQOptions) else PTQOptions(tuple(ptq), adaround_iterations,
                                                                          refine_samples, search_samples,
                                                                          bias_shrink),
                   dynamic_hw=dynamic_hw,
                   device=device, ort_format=ort_format, weight_bits=weight_bits, act_signed=act_signed,
                   output_names=list(output_names) if output_names else None, progress=progress)


def load_model(*, ckpt: Optional[str] = None, factory: Optional[str] = None, model_kwargs: Optional[dict] = None,
               onnx_file: Optional[Union[str, Path]] = None, config: Optional[str] = None, input_shape=None,
               leaf: Sequence[str] = ()) -> ModelSource:
    """The model the CLI's model options name (``--ckpt``, ``--model``, ``--model-kwargs``,
    ``--onnx``, ``--config``, ``--input-shape``, ``--leaf``), prepared, for :func:`export`."""
    return resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                         factory_kwargs=model_kwargs, leaf_modules=leaf, onnx_file=onnx_file)


def _batches(data: object) -> list:
    """Batches from an iterable of them; one tensor or array is one batch."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return [data]
    return list(data)


def _onnx(model: OnnxLike) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "the model"
    return load_onnx(model), str(model)


def _given_batches(inputs: Inputs) -> bool:
    return inputs is not None and not isinstance(inputs, (str, Path))


def _file_shapes(inputs: Inputs, infos: list[InputInfo]) -> Optional[list[tuple[str, tuple[int, ...]]]]:
    """A one-input model with symbolic dimensions (a --dynamic-hw export) read from files: the
    shape of the first file at its own size (None: the model's shapes are fixed, or not files)."""
    if not isinstance(inputs, (str, Path)) or len(infos) != 1 or not infos[0].free:
        return None
    return [(infos[0].name, shape_from_files(inputs, infos[0]))]


def _feeds(inputs: Inputs, infos: list[InputInfo], random: int, ranges: Mapping[str, tuple[float, float]],
           ratio: Optional[float] = None, limit: Optional[int] = None) -> list[dict[str, np.ndarray]]:
    """Input feeds: from files, from given batches, or `random` uniform ones over the input's range."""
    if inputs is None:
        return list(random_feeds(infos, random, ranges=dict(ranges)))
    if isinstance(inputs, (str, Path)):
        return file_feeds(str(inputs), infos, ratio=ratio, limit=limit)
    feeds = []
    names = [i.name for i in infos]
    for batch in _batches(inputs):
        if isinstance(batch, Mapping):
            arrays = {k: np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        else:
            items = batch if isinstance(batch, (tuple, list)) else (batch,)
            arrays = {n: np.asarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t) for n, t in zip(names, items)}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"a batch of inputs lacks {', '.join(missing)}: the model takes {', '.join(names)} "
                             "(give a tuple in that order, or a dict by name)")
        feeds.append({i.name: arrays[i.name].astype(i.dtype) for i in infos})
        if limit is not None and len(feeds) >= limit:
            break
    if not feeds:
        raise ValueError("inputs gave no batch")
    return feeds


def diff(float_onnx: OnnxLike, quant_onnx: OnnxLike, inputs: Inputs = None, *, mode: str = "accumulated",
         random: int = 4, points: Optional[Sequence[str]] = None, input_shapes=None, ratio: Optional[float] = None,
         limit: int = 16, progress: bool = False) -> DiffReport:
    """Compare a float ONNX model with its quantized (QDQ) model, quant point by quant point.

    `inputs`: a file or folder (raw, images, .npy/.npz), batches (arrays, tensors, or dicts by input
    name), or None for `random` uniform inputs over each input's quantized range. `mode`:
    accumulated, local, sensitivity or kernel (``deployq diff --help``). `points`: globs of the quant
    points to report. Returns a :class:`~deployq.verify.stats.DiffReport` (``.verdict()``, ``.worst(k)``,
    ``.to_json()``, ``.to_html()``).
    """
    (float_model, float_name), (quant_model, quant_name) = _onnx(float_onnx), _onnx(quant_onnx)
    if quantize_count(float_model) and not quantize_count(quant_model):
        raise ModelFileError(f"the models are swapped: the first, {float_name}, is the quantized one (it has "
                             f"QuantizeLinear nodes) and the second, {quant_name}, is float; give the float model first")
    if not quantize_count(quant_model):
        raise ModelFileError(f"{quant_name} has no QuantizeLinear: it is not a quantized (QDQ) model")
    # another tool's export names its tensors, inputs too, its own way: diff pairs them by position
    by_order = names_differ(float_model, quant_model)
    infos = check_same_inputs(float_model, quant_model, float_name, quant_name, by_order=by_order)
    if not _given_batches(inputs):  # batches carry their own shapes; files and random inputs need them
        infos = with_shapes(infos, input_shapes or _file_shapes(inputs, infos), where="--input-shape (input_shapes)")
    ranges = match_inputs(quant_model)
    if by_order:
        ranges = {f.name: ranges[q.name] for f, q in zip(infos, inputs_of(quant_model)) if q.name in ranges}
    feeds = _feeds(inputs, infos, random, ranges, ratio, limit)
    report = _diff(float_model, quant_model, feeds, mode=mode, points=list(points) if points else None,
                   progress=progress)
    report.title = f"deployq diff: {quant_name}"
    return report


def check(model: ModelLike, onnx_model: OnnxLike, inputs: Inputs = None, *, random: int = 4, local: bool = True,
          factory: Optional[str] = None, input_shapes=None, progress: bool = False) -> ParityReport:
    """Torch fake-quant vs onnxruntime (reference view) in integer codes at every quant point.

    `model`: a model from :func:`deployq.qat.prepare` (calibrated or trained) or a checkpoint path
    (`factory` as ``--model`` if its factory is not deployq's). `onnx_model`: its QDQ export, or the
    ORT-format file beside it (then its outputs are also compared with the .onnx's: the report's
    ``ort_format``). `local`: each torch quantizer continues from onnxruntime's codes. `input_shapes`:
    ``[(name, shape), ...]`` for a model with symbolic height and width when `inputs` are files or random.
    """
    ort_path = None
    if not isinstance(onnx_model, onnx.ModelProto) and is_ort_format(onnx_model):
        ort_path, onnx_model = str(onnx_model), Path(onnx_model).with_suffix(".onnx")
        if not onnx_model.is_file():
            raise ModelFileError(f"{ort_path}: an ORT-format file has no intermediate tensors to compare; check "
                                 f"reads them from the ONNX model it was converted from, expected at {onnx_model}")
    if isinstance(model, (str, Path)):
        source = resolve_model(ckpt=str(model), factory=factory)
        qmodel, names, shapes = source.qmodel, [i.name for i in source.inputs], {i.name: i.shape for i in source.inputs}
    elif _is_prepared(model):
        qmodel, names, shapes = model, forward_arguments(model), {}
    else:
        raise ValueError("check takes a model from deployq.prepare (calibrated or trained) or a checkpoint path")
    quant, name = _onnx(onnx_model)
    if not quantize_count(quant):
        raise ModelFileError(f"{name} has no QuantizeLinear: check compares the model with its quantized (QDQ) "
                             "export (model.<target>.onnx), not with the float model")
    infos = inputs_of(quant)
    if [i.name for i in infos] != names:
        raise ModelFileError(f"{name} takes inputs {[i.name for i in infos]}, the torch model {names}")
    if not _given_batches(inputs):  # the checkpoint's shapes, else input_shapes, for symbolic dimensions
        given = input_shapes or [(i.name, shapes[i.name]) for i in infos if i.free and i.name in shapes] or \
            _file_shapes(inputs, infos)
        infos = with_shapes(infos, given, where="--input-shape (input_shapes)")
    feeds = _feeds(inputs, infos, random, match_inputs(quant))
    report = check_parity(qmodel, quant, [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds], local=local,
                          progress=progress)
    report.onnx, report.ort_format = name, (compare_ort_format(quant, ort_path, feeds) if ort_path else None)
    report.ort_path = ort_path
    return report


@dataclass
class Inspection:
    """What ``deployq inspect`` lists: every quant point a model gets, and how its graph was captured."""

    points: dict[str, QuantPoint]
    capture: str  # "fx", "torch.export", "onnx", ... (deployq.qat.capture)
    notes: list[str]  # what capture and placement did that a user should know

    def to_json(self) -> list[dict]:
        return [{"name": p.name, "kind": p.kind, "op": p.op, **p.spec.to_dict(), "input": p.input}
                for p in self.points.values()]


def inspect(model: ModelLike, example_inputs: object = None, *, config: object = None) -> Inspection:
    """The quant points of `model` (what :func:`export` takes: a float module with `example_inputs`
    and `config`, a prepared one, a checkpoint or ONNX path, or :func:`load_model`'s result)."""
    source = _source(model, example_inputs, config)
    return Inspection(quant_points(source.qmodel), source.qmodel.get_submodule(ACT_QUANT).capture,
                      capture_notes(source.qmodel))


def hessian(model: ModelLike, data: Inputs, *, layers: Optional[Sequence[str]] = None, tol: float = DEFAULT_TOL,
            max_iter: int = DEFAULT_MAX_ITER, limit: int = 8, batch_size: int = 4, loss: str = "auto",
            mode: str = "float", seed: int = 0, estimator: str = "shared", refine: int = 8,
            pixels: int = PIXELS, progress: bool = False) -> HessianReport:
    """Rank the activations of `model` by the Hessian trace of the loss (Hutchinson), for distillation.

    `model`: :func:`load_model`'s result, a checkpoint path, or a prepared or plain module (then
    `data` must be batches). `data`: input files (a file or folder, read in the model's input
    shapes, cut to about `pixels` per sample where the model runs on smaller ones), a YAML dataset
    or recipe (its train split, with targets), or batches (dicts with 'input' and 'target',
    (input, target) pairs, or input tensors); at most `limit` batches.
    `layers`: globs of the activations to trace (default all). The rest are ``deployq hessian``'s
    options of the same names. :func:`write_distill` writes the distillation config.
    """
    if isinstance(model, nn.Module):
        qmodel, specs = model, None
    else:
        source = _source(model, None, None)
        qmodel, specs = source.qmodel, source.inputs
    if isinstance(data, (str, Path)):
        if specs is None:
            raise ValueError("data as files needs the model's input shapes: pass load_model()'s result or a "
                             "checkpoint path, or pass batches")
        specs, cut = bounded_inputs(qmodel, specs, pixels)
        batches, what = data_batches(data, specs, batch_size, limit, seed=seed)
        what += cut
    else:
        batches = _batches(data)[:limit]
        what = f"{len(batches)} batches given"
    how = f"{estimator} estimator" + (f", the top {refine} again per-layer" if estimator == "shared" and refine else "")
    stage(f"hessian: {what}; a layer stops when its standard error is at most {tol:g} of its mean, or after "
          f"{max_iter} samples ({how})", progress)
    return hessian_traces(qmodel, batches, list(layers) if layers else None, loss=loss, mode=mode, tol=tol,
                          max_iter=max_iter, seed=seed, progress=progress, estimator=estimator, refine=refine)


def write_distill(report: HessianReport, out: Union[str, Path] = "distill.yaml", *, top: int = 3,
                  coeff: float = 1.0) -> DistillConfig:
    """Write the `top` layers of `report` (weights ∝ Tr(H)/n, summing to `coeff`) to `out` as a
    distillation config (a recipe's ``distill:`` section), atomically. A report whose top layers
    cannot be weighted is a ``DistillError`` (a ValueError) and nothing is written."""
    return write_distill_config(report, out, top, coeff)


def run(model: Union[str, Path], inputs: Sequence[Union[str, Path]], out_dir: Union[str, Path] = "deployq-run", *,
        ratio: Optional[float] = None, threads: Optional[int] = None, tile: Optional[int] = None,
        overlap: Optional[int] = None, batch: int = 4, say: Callable[[str], None] = print) -> list[Path]:
    """Enhance raw camera files (or folders of them, or packed .npy arrays) with an ONNX or ORT-format
    model: one sRGB PNG per input in `out_dir`, all or none. The options are ``deployq run``'s."""
    return enhance(str(model), [str(i) for i in inputs], str(out_dir), ratio=ratio, threads=threads, tile=tile,
                   overlap=overlap, batch=batch, say=say)


def latency(model: Union[str, Path], runs: int, *, batch: int = 4, threads: Optional[int] = None) -> Bench:
    """``deployq run --bench``: the latency of `runs` calls of `batch` tiles (``.percentiles()``)."""
    return bench(load_engine(str(model), threads), runs, batch=batch)


__all__ = ["export", "load_model", "diff", "check", "inspect", "hessian", "write_distill", "train", "run", "latency",
           "ExportResult", "DiffReport", "ParityReport", "FormatAgreement", "Inspection"]
