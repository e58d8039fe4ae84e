"""Parity: torch fake-quant vs onnxruntime, and integer kernels vs the reference view, in codes.

    python benchmarks/bench_parity.py [--models unet,resnet --qat Q.pt --batches 4]

For every zoo model (``deployq.examples.zoo.FACTORIES``, default 8-bit config, calibrated on
random inputs) and the low-light QAT checkpoint (10-bit head/tail, held-out inputs):

* reference view (``deployq.verify.check.check_parity``): integer codes of the torch fake-quant model
  against onnxruntime with graph optimizations off, at every quant point; *local* continues torch
  from onnxruntime's codes at each point, *accumulated* lets both run freely;
* kernel view (``deployq.verify.diff.diff(mode='kernel')``): codes of fully optimized onnxruntime
  sub-models ending at each quant point (the integer kernels) against the reference view.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import common
from deployq.verify.diff import diff
from deployq.examples.lowlight.evaluate import VAL_SIZE, validation_set
from deployq.examples.zoo import FACTORIES
from deployq.deploy.export import ExportResult
from deployq.verify.check import ParityReport, check_parity

SCRIPT = "bench_parity.py"


@dataclass
class Row:
    model: str
    bits: str
    points: int
    local: ParityReport
    accumulated: ParityReport
    kernel_lsb: list[int]  # codes equal, 1 LSB apart, more
    kernel_max_lsb: int  # the largest code difference in the kernel view
    kernel_worst: str  # the quant point with the fewest equal codes in the kernel view

    @property
    def kernel_equal(self) -> float:
        return self.kernel_lsb[0] / max(1, sum(self.kernel_lsb))

    @property
    def kernel_more(self) -> float:
        return self.kernel_lsb[2] / max(1, sum(self.kernel_lsb))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_lowlight_arguments(parser)
    parser.add_argument("--models", default=",".join(FACTORIES), help="zoo models, comma-separated")
    parser.add_argument("--no-lowlight", action="store_true", help="skip the low-light checkpoint")
    parser.add_argument("--lowlight-size", type=int, default=VAL_SIZE, help="held-out crop size in raw pixels")
    parser.add_argument("--batches", type=int, default=4, help="input batches per model")
    parser.add_argument("--batch-size", type=int, default=2, help="zoo inputs per batch")
    return parser.parse_args(argv)


def compare(name: str, result: ExportResult, batches: list[torch.Tensor]) -> Row:
    """Both parity views of one exported model on `batches`."""
    input_name = result.quant_model.graph.input[0].name
    feeds = [{input_name: b.numpy()} for b in batches]
    kernel = diff(result.float_model, result.quant_model, feeds, mode="kernel", progress=False)
    lsb = [sum(r.stats.lsb[i] for r in kernel.rows) for i in range(3)]
    # the kernel view compares dequantized codes: max |error| / scale is the largest code difference
    max_lsb = max((round(r.stats.max_err / float(np.min(r.point.scale))) for r in kernel.rows), default=0)
    worst = min(kernel.rows, key=lambda r: r.stats.lsb[0] / max(1, sum(r.stats.lsb)), default=None)
    worst_text = "-" if worst is None else (f"`{worst.point.name}` ({worst.point.bits}-bit, "
                                            f"{common.percent(worst.stats.lsb[0] / max(1, sum(worst.stats.lsb)), 1)})")
    local = check_parity(result.qmodel, result.quant_model, batches, local=True)
    accumulated = check_parity(result.qmodel, result.quant_model, batches, local=False)
    widths = sorted({p.bits for p in local.points})
    return Row(name, "/".join(str(b) for b in widths), len(local.points), local, accumulated, lsb, max_lsb, worst_text)


def zoo_row(name: str, args: argparse.Namespace, work: Path) -> Row:
    _, shape = FACTORIES[name]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand((args.batch_size, *shape[1:]), generator=gen) * 1.5 for _ in range(args.batches)]
    ckpt = common.calibrated_checkpoint(work / f"{name}.pt", f"deployq.examples.zoo:{name}", {}, shape, batches)
    return compare(name, common.export_checkpoint(ckpt, work / name), batches)


def lowlight_row(ckpts: common.LowlightCheckpoints, args: argparse.Namespace) -> Row:
    shape = (1, 4, args.lowlight_size // 2, args.lowlight_size // 2)
    held_out = validation_set(size=args.lowlight_size)
    batches = [held_out[i]["input"][None] for i in range(min(args.batches, len(held_out)))]
    result = common.shared_export(ckpts.qat, factory=ckpts.factory, input_shape=shape)
    return compare(f"low-light ({ckpts.qat.name})", result, batches)


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(FACTORIES))
    if unknown:
        raise common.BenchmarkError(f"unknown zoo models {unknown}; known: {', '.join(FACTORIES)}")
    ckpts = None if args.no_lowlight else common.lowlight_checkpoints(args).check("qat")
    with tempfile.TemporaryDirectory(prefix="bench_parity.") as tmp:
        rows = [zoo_row(name, args, Path(tmp)) for name in names]
        if ckpts is not None:
            rows.append(lowlight_row(ckpts, args))
    body = common.table(
        ["model", "bits", "quant points", "codes compared", "reference, local: equal", "max LSB",
         "reference, accumulated: equal", "max LSB", "kernel vs reference: equal", "> 1 LSB", "max LSB", "kernel: worst point"],
        [(r.model, r.bits, r.points, r.local.elements, common.percent(r.local.exact_fraction, 4), r.local.max_lsb,
          common.percent(r.accumulated.exact_fraction, 4), r.accumulated.max_lsb, common.percent(r.kernel_equal),
          common.percent(r.kernel_more), r.kernel_max_lsb, r.kernel_worst) for r in rows], "llrrrrrrrrrl")
    total = sum(r.local.elements for r in rows)
    exact = sum(r.local.exact_fraction * r.local.elements for r in rows) / max(1, total)
    notes = [
        "",
        f"{len(rows)} models, {total} codes (activations of {args.batches} batches, and every weight once): "
        f"{common.percent(exact, 4)} bit-exact in the local reference view. *equal*: share of integer codes "
        "that are identical; *max LSB*: the largest code difference. Reference view: onnxruntime with graph "
        "optimizations disabled (QDQ semantics), against torch fake-quant. Kernel view: for each activation quant "
        "point, the sub-model from the codes that feed it to its own codes, fully optimized (integer kernels) "
        "and fed the reference view's codes, against the reference view; weights are not part of it. Zoo inputs: uniform [0, 1.5), batch "
        f"{args.batch_size}; low-light inputs: held-out images, {args.lowlight_size // 2}×{args.lowlight_size // 2} "
        "packed raw.",
    ]
    return common.Section("parity", "Parity: torch fake-quant vs onnxruntime, integer kernels vs reference",
                          common.command_line(SCRIPT, argv), body + notes)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
