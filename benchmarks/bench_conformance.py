"""Conformance: deployq on the architectures users bring, against onnxruntime's own quantizer.

    python benchmarks/bench_conformance.py [--models resnet18,vit_b_16] [--size 96]

For every model (torchvision, random weights, BatchNorm statistics of photographs; see
``deployq.examples.torchvision_models``), with the same calibration crops for both tools and
held-out crops (other photographs) for every number:

* deployq post-training export at int8 (`deployq export --model ... --calib ...`) and its time;
* ``check``: the largest code difference between torch fake-quant and onnxruntime (reference view);
* pairing: the int16 export's lowest ``diff --mode local`` row (every row compares a quant point
  with itself, so at 16 bits every row is far above 50 dB);
* output SQNR of the fully optimized int8 graph against the float graph, for deployq and for
  ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, MinMax) on deployq's
  float graph; top-1 agreement with float for the classifiers;
* integer layers in the optimized graph, and int8 / fp32 latency (round-robin, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import torch

from benchmarks import common
from deployq.verify.diff import diff
from deployq.examples import torchvision_models as tvm
from deployq.deploy.export import export
from deployq.qat.loading import resolve_model
from deployq.verify.check import check_parity
from deployq.core.runtime import load_onnx, session
from deployq.exporters.graph import base_name, quantized_tensor

SCRIPT = "bench_conformance.py"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_y_400mf", "mnasnet0_5", "googlenet", "densenet121",
          "convnext_tiny", "vit_b_16", "swin_t", "lraspp_mobilenet_v3_large"]
FACTORY = "deployq.examples.torchvision_models:build"


@dataclass
class Row:
    model: str
    points: int
    export_s: float
    check_lsb: int
    pairing_db: float
    deployq_db: float
    static_db: float
    deployq_top1: Optional[float]
    static_top1: Optional[float]
    integer_layers: tuple[int, int]
    fp32_ms: float
    int8_ms: float
    shared: tuple[int, int] = (0, 0)  # activation tensors both tools quantize, of deployq's
    scale_gap: float = math.nan  # largest relative difference of their scales
    error: str = ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="torchvision models, comma-separated")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--calib", type=int, default=32, help="calibration crops (both tools)")
    parser.add_argument("--eval", type=int, default=16, help="held-out crops every number is measured on")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each model")
    return parser.parse_args(argv)


def sqnr_db(reference: list[np.ndarray], values: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r.astype(np.float64)).sum()) for r in reference)
    noise = sum(float(np.square(r.astype(np.float64) - v).sum()) for r, v in zip(reference, values))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def outputs(path: Path, feeds: list[dict[str, np.ndarray]], optimize: bool = True) -> list[list[np.ndarray]]:
    """Every output of the fully optimized model (fused integer kernels) for every input; with
    ``optimize=False``, of the model as written (QDQ computed in float: the semantics, on any CPU)."""
    sess = session(load_onnx(path), optimize=optimize)
    return [sess.run(None, f) for f in feeds]


def top1(reference: list[list[np.ndarray]], values: list[list[np.ndarray]]) -> Optional[float]:
    """Share of inputs whose first output's argmax agrees; None unless that output is class scores (N, K)."""
    first = reference[0][0]
    if first.ndim != 2 or first.shape[1] < 2:
        return None
    same = [np.argmax(r[0], 1) == np.argmax(v[0], 1) for r, v in zip(reference, values)]
    return float(np.mean(np.concatenate(same)))


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """{quantized tensor: scale} of a QDQ model's per-tensor QuantizeLinear nodes (names as diff reads them)."""
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in initializers:
            continue
        scale = onnx.numpy_helper.to_array(initializers[node.input[1]])
        if scale.ndim == 0:
            scales[base_name(quantized_tensor(node, producers, initializers)[0])] = float(scale)
    return scales


def measure(name: str, args: argparse.Namespace, work: Path) -> Row:
    size = args.size
    kwargs = {"name": name, **({"image_size": size} if name.startswith("vit") else {})}
    model = tvm.with_photo_statistics(tvm.build(**kwargs), size)
    torch.save(model.state_dict(), work / "state.pt")
    calib = tvm.photo_crops(args.calib, size, seed=10).numpy()
    np.save(work / "calib.npy", calib)
    held_out = tvm.photo_crops(args.eval, size, held_out=True, seed=20).numpy()
    shape = (1, 3, size, size)
    with common.quiet():
        source = resolve_model(ckpt=str(work / "state.pt"), factory=FACTORY, factory_kwargs=kwargs, input_shape=shape)
        result, export_s = common.timed(lambda: export(source, work / "int8", calib=str(work / "calib.npy"),
                                                       calib_limit=args.calib, progress=False))
        wide_source = resolve_model(ckpt=str(work / "state.pt"), factory=FACTORY, factory_kwargs=kwargs, input_shape=shape)
        wide = export(wide_source, work / "int16", target="int16", calib=str(work / "calib.npy"),
                      calib_limit=args.calib, progress=False)
    name_in = result.quant_model.graph.input[0].name
    feeds = [{name_in: x[None]} for x in held_out]
    parity = check_parity(result.qmodel, result.quant_model, [torch.from_numpy(f[name_in]) for f in feeds[:4]])
    pairing = diff(wide.float_model, wide.quant_model, [{name_in: x[None]} for x in calib[:2]], mode="local",
                   progress=False)
    static = common.quantize_static_qdq(result.files["float"], work / "static.onnx", [x[None] for x in calib], "MinMax")
    reference = outputs(result.files["float"], feeds)
    ours, theirs = outputs(result.files["int8"], feeds), outputs(static, feeds)
    flat = [o for out in reference for o in out]
    ops = common.optimized_ops(result.files["int8"], 1, work)
    integer = sum(ops[o] for o in common.INTEGER_LAYERS)
    sessions = {kind: session(load_onnx(p), optimize=True, threads=1)
                for kind, p in (("fp32", result.files["float"]), ("int8", result.files["int8"]))}
    times = common.round_robin({kind: (lambda s=s: s.run(None, feeds[0])) for kind, s in sessions.items()},
                               args.repeats, warmup=2)
    ours_scales, theirs_scales = activation_scales(result.quant_model), activation_scales(onnx.load(str(static)))
    common_names = [n for n in ours_scales if n in theirs_scales]
    gap = max((abs(ours_scales[n] - theirs_scales[n]) / theirs_scales[n] for n in common_names), default=math.nan)
    return Row(name, len(result.records), export_s, parity.max_lsb,
               min(r.stats.sqnr_db for r in pairing.rows),
               sqnr_db(flat, [o for out in ours for o in out]), sqnr_db(flat, [o for out in theirs for o in out]),
               top1(reference, ours), top1(reference, theirs),
               (integer, integer + sum(ops[o] for o in common.FLOAT_LAYERS)),
               common.median(times["fp32"]) * 1000, common.median(times["int8"]) * 1000,
               (len(common_names), len(ours_scales)), gap)


