"""Scale: how export and diff time grow with model depth.

    python benchmarks/bench_scale.py [--depths 10,50,100,200]

A plain stack of `depth` × (3×3 Conv + ReLU), 8 channels (``benchmarks.models:conv_stack``),
PTQ-calibrated and saved as a deployq checkpoint, then timed at every depth (median of repeats):

* ``deployq export`` end to end, and its two stages alone: the torch.onnx export of the float
  graph with named quant points, and the rewrite passes (fold BN, insert Q/DQ);
* ``deployq diff`` in the accumulated mode (both whole models, every quant point read) and in the
  kernel mode (one fully optimized sub-model per quant point: quadratic in depth by design).

The curve is the result: time per layer at each depth, the marginal time per added layer, and
the exponent k of a power-law fit t ∝ depth^k.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import torch

from benchmarks import common
from deployq.verify.diff import diff
from deployq.verify.match import match_inputs
from deployq.deploy.export import MIN_OPSET, ExportResult
from deployq.exporters.rewriter import rewrite
from deployq.deploy.float_graph import export_float
from deployq.exporters.torch_export import clear_export_cache
from deployq.core.runtime import inputs_of, random_feeds

SCRIPT = "bench_scale.py"
FACTORY = "benchmarks.models:conv_stack"
STAGES = ("export", "torch.onnx stage", "rewrite stage", "diff accumulated", "diff kernel")


@dataclass
class Point:
    depth: int
    quant_points: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> median seconds


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="10,50,100,200", help="numbers of Conv+ReLU layers, comma-separated")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="input side")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each stage at each depth")
    parser.add_argument("--diff-batches", type=int, default=4, help="random inputs diff compares on")
    parser.add_argument("--no-kernel", action="store_true", help="skip the kernel-mode diff")
    return parser.parse_args(argv)


def measure(depth: int, args: argparse.Namespace, work: Path) -> Point:
    """Median seconds of every stage for the `depth`-layer stack. The first end-to-end export and
    the first torch.onnx stage are the first samples of their stages (their results feed the
    others); then the stages run round-robin."""
    shape = (1, 3, args.size, args.size)
    gen = torch.Generator().manual_seed(depth)
    kwargs = {"depth": depth, "channels": args.channels}
    ckpt = common.calibrated_checkpoint(work / f"stack{depth}.pt", FACTORY, kwargs, shape,
                                        [torch.rand(shape, generator=gen) for _ in range(2)])
    out = work / f"stack{depth}"
    examples = (torch.zeros(shape),)

    def export_stage() -> ExportResult:
        return common.export_checkpoint(ckpt, out, factory=FACTORY)

    def torch_stage() -> onnx.ModelProto:
        clear_export_cache()  # timed from scratch, not from the export before
        with common.quiet():
            return export_float(result.qmodel, examples, MIN_OPSET)

    result, export_first = common.timed(export_stage)
    float_onnx, torch_first = common.timed(torch_stage)
    feeds = list(random_feeds(inputs_of(result.quant_model), args.diff_batches, ranges=match_inputs(result.quant_model)))
    again = common.round_robin({"export": export_stage, "torch.onnx stage": torch_stage}, args.repeats - 1, warmup=0)
    contenders = {
        "rewrite stage": lambda: rewrite(float_onnx, result.records, MIN_OPSET),
        "diff accumulated": lambda: diff(result.float_model, result.quant_model, feeds, progress=False),
    }
    if not args.no_kernel:
        contenders["diff kernel"] = lambda: diff(result.float_model, result.quant_model, feeds, mode="kernel",
                                                 progress=False)
    times = {"export": [export_first] + again["export"], "torch.onnx stage": [torch_first] + again["torch.onnx stage"],
             **common.round_robin(contenders, args.repeats, warmup=0)}
    return Point(depth, len(result.records), {stage: common.median(t) for stage, t in times.items()})


def power_law_exponent(depths: list[int], seconds: list[float]) -> float:
    """k of the least-squares fit log t = k log depth + c (1: linear, 2: quadratic)."""
    if len(depths) < 2:
        return math.nan
    return float(np.polyfit(np.log(depths), np.log(seconds), 1)[0])


def growth_lines(points: list[Point], stages: list[str]) -> list[str]:
    rows = []
    for stage in stages:
        t = [p.seconds[stage] for p in points]
        marginal = [f"{1000 * (b - a) / (q.depth - p.depth):.1f}" for p, q, a, b in zip(points, points[1:], t, t[1:])]
        rows.append((stage, *(f"{1000 * s / p.depth:.1f}" for p, s in zip(points, t)), " / ".join(marginal) or "-",
                     f"{power_law_exponent([p.depth for p in points], t):.2f}"))
    header = ["stage", *(f"ms / layer at {p.depth}" for p in points), "marginal ms per added layer", "k (t ∝ depth^k)"]
    return common.table(header, rows)


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    depths = sorted({int(d) for d in args.depths.split(",") if d})
    if not depths or depths[0] < 1:
        raise common.BenchmarkError(f"--depths must be positive integers, got {args.depths!r}")
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        points = [measure(depth, args, Path(tmp)) for depth in depths]
    stages = [s for s in STAGES if s in points[0].seconds]
    lines = common.table(["depth", "quant points", *(f"{s} (s)" for s in stages)],
                         [(p.depth, p.quant_points, *(f"{p.seconds[s]:.3f}" for s in stages)) for p in points])
    lines += ["", "Growth:", ""] + growth_lines(points, stages)
    lines += ["", f"Conv+ReLU stacks, {args.channels} channels, input 1×3×{args.size}×{args.size}; medians of "
              f"{args.repeats} runs per stage (stages round-robin); diff on {args.diff_batches} random inputs. "
              "*export*: `deployq export` end to end (load, prepare, torch.onnx, rewrite, write). Marginal: "
              "(t(d₂) − t(d₁)) / (d₂ − d₁) between neighbouring depths."]
    return common.Section("scale", "Scale: export and diff time against depth", common.command_line(SCRIPT, argv),
                          lines)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
