"""The export job: a deployq model -> model.float.onnx, model.<target>.onnx, qparams.json.

    source (checkpoint, or factory + state_dict + calibration)  ->  config for the target
      -> torch.onnx export of the float graph, quant points named  ->  rewrite passes
      -> files written together, atomically, with a summary

Targets: ``int8`` - the config as trained (8-bit body, special layers at their own bits);
``int16`` - every quant point at 16 bits; ``fp32`` - only the rewritten float model. For CPUs
without VNNI (docs/design.md, contract 5): ``act_signed`` gives s8 activations (the same grid, zero point
shifted by 128 - exact), ``weight_bits=7`` narrows the 8-bit weights so u8×s8 products cannot
saturate int16.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

from deployq.core import qparams as qp
from deployq.qat.config import LayerOverride, QConfig
from deployq.exporters.graph import PassLog
from deployq.exporters.rewriter import Rewritten, rewrite
from deployq.deploy.float_graph import export_float
from deployq.qat.checkpoint import save as save_checkpoint
from deployq.qat.fake_quant import native_kernels_where_built
from deployq.deploy.devices import DEVICE_KEY, DEVICES, Coverage, Device, check_config, coverage, device as get_device, fix_shapes, learned_float, to_ort_format
from deployq.deploy.refined_graph import with_values_of
from deployq.core.files import AtomicOutputs, json_text
from deployq.qat.loading import ModelSource
from deployq.qat.capture import EXPORT, ONNX_FIXED
from deployq.qat.prepare import capture_notes, prepare, quant_points
from deployq.ptq.pipeline import (ZEROQ, PTQOptions, better_of_equalization, equalized, quantize_post_training,
                                  zeroq_feeds)
from deployq.core.progress import end_stage, stage
from deployq.qat.calibrate import qparams_of, set_mode
from deployq.core.qformula import qparams_from_range, qrange
from deployq.core.runtime import max_opset, session

TARGETS = ("int8", "int16", "fp32")
MIN_OPSET = 21


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    records: dict[str, qp.QuantPoint]
    target: str
    seconds: float
    log: PassLog
    qmodel: fx.GraphModule
    float_model: onnx.ModelProto
    quant_model: Optional[onnx.ModelProto]
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    coverage: list[Coverage] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: path.stat().st_size for name, path in self.files.items()}


def target_config(config: QConfig, target: str, weight_bits: Optional[int] = None,
                  act_signed: bool = False) -> QConfig:
    """The config the exported model follows: the trained one, all-16-bit, or narrowed for VNNI."""
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "int16":
        config = replace(config, layers=config.layers + (LayerOverride("*", {"bits": 16}, {"bits": 16}),))
    if weight_bits is not None:
        config = replace(config, weight=config.weight.updated({"bits": weight_bits}))
    if act_signed:
        config = replace(config, activation=config.activation.updated({"signed": True}),
                         input={**config.input, "signed": True})
    return config


def convert_qparams(rec: qp.QuantPoint, bits: int, signed: bool, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Qparams for a new code width / signedness covering the same range as `rec`.

    A signedness change at the same width and affine scheme keeps the grid: same scale, zero point
    shifted by the offset of the ranges (exact). Anything else keeps the represented range
    [(qmin − zp)·s, (qmax − zp)·s] and recomputes the scale for the new width.
    """
    qmin, qmax = qrange(bits, signed)
    if bits == rec.bits and not symmetric and not rec.symmetric:
        zero_point = rec.zero_point_array + (qmin - rec.qmin)
        return rec.scale_array, zero_point
    s, zp = rec.scale_array.astype(np.float64), rec.zero_point_array.astype(np.float64)
    return qparams_from_range((rec.qmin - zp) * s, (rec.qmax - zp) * s, qmin, qmax, symmetric, rec.name)


def _convert_all(model: fx.GraphModule, old: dict[str, qp.QuantPoint]) -> None:
    """Give every quant point of `model` the qparams of `old`, converted where its width or
    signedness changed (observer-driven weights follow their weights and need none)."""
    for name, point in quant_points(model).items():
        q = model.get_submodule(point.quantizer)
        if point.kind == "weight" and q.weights_follow_observer:
            continue
        rec, spec = old[name], point.spec
        if (rec.bits, rec.signed) == (spec.bits, spec.signed):
            q.set_qparams(rec.scale_array, rec.zero_point_array)
        else:
            q.set_qparams(*convert_qparams(rec, spec.bits, spec.signed, spec.symmetric))


Calibration = Union[str, Sequence[Any], None]  # a path (what --calib takes), "zeroq", or batches


@dataclass
class Prepared:
    """What an export quantizes (`model`) and what its float ONNX model is exported from
    (`reference`: the model before AdaRound / bias correction changed its float parameters)."""

    model: fx.GraphModule
    reference: fx.GraphModule
    notes: list[str] = field(default_factory=list)