def failed(name: str, err: Exception) -> Row:
    nan = math.nan
    return Row(name, 0, nan, -1, nan, nan, nan, None, None, (0, 0), nan, nan, error=common.error_text(err))


def cells(r: Row) -> list[str]:
    if r.error:
        return [r.model, "**fails**: " + r.error] + [""] * 11
    pct = (lambda v: "-" if v is None else f"{100 * v:.0f}%")
    return [r.model, str(r.points), "yes", str(r.check_lsb), f"{r.pairing_db:.1f}", f"{r.deployq_db:.2f}",
            f"{r.static_db:.2f}", f"{r.shared[0]}/{r.shared[1]}, {r.scale_gap:.0e}",
            f"{pct(r.deployq_top1)} / {pct(r.static_top1)}",
            f"{r.integer_layers[0]}/{r.integer_layers[1]}", f"{r.fp32_ms / r.int8_ms:.2f}×", f"{r.export_s:.1f}"]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(tvm.MODELS))
    if unknown:
        raise common.BenchmarkError(f"unknown models {unknown}; known: {', '.join(tvm.MODELS)}")
    rows = []
    with common.torch_threads(1):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"bench_conformance.{name}.") as tmp:
                try:
                    rows.append(measure(name, args, Path(tmp)))
                except Exception as err:  # a model that fails is a row of the table, not the end of the run
                    rows.append(failed(name, err))
            print(json.dumps({"model": name, **{k: str(v) for k, v in rows[-1].__dict__.items()}}), file=sys.stderr)
    body = common.table(
        ["model", "quant points", "export", "check max LSB", "int16 local: lowest row (dB)",
         "int8 output SQNR: deployq (dB)", "quantize_static (dB)", "same tensors, scale gap",
         "top-1 = float: deployq / quantize_static", "integer layers", "fp32 / int8 latency", "export (s)"],
        [cells(r) for r in rows], "lrlrrrrrrrrr")
    ok = [r for r in rows if not r.error]
    ahead = sum(r.deployq_db >= r.static_db - 0.05 for r in ok)
    notes = [
        "",
        f"{len(ok)} of {len(rows)} models export, check and diff. deployq's int8 output SQNR is at or above "
        f"quantize_static's (within 0.05 dB) on {ahead} of {len(ok)}. Inputs {args.size}×{args.size}; "
        f"calibration: {args.calib} crops of the photographs inside scikit-image other than "
        f"{', '.join(tvm.HELD_OUT_PHOTOS)}; every number on {args.eval} crops of those two. Weights are random "
        "(torchvision's initialisation, ViT's zero head drawn at random) with BatchNorm statistics of the "
        "calibration photographs, so SQNR measures the quantization, not a task. *check max LSB*: torch "
        "fake-quant vs onnxruntime's reference view, local, on 4 held-out crops. *int16 local*: each row is "
        "one quant point's own error at 16 bits, on 2 calibration crops; a mis-paired row would be far below 50 dB. "
        "*int8 output SQNR*: the fully optimized int8 graph against the float graph, all outputs. "
        "quantize_static: QDQ, per-channel s8 weights, u8 activations, MinMax, on deployq's float graph with "
        "the same calibration crops. *same tensors, scale gap*: how many of deployq's per-tensor activation "
        "quant points quantize_static quantizes too (by tensor name), and the largest relative difference of "
        "their scales: where every point is shared and the gap is ~1e-5 (float arithmetic of the two "
        "calibration passes), the two int8 models are the same model, and a few hundredths of a dB between "
        "them is noise of these random-weight networks, not a property of either tool. *integer layers*: Conv / MatMul / Gemm that onnxruntime runs as integer "
        f"kernels in the optimized graph, of all. Latency: batch 1, 1 thread, median of {args.repeats} "
        "round-robin runs, fp32 / int8 (above 1: int8 is faster).",
    ]
    return common.Section("conformance", "Conformance: torchvision architectures, deployq vs quantize_static",
                          common.command_line(SCRIPT, argv), body + notes)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
