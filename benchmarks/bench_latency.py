"""Latency at deployment sizes: the low-light network in onnxruntime, fp32 against every int8 form.

    python benchmarks/bench_latency.py [--widths 8,32] [--sizes 256,512] [--threads 1,2] [--repeats 5]

The shipped width (16) uses the shipped QAT checkpoints (qat.pt: 10-bit head/tail, qat_all8.pt: all 8-bit); other
widths the factory's random weights calibrated post-training under the same two configs
(quant.yaml, quant_all8.yaml) on synthetic packed raw: latency does not depend on the weights'
values. Models are exported with ``--dynamic-hw`` (one model for every size), except the nnapi
profile, which fixes the shape. Per (width, size, threads), one input, round-robin:

* fp32: the float model deployq exports beside the int8 one, in both of its forms (the CPU profile's
  ConvTranspose as Conv + DepthToSpace, and ConvTranspose kept), the faster of the two per
  configuration;
* deployq int8 with the 10-bit head/tail (standard QDQ: 16-bit Q/DQ around those layers);
* deployq int8, all 8-bit; and the same exported with ``--device nnapi`` (fixed shapes);
* onnxruntime's ``quantize_static`` (MinMax, QDQ, per-channel s8 weights) of the same float model.

Then onnxruntime's own profiler splits one configuration's time by operator type, and single
convolutions show why the 9–16-bit layers stay float emulation: the only integer convolution of
onnxruntime's CPU provider that returns its int32 accumulator (what an exact wide layer needs) is
``ConvInteger``, timed here against the float ``Conv`` and the 8-bit ``QLinearConv``, with an exact
10-bit-activation form (codes split into a high and a low byte, two ``ConvInteger``, combined in int32).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnxruntime as ort
import torch

import deployq
from benchmarks import common
from deployq.qat.checkpoint import InputSpec
from deployq.examples.lowlight import model as lowlight
from deployq.deploy.devices import DEVICES, Device
from deployq.deploy.export import export
from deployq.qat.loading import forward_arguments, resolve_model
from deployq.core.runtime import load_onnx, session
from onnx import TensorProto, helper, numpy_helper

SCRIPT = "bench_latency.py"
FACTORY = "deployq.examples.lowlight.model:build"
CONFIGS = Path(lowlight.__file__).parent
FP32_KEPT = "fp32, ConvTranspose kept"  # timed with the others; fp32 is the faster float form
CONTENDERS = ("fp32", "int8, 10-bit head/tail", "int8, all 8-bit", "int8, all 8-bit, --device nnapi",
              "quantize_static MinMax")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_lowlight_arguments(parser)
    parser.add_argument("--widths", default="16,32", help="network widths (16: the shipped checkpoints)")
    parser.add_argument("--sizes", default="256,512", help="packed input sides (raw pixels / 2)")
    parser.add_argument("--threads", default="1,2", help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contender per configuration")
    parser.add_argument("--profile", default="32,256", help="WIDTH,SIZE profiled by operator type (1 thread)")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def shipped_width(ckpts: common.LowlightCheckpoints) -> int:
    """The width the given QAT checkpoints were trained at (their factory arguments)."""
    return int(ckpts.float_kwargs.get("width", -1))


def checkpoints(width: int, ckpts: common.LowlightCheckpoints, work: Path) -> dict[str, Path]:
    """{'10-bit': ckpt, 'all8': ckpt} for `width`: the given (shipped) ones at their own width, else
    PTQ-calibrated."""
    if width == shipped_width(ckpts):
        return {"10-bit": ckpts.qat, "all8": ckpts.qat_all8}
    model = lowlight.build(width=width)
    name = forward_arguments(model)[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand((1, 4, 64, 64), generator=gen) * 0.1 for _ in range(2)]
    out = {}
    for key, config in (("10-bit", "quant.yaml"), ("all8", "quant_all8.yaml")):
        qmodel = deployq.prepare(model, batches[0], str(CONFIGS / config))
        deployq.calibrate(qmodel, batches, progress=False)
        out[key] = deployq.save_checkpoint(work / f"w{width}_{key}.pt", qmodel, factory=FACTORY,
                                           factory_kwargs={"width": width}, inputs=[InputSpec(name, (1, 4, 64, 64))])
    return out


def _export(ckpt: Path, out: Path, size: int | None, factory: str | None, device: "str | Device" = "cpu"):
    with common.quiet():
        shape = [(None, (1, 4, size, size))] if size else None
        return export(resolve_model(ckpt=str(ckpt), factory=factory, input_shape=shape), out, dynamic_hw=size is None,
                      device=device, ort_format=False, progress=False)


def models(width: int, sizes: list[int], ckpts: common.LowlightCheckpoints, work: Path) -> dict:
    """{contender: path} per size (the nnapi profile has one model per size, the others one for all)."""
    made = checkpoints(width, ckpts, work)
    factory = ckpts.factory if width == shipped_width(ckpts) else None
    ten = _export(made["10-bit"], work / f"w{width}_10", None, factory)
    all8 = _export(made["all8"], work / f"w{width}_8", None, factory)
    x = np.random.default_rng(0).uniform(0, 0.1, (1, 4, min(sizes), min(sizes))).astype(np.float32)
    static = common.quantize_static_qdq(ten.files["float"], work / f"w{width}_static.onnx", [x], "MinMax")
    kept = _export(made["10-bit"], work / f"w{width}_kept", None, factory, replace(DEVICES["cpu"], block_convtranspose=False))
    shared = {"fp32": ten.files["float"], FP32_KEPT: kept.files["float"], "int8, 10-bit head/tail": ten.files["int8"],
              "int8, all 8-bit": all8.files["int8"], "quantize_static MinMax": static}
    return {size: {**shared, "int8, all 8-bit, --device nnapi":
                   _export(made["all8"], work / f"w{width}_nnapi_{size}", size, factory, "nnapi").files["int8"]}
            for size in sizes}


def profile_by_op(path: Path, x: np.ndarray, work: Path, runs: int = 3) -> Counter:
    """Microseconds per operator type over `runs` calls, by onnxruntime's profiler (1 thread)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(work / path.stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    totals: Counter = Counter()
    for _ in range(runs):
        sess.run(None, {sess.get_inputs()[0].name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            totals[e["args"]["op_name"]] += e["dur"]
    return totals


def _graph(nodes: list, inputs: list, inits: list, out_type: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info("y", out_type, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def conv_forms(cin: int, cout: int, size: int) -> dict[str, tuple[onnx.ModelProto, dict]]:
    """One 3×3 convolution in each form: {name: (model, feed)}."""
    rng = np.random.default_rng(0)
    shape = [1, cin, size, size]
    w8 = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
    q10 = rng.integers(0, 1024, shape).astype(np.uint16)
    u8 = rng.integers(0, 256, shape).astype(np.uint8)
    pads = {"pads": [1, 1, 1, 1]}
    const = lambda v, n: numpy_helper.from_array(np.asarray(v), n)  # noqa: E731
    f32 = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    xu8 = helper.make_tensor_value_info("x", TensorProto.UINT8, shape)
    forms = {
        "float Conv (how 9-16-bit layers run)": (_graph([helper.make_node("Conv", ["x", "w"], ["y"], **pads)], [f32],
                                               [const(w8.astype(np.float32) * 0.01, "w")], TensorProto.FLOAT),
                                                {"x": q10.astype(np.float32) * 0.001}),
        "QLinearConv u8 x s8 (8-bit layers)": (_graph([helper.make_node(
            "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **pads)], [xu8],
            [const(np.float32(0.01), "xs"), const(np.uint8(0), "xz"), const(w8, "w"), const(np.float32(0.01), "ws"),
             const(np.int8(0), "wz"), const(np.float32(0.1), "ys"), const(np.uint8(0), "yz")], TensorProto.UINT8),
            {"x": u8}),
        "ConvInteger u8 x u8 (int32 out)": (_graph([helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], **pads)],
                                                   [xu8], [const((w8.astype(np.int16) + 128).astype(np.uint8), "w"),
                                                           const(np.uint8(0), "xz"), const(np.uint8(128), "wz")],
                                                   TensorProto.INT32), {"x": u8}),
        "ConvInteger u8 x s8 (int32 out)": (_graph([helper.make_node("ConvInteger", ["x", "w"], ["y"], **pads)], [xu8],
                                                   [const(w8, "w")], TensorProto.INT32), {"x": u8}),
    }
    split = [helper.make_node("Cast", ["x"], ["q"], to=TensorProto.INT32),  # 10-bit codes -> high and low byte
             helper.make_node("Div", ["q", "four"], ["hi32"]), helper.make_node("Mul", ["hi32", "four"], ["hi4"]),
             helper.make_node("Sub", ["q", "hi4"], ["lo32"]),
             helper.make_node("Cast", ["hi32"], ["hi"], to=TensorProto.UINT8),
             helper.make_node("Cast", ["lo32"], ["lo"], to=TensorProto.UINT8),
             helper.make_node("ConvInteger", ["hi", "w", "xz", "wz"], ["ahi"], **pads),
             helper.make_node("ConvInteger", ["lo", "w", "xz", "wz"], ["alo"], **pads),
             helper.make_node("Mul", ["ahi", "four"], ["ahi4"]), helper.make_node("Add", ["ahi4", "alo"], ["y"])]
    forms["exact 10-bit x 8-bit: 2 ConvInteger + int32 combine"] = (
        _graph(split, [helper.make_tensor_value_info("x", TensorProto.UINT16, shape)],
               [const(np.int32(4), "four"), const((w8.astype(np.int16) + 128).astype(np.uint8), "w"),
                const(np.uint8(0), "xz"), const(np.uint8(128), "wz")], TensorProto.INT32), {"x": q10})
    return forms


def wide_layer_lines(repeats: int, facts: Optional[dict[str, float]] = None) -> list[str]:
    """Single-convolution timings, and a check that the split form is exact (numpy int64 reference);
    `facts` gets the exact form's time over the float Conv's, at its best over the shapes timed."""
    rows = []
    for cin, cout, size in ((4, 32, 256), (32, 32, 256)):
        forms = conv_forms(cin, cout, size)
        sessions = {name: session(model, optimize=True, threads=1) for name, (model, _) in forms.items()}
        times = common.round_robin({n: (lambda s=s, f=forms[n][1]: s.run(None, f)) for n, s in sessions.items()},
                                   repeats, warmup=1)
        model, feed = forms["exact 10-bit x 8-bit: 2 ConvInteger + int32 combine"]
        got = sessions["exact 10-bit x 8-bit: 2 ConvInteger + int32 combine"].run(None, feed)[0]
        w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.int64) - 128
        want = torch.nn.functional.conv2d(torch.from_numpy(feed["x"].astype(np.float64)),
                                          torch.from_numpy(w.astype(np.float64)), padding=1).numpy()
        exact = np.array_equal(got, np.rint(want).astype(np.int64))
        base = common.median(times["float Conv (how 9-16-bit layers run)"])
        if facts is not None:
            split = common.median(times["exact 10-bit x 8-bit: 2 ConvInteger + int32 combine"]) / base
            facts["exact_wide_conv"] = min(facts.get("exact_wide_conv", math.inf), split)
        for name, t in times.items():
            rows.append([f"{cin}→{cout}, 3×3, {size}×{size}", name, f"{1000 * common.median(t):.2f}",
                         f"{common.median(t) / base:.2f}×", ("yes" if exact else "NO") if name.startswith("exact") else ""])
    return ["Why the 9–16-bit layers stay float emulation: one convolution in each form onnxruntime's CPU provider "
            f"offers, 1 thread, median of {repeats} round-robin runs (time relative to the float Conv; exact: equal "
            "to a numpy int64 convolution of the codes).", "",
            *common.table(["convolution", "form", "ms", "× float Conv", "exact"], rows, "llrrl"), ""]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    ckpts = common.lowlight_checkpoints(args)
    widths, sizes, threads = _ints(args.widths), _ints(args.sizes), _ints(args.threads)
    rows, profiles = [], []
    prof_width, prof_size = _ints(args.profile)
    facts: dict[str, float] = {"width": prof_width, "size": prof_size}
    with tempfile.TemporaryDirectory(prefix="deployq-bench-latency-") as tmp:
        work = Path(tmp)
        for width in widths:
            by_size = models(width, sizes, ckpts, work)
            for size in sizes:
                x = np.random.default_rng(size).uniform(0, 0.1, (1, 4, size, size)).astype(np.float32)
                for n in threads:
                    sessions = {c: session(load_onnx(p), optimize=True, threads=n) for c, p in by_size[size].items()}
                    times = common.round_robin({c: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x}))
                                                for c, s in sessions.items()}, args.repeats, warmup=1)
                    med = {c: common.median(t) for c, t in times.items()}
                    med["fp32"] = min(med["fp32"], med.pop(FP32_KEPT))
                    rows.append([str(width), f"{size}×{size}", str(n), f"{1000 * med['fp32']:.0f}",
                                 *(f"{med['fp32'] / med[c]:.2f}×" for c in CONTENDERS[1:])])
                    if (width, size, n) == (prof_width, prof_size, 1):
                        facts.update(speedup_wide=med["fp32"] / med["int8, 10-bit head/tail"],
                                     speedup_all8=med["fp32"] / med["int8, all 8-bit"],
                                     speedup_nnapi=med["fp32"] / med["int8, all 8-bit, --device nnapi"])
                if width == prof_width and size == prof_size:
                    for c in ("fp32", "int8, 10-bit head/tail", "int8, all 8-bit"):
                        profiles.append((c, profile_by_op(Path(by_size[size][c]), x, work)))
    header = ["width", "packed input", "threads", "fp32 (ms)", *(f"{c}: fp32 / int8" for c in CONTENDERS[1:])]
    lines = ["Speed-up of each int8 model over fp32 (fp32 median / int8 median: above 1 is faster; fp32: the faster "
             "of the exported float model's two forms, ConvTranspose kept or as Conv + DepthToSpace), onnxruntime "
             f"{ort.__version__} CPU provider, fully optimized, batch 1, median of {args.repeats} round-robin runs "
             f"per configuration. Width {shipped_width(ckpts)}: the shipped checkpoints; other widths: the same network and configs "
             "with random weights calibrated post-training.", "", *common.table(header, rows), ""]
    if profiles:
        ops = sorted({op for _, t in profiles for op in t}, key=lambda op: -max(t[op] / sum(t.values()) for _, t in profiles))
        shown = [op for op in ops if max(t[op] / sum(t.values()) for _, t in profiles) >= 0.01]
        lines += [f"Where the time goes (onnxruntime profiler, width {prof_width}, {prof_size}×{prof_size}, 1 thread): "
                  "share of kernel time by operator type (ops under 1 % everywhere left out).", "",
                  *common.table(["op type", *(c for c, _ in profiles)],
                                [[op, *(common.percent(t[op] / sum(t.values()), 1) if t[op] else "" for _, t in profiles)]
                                 for op in shown]), ""]
        wide = dict(profiles).get("int8, 10-bit head/tail")
        if wide:
            facts["wide_float_conv_share"] = wide.get("FusedConv", 0.0) / sum(wide.values())
    lines += wide_layer_lines(max(3, args.repeats), facts)
    return common.Section("latency", "Latency at deployment sizes: int8 forms against fp32",
                          common.command_line(SCRIPT, argv), lines, facts)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