def prepare_for_target(source: ModelSource, target: str, *, weight_bits: Optional[int] = None,
                       act_signed: bool = False, calib: Calibration = None, calib_limit: int = 100,
                       ptq: PTQOptions = PTQOptions(), progress: bool = True) -> Prepared:
    """The quantized torch model whose quant points the exported QDQ graph reproduces."""
    config = target_config(source.config, target, weight_bits, act_signed)
    if calib is None:
        if ptq.methods:
            raise ValueError(f"--ptq {','.join(ptq.methods)} is post-training quantization: it needs --calib DATA "
                             f"(or --calib {ZEROQ})")
        if not source.calibrated:
            raise ValueError("the model has no calibrated qparams: pass --calib DATA (a folder of raw "
                             "files, images, or .npy/.npz) to calibrate it (post-training quantization)")
        model = source.with_config(config)
        if model is not source.qmodel:
            _convert_all(model, qparams_of(source.qmodel))
            set_mode(model, "quantize")
        return Prepared(model.eval(), model)
    float_model, notes = equalized(source.float_model, source.example_inputs(), ptq)
    batches = calibration_batches(source, float_model, calib, calib_limit, progress)
    model = source.with_config(config)
    if float_model is not source.float_model:  # CLE stays only where the quantized model gains by it
        stage("ptq: checking cross-layer equalization against the model as it was", progress)
        equalized_model = prepare(float_model, source.example_inputs(), config)
        keep, undone = better_of_equalization(model, equalized_model, batches, limit=calib_limit)
        model, notes = (equalized_model, notes) if keep else (model, notes + [undone])
    result = quantize_post_training(model, batches, ptq, limit=calib_limit, progress=progress)
    return Prepared(result.model.eval(), (result.reference or result.model).eval(), notes + result.notes)


def calibration_batches(source: ModelSource, float_model: torch.nn.Module, calib: Calibration, limit: int,
                        progress: bool) -> list:
    """The calibration inputs: read from a path, synthesized (``zeroq``), or given."""
    shapes = [(i.name, i.shape) for i in source.inputs]
    if isinstance(calib, str) and calib == ZEROQ:
        return zeroq_feeds(float_model, shapes, limit, progress=progress)
    if isinstance(calib, (str, Path)):
        from deployq.calib.data import load_feeds

        feeds = load_feeds(calib, shapes, limit=limit)
        return [{name: torch.from_numpy(a) for name, a in f.items()} for f in feeds]
    batches = [calib] if isinstance(calib, (torch.Tensor, np.ndarray)) else list(calib)
    return [torch.from_numpy(b) if isinstance(b, np.ndarray) else b for b in batches][:limit]


def calibration_text(calib: Calibration) -> Optional[str]:
    """How the model was calibrated, for the checkpoint's notes."""
    if calib is None or isinstance(calib, (str, Path)):
        return None if calib is None else str(calib)
    return "batches given in Python"


def export(source: ModelSource, out_dir: str | Path, *, target: str = "int8", opset: int = MIN_OPSET,
           weight_bits: Optional[int] = None, act_signed: bool = False, calib: Calibration = None,
           calib_limit: int = 100, ptq: PTQOptions = PTQOptions(), dynamic_hw: bool = False, device: str | Device = "cpu",
           ort_format: bool = True,
           output_names: Optional[list[str]] = None, progress: bool = True) -> ExportResult:
    """Export `source` for `target` into `out_dir`; nothing is written unless everything succeeds.
    `dynamic_hw`: height and width of 4-D inputs stay symbolic (fully convolutional models).
    `device`: a profile of :mod:`deployq.deploy.devices` (constraints, exact rewrites); the provider
    coverage of the result is measured for every device. `ort_format`: also write the ORT-format
    model and the required-operators config of a reduced onnxruntime build. `output_names`: names
    for the models' outputs, in order (the quant point names inside stay as they are)."""
    start = time.perf_counter()
    dev = get_device(device)
    _check_options(source, dev, opset, weight_bits, dynamic_hw)
    ptq_notes: list[str] = []
    if target == "fp32":
        qmodel, reference, records = source.qmodel.eval(), source.qmodel, None
    else:
        stage("export: preparing the model for its target" + (" and calibrating" if calib is not None else ""),
              progress)
        with native_kernels_where_built():  # the same values, faster (fake_quant says how much)
            prepared = prepare_for_target(source, target, weight_bits=weight_bits, act_signed=act_signed,
                                          calib=calib, calib_limit=calib_limit, ptq=ptq, progress=progress)
        qmodel, reference, ptq_notes = prepared.model, prepared.reference, prepared.notes
        records = qparams_of(qmodel)
        check_config(dev, records.values())
    result = _onnx_models(qmodel, reference, records, source, dev, opset, dynamic_hw, output_names, progress)
    deployed = result.quant_model if result.quant_model is not None else result.float_model
    if not dev.takes_qdq and result.quant_model is not None:
        deployed = learned_float(result.float_model, result.quant_model)
    stage("export: loading the models in onnxruntime", progress)
    for model in {id(m): m for m in (result.float_model, result.quant_model, deployed) if m is not None}.values():
        model.metadata_props.add(key=DEVICE_KEY, value=dev.name)  # read back by `check` on the .ort file
        session(model, optimize=False, label=f"the exported model (opset {opset})")  # what is published, loads
    stage("export: measuring NNAPI / CoreML coverage (onnxruntime's usability checker)", progress)
    covered, why = coverage(deployed)
    checkpoint = None
    if (calib is not None or qmodel is not source.qmodel) and source.factory:  # calibrated here, or re-quantized
        # (a model given in Python without a factory cannot be rebuilt from a checkpoint)
        checkpoint = lambda tmp: save_checkpoint(  # noqa: E731
            tmp, qmodel, factory=source.factory, factory_kwargs=source.factory_kwargs, inputs=source.inputs,
            meta={"exported_for": target, "calibration": calibration_text(calib), "ptq": list(ptq.methods)})
    out_dir = Path(out_dir)
    files = _write(out_dir, result, deployed, records, target, dev, ort_format, checkpoint, progress)
    notes = (capture_notes(qmodel) + ptq_notes + list(result.log.notes)
             + ([f"provider coverage not measured: {why}"] if why else []) + _stale_files(out_dir, files))
    if progress:
        end_stage()
    return ExportResult(out_dir, files, records or {}, target, time.perf_counter() - start, result.log,
                        qmodel, result.float_model, result.quant_model, notes, dev.name, covered)


def _check_options(source: ModelSource, dev: Device, opset: int, weight_bits: Optional[int], dynamic_hw: bool) -> None:
    """Options that cannot work together, refused before any work."""
    if dynamic_hw and dev.fixed_shapes:
        raise ValueError(f"--device {dev.name} needs fixed input shapes: drop --dynamic-hw and give the "
                         "deployment size with --input-shape")
    if not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"--opset must be from {MIN_OPSET} (16-bit QuantizeLinear needs opset 21) to {max_opset()} "
                         f"(the newest this onnx {onnx.__version__} and onnxruntime {ort.__version__} both run), "
                         f"got {opset}")
    if weight_bits is not None and not 2 <= weight_bits <= 16:
        raise ValueError(f"--weight-bits must be from 2 to 16, got {weight_bits}")
    capture = source.qmodel.get_submodule("act_quant").capture
    if dynamic_hw and capture == EXPORT:
        raise ValueError("--dynamic-hw needs a model symbolic torch.fx can trace: this one was captured with "
                         "torch.export, which fixes height and width at the example input's (see the note of "
                         "`deployq inspect`); export at a fixed --input-shape, or keep the module fx stops at "
                         "whole with --leaf")
    if dynamic_hw and capture == ONNX_FIXED:
        raise ValueError("--dynamic-hw: this ONNX model computes with sizes read from its input's shape (an "
                         "anchor grid, a reshape), which deployq folds at the --input-shape given; export at a "
                         "fixed --input-shape")


def _onnx_models(qmodel: torch.nn.Module, reference: torch.nn.Module, records: Optional[dict], source: ModelSource,
                 dev: Device, opset: int, dynamic_hw: bool, output_names: Optional[list[str]],
                 progress: bool) -> Rewritten:
    """The float and QDQ models: traced, rewritten for the device, shapes fixed and outputs named
    where asked. The float model is the one from before AdaRound / bias correction changed the
    parameters (`reference`), the model users compare against."""
    examples = tuple(i.example() for i in source.inputs)
    stage("export: tracing the model (torch.export -> ONNX)", progress)
    original = export_float(reference, examples, opset, dynamic_hw)
    float_onnx = original
    if reference is not qmodel:  # AdaRound / bias correction changed values, not the graph
        float_onnx = (with_values_of(original, reference, qmodel, examples)
                      or export_float(qmodel, examples, opset, dynamic_hw))
    stage("export: rewriting (fold BN, insert Q/DQ)", progress)
    result = rewrite(float_onnx, records, opset, block_convtranspose=dev.block_convtranspose,
                     carry_bits=dev.carry_bits)
    if reference is not qmodel:
        float_model = rewrite(original, records, opset, block_convtranspose=dev.block_convtranspose).float_model
        result = replace(result, float_model=float_model)
    for model in (result.float_model, result.quant_model):
        if model is not None and dev.fixed_shapes:
            fix_shapes(model, {i.name: tuple(i.shape) for i in source.inputs})
        if model is not None and output_names is not None:
            name_outputs(model, output_names)
    return result


def _write(out_dir: Path, result: Rewritten, deployed: onnx.ModelProto, records: Optional[dict], target: str,
           dev: Device, ort_format: bool, checkpoint: Optional[Callable[[Path], None]],
           progress: bool) -> dict[str, Path]:
    """Every file of the export, all renamed into place together (or none)."""
    files = {"float": out_dir / "model.float.onnx"}
    deployed_name = deployed_file_name(target, dev.name)
    with AtomicOutputs() as out:
        out.write_bytes(files["float"], result.float_model.SerializeToString())
        if deployed_name == dev.name:
            files[dev.name] = out_dir / f"model.{dev.name}.onnx"
            out.write_bytes(files[dev.name], deployed.SerializeToString())
        if ort_format:
            stage("export: converting to ORT format", progress)
            ort_bytes, operators = to_ort_format(deployed, dev)
            files["ort"] = out_dir / f"model.{deployed_name}.ort"
            out.write_bytes(files["ort"], ort_bytes)
            files["operators"] = out_dir / f"model.{deployed_name}.required_operators.config"
            out.write_bytes(files["operators"], operators)
        if result.quant_model is not None:
            files[target] = out_dir / f"model.{target}.onnx"
            out.write_bytes(files[target], result.quant_model.SerializeToString())
            files["qparams"] = out_dir / "qparams.json"
            out.write_text(files["qparams"], json_text(qp.dump(records.values())))
            if checkpoint is not None:
                files["checkpoint"] = out_dir / f"model.{target}.pt"
                out.write(files["checkpoint"], checkpoint)
    return files


def _stale_files(out_dir: Path, files: dict[str, Path]) -> list[str]:
    """A note naming the files an earlier export left in `out_dir` that this one did not write."""
    others = ([out_dir / f"model.{t}.{ext}" for t in TARGETS if t != "fp32" for ext in ("onnx", "pt")]
              + [out_dir / f"model.{n}.onnx" for n in DEVICES]
              + [out_dir / f"model.{n}.{ext}" for n in (*TARGETS, "float", *DEVICES)
                 for ext in ("ort", "required_operators.config")] + [out_dir / "qparams.json"])
    stale = [p.name for p in others if p.exists() and p not in files.values()]
    return [f"{out_dir} also holds {', '.join(stale)} from an earlier export, not from this one"] if stale else []


def name_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph outputs `names`, in order (in place): each old output feeds an Identity
    named for the new one, so every tensor inside keeps its name (onnxruntime removes the Identity)."""
    outputs = list(model.graph.output)
    if len(names) != len(outputs):
        raise ValueError(f"--output-names gives {len(names)} names; the model has {len(outputs)} outputs "
                         f"({', '.join(o.name for o in outputs)})")
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    clash = [n for n, o in zip(names, outputs) if n != o.name and n in taken]
    if len(set(names)) != len(names) or clash or not all(names):
        raise ValueError(f"--output-names must be distinct, non-empty and not names of tensors inside the model"
                         f"{f' (taken: {clash[0]!r})' if clash else ''}")
    for name, out in zip(names, outputs):
        if name == out.name:
            continue
        model.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name], name=f"{name}_output"))
        renamed = onnx.ValueInfoProto()
        renamed.CopyFrom(out)
        renamed.name = name
        out.CopyFrom(renamed)


def deployed_file_name(target: str, device: str) -> str:
    """NAME of the model.NAME.onnx a device runs (and of its .ort): the QDQ model, the float model
    for --target fp32, or for CoreML (no Q/DQ) the float graph with the learned weights."""
    if target == "fp32":
        return "float"
    return target if get_device(device).takes_qdq else device


def export_json(result: ExportResult) -> dict:
    """What an export wrote and measured, for ``deployq export --json``."""
    return {"out_dir": str(result.out_dir), "target": result.target, "device": result.device,
            "seconds": round(result.seconds, 2),
            "files": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in result.files.items()},
            "quant_points": {kind: {str(b): n for b, n in sorted(c.items())}
                             for kind, c in bit_width_summary(result.records).items()},
            "rewriter": dict(sorted(result.log.counts.items())),
            "coverage": [c.to_json() for c in result.coverage], "notes": result.notes}


def bit_width_summary(records: dict[str, qp.QuantPoint]) -> dict[str, Counter]:
    """Quant points by kind and width, e.g. {'activation': {8: 30, 10: 6}, 'weight': {...}}."""
    summary: dict[str, Counter] = {}
    for r in records.values():
        summary.setdefault("activation" if r.kind == "input" else r.kind, Counter())[r.bits] += 1
    return summary
