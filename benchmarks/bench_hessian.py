"""Benchmark: Hessian-trace (Hutchinson): shared against per-layer products, time and agreement.

    python benchmarks/bench_hessian.py                                   # deployq.examples.zoo:unet
    python benchmarks/bench_hessian.py --model deployq.examples.lowlight.model:build \\
        --kwargs '{"width": 8}' --weights examples/lowlight/checkpoints/float.pt --input-shape 2,4,32,32

The model is prepared by deployq (float mode: the float network, with quant-point names) and fed
random inputs in [0, 1); with no targets, the loss is the MSE to the float model's own output.
Each layer runs until the standard error of its running mean is at most --tol of the mean (or --max-iter), with
the shared estimator (every layer from one Hessian-vector product per sample, the default) and
with the per-layer one (a product per layer and sample); the two are compared layer by layer
(within their standard errors?) and by ranking. The per-layer estimator runs a second time with
another seed: how well it ranks the layers like itself is the ceiling any estimator's ranking can
be held to (both are random). A long per-layer run (--reference-iter samples, tol 0) measures how
far the early stop lands from a well-averaged estimate. Writes a markdown section to
benchmarks/results/hessian.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import deployq
from benchmarks import common
from deployq.qat.loading import import_factory
from deployq.train.batches import data_batches
from deployq.train.hessian import DEFAULT_MAX_ITER, DEFAULT_TOL, hessian_traces
from deployq.train.hessian_report import HessianReport

SCRIPT = "bench_hessian.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deployq.examples.zoo:unet", help="package.module:factory")
    parser.add_argument("--kwargs", default="{}", help="factory keyword arguments (JSON)")
    parser.add_argument("--weights", type=Path, help="float state_dict to load (default: the factory's own weights)")
    parser.add_argument("--input-shape", default="4,3,32,32", help="N,C,H,W of one batch")
    parser.add_argument("--batches", type=int, default=4, help="batches of random inputs")
    parser.add_argument("--layers", action="append", help="glob of the layers to analyse (repeatable)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument("--reference-iter", type=int, default=300,
                        help="samples of the reference run (0: skip it)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", type=Path, help="a deployq checkpoint as the model (instead of --model)")
    parser.add_argument("--dng-frames", type=int, default=0,
                        help="with --ckpt: write this many whole-photograph DNG frames (the low-light example's "
                             "camera), feed the estimators `deployq hessian`'s own batches of them, and time "
                             "`deployq hessian` with its defaults on the folder")
    return parser.parse_args(argv)


def table(report: HessianReport, per_layer: HessianReport, reference: HessianReport | None) -> list[str]:
    head = ("| # | layer | n | iterations | s | Tr(H)/n shared | s.e. / mean | Tr(H)/n per-layer | rank per-layer "
            "| difference / combined s.e. |")
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if reference is not None:
        head += f" shared vs {reference.max_iter}-sample run |"
        rule += "---:|"
    ranks = {layer.name: i for i, layer in enumerate(per_layer.layers, 1)}
    rows = [head, rule]
    for rank, layer in enumerate(report.layers, 1):
        relative = layer.stderr / abs(layer.trace) if layer.trace else float("nan")
        other = per_layer[layer.name]
        row = (f"| {rank} | `{layer.name}` | {layer.numel} | {layer.iterations} | {layer.seconds:.3f} "
               f"| {layer.per_element:.4g} | {relative:.1%} | {other.per_element:.4g} | {ranks[layer.name]} "
               f"| {agreement(layer, other):.1f} |")
        if reference is not None:
            long = reference[layer.name].trace
            row += f" {(layer.trace - long) / long:+.1%} |" if long else " n/a |"
        rows.append(row)
    return rows


def agreement(a, b) -> float:
    """|a − b| in units of their combined standard error (2 or less: they agree)."""
    combined = float(np.hypot(a.stderr, b.stderr))
    return abs(a.trace - b.trace) / combined if combined > 0 else 0.0


def spearman(a: HessianReport, b: HessianReport) -> float:
    names = a.names
    ra = np.argsort(np.argsort([-a[n].per_element for n in names]))
    rb = np.argsort(np.argsort([-b[n].per_element for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(names) > 1 else 1.0


def cli_lines(seconds: float, order: list[str], per_layer: HessianReport, again: HessianReport, frames: int,
              top: int = 3) -> tuple[str, bool]:
    """The CLI run's time and its top layers against the per-layer estimator (on the same batches);
    whether they are within that estimator's own spread: the same layers, or each layer in only one
    of the two lists within 2 combined standard errors (per-layer estimates) of one in the other."""
    ours, theirs = set(order[:top]), set(per_layer.names[:top])
    odd = ours ^ theirs
    close = [n for n in odd if any(agreement(per_layer[n], per_layer[m]) <= 2 for m in (theirs if n in ours else ours))]
    within = len(close) == len(odd)
    verdict = ("the same layers as the per-layer estimator's" if not odd else
               f"{sorted(ours)} against the per-layer estimator's {sorted(theirs)}; "
               + ("each layer in only one list is within 2 combined standard errors of one in the other"
                  if within else "outside that estimator's spread"))
    return (f"**`deployq hessian` with its defaults on {frames} whole DNG frames: {seconds:.1f} s** (a fresh process: "
            f"imports, the checkpoint, reading the frames, the trace, the YAML; the shared products, then the "
            f"`--refine` top layers again per layer). Its top {top}: {verdict}. The "
            f"per-layer estimator's top {top} with another seed: "
            f"{'the same' if set(again.names[:top]) == theirs else sorted(again.names[:top])}."), within


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    with common.torch_threads(args.threads):
        return section(args, argv)


def model_and_batches(args: argparse.Namespace, work: Path) -> tuple[torch.nn.Module, list, str, str]:
    """The prepared model, its batches, what the model is and what the batches are (for the text)."""
    if args.ckpt is not None:
        source = deployq.load_model(ckpt=str(args.ckpt))
        if args.dng_frames:
            frames = write_frames(work, args.dng_frames)
            batches, what = data_batches(frames, source.inputs, 4, args.batches, seed=args.seed)
            what = what.replace(f"from {frames} ", f"from {args.dng_frames} whole DNG frames of the example's test "
                                "camera ") + " (the batches `deployq hessian` draws at these settings)"
            return source.qmodel, batches, f"checkpoint `{common.shown_path(args.ckpt)}`", what
        shape = source.inputs[0].shape
        model, label = source.qmodel, f"checkpoint `{common.shown_path(args.ckpt)}`"
    else:
        kwargs = json.loads(args.kwargs)
        shape = tuple(int(v) for v in args.input_shape.split(","))
        float_model = import_factory(args.model, allowed=True)(**kwargs).eval()
        if args.weights is not None:
            weights = args.weights if args.weights.is_file() else common.ROOT / args.weights
            float_model.load_state_dict(torch.load(weights, weights_only=True))
        model = deployq.prepare(float_model, torch.zeros(shape))
        label = (f"`{args.model}`{f' {kwargs}' if kwargs else ''}"
                 f"{f', weights `{common.shown_path(args.weights)}`' if args.weights else ''}")
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.rand(shape, generator=gen) for _ in range(args.batches)]
    return model, batches, label, f"input {tuple(shape)}, {args.batches} batches of random inputs in [0, 1)"


def write_frames(work: Path, count: int) -> Path:
    """`count` whole-photograph DNG frames of the example's test camera; their folder."""
    from deployq.examples.lowlight.data import write_sid_folder

    write_sid_folder(work / "frames", count, None, seed=7, split="test")
    return work / "frames" / "short"


def cli_defaults(args: argparse.Namespace, frames: Path, work: Path) -> tuple[float, list[str]]:
    """`deployq hessian --ckpt CKPT --data FRAMES` with every other option at its default: wall
    time (a fresh process, as a user runs it) and its layers in rank order."""
    command = [sys.executable, "-m", "deployq.cli", "hessian", "--ckpt", str(args.ckpt), "--data", str(frames),
               "--out", str(work / "distill.yaml"), "--json", str(work / "hessian.json"), "-q"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    layers = json.loads((work / "hessian.json").read_text())["layers"]
    return seconds, [layer["name"] for layer in layers]


def section(args: argparse.Namespace, argv: list[str]) -> common.Section:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        return _section(args, argv, Path(tmp))


def _section(args: argparse.Namespace, argv: list[str], work: Path) -> common.Section:
    qmodel, batches, label, data = model_and_batches(args, work)

    report = hessian_traces(qmodel, batches, args.layers, tol=args.tol, max_iter=args.max_iter, seed=args.seed,
                            bits=None, estimator="shared")
    per_layer = hessian_traces(qmodel, batches, args.layers, tol=args.tol, max_iter=args.max_iter, seed=args.seed,
                               bits=None, estimator="per-layer")
    again = hessian_traces(qmodel, batches, args.layers, tol=args.tol, max_iter=args.max_iter, seed=args.seed + 1,
                           bits=None, estimator="per-layer")
    ceiling = spearman(per_layer, again)
    reference = None
    if args.reference_iter > 0:
        reference = hessian_traces(qmodel, batches, args.layers, tol=0.0, max_iter=args.reference_iter,
                                   seed=args.seed + 1, bits=None, estimator="per-layer")
    iterations = np.array([layer.iterations for layer in report.layers])
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {common.cpu_model()}, {common.usable_cores()} usable cores, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"deployq {deployq.__version__}",
        f"- model: {label}; data: {data}; loss: {report.loss}",
        f"- stopping: standard error of the running mean ≤ {args.tol:g} × the mean, checked once every batch has "
        f"contributed, or {args.max_iter} samples",
        "",
        *table(report, per_layer, reference),
        "",
        f"**Shared products: {len(report.layers)} layers in {report.seconds:.1f} s; per-layer products: "
        f"{per_layer.seconds:.1f} s ({per_layer.seconds / report.seconds:.1f}× as long).** Rankings by Tr(H)/n: "
        f"Spearman ρ = {spearman(report, per_layer):.3f}, top 5 "
        f"{'the same' if report.names[:5] == per_layer.names[:5] else 'shared ' + str(report.names[:5]) + ', per-layer ' + str(per_layer.names[:5])}; "
        f"{sum(agreement(report[n], per_layer[n]) <= 2 for n in report.names)} of {len(report.layers)} layers agree "
        "within 2 combined standard errors. The shared estimator's samples carry cross terms z_nᵀH_nm z_m "
        "(zero in expectation), so its standard errors are larger at the same number of samples.",
        "",
        f"**Noise ceiling:** the per-layer estimator run again with seed {args.seed + 1} ranks the layers with "
        f"Spearman ρ = {ceiling:.3f} against its own first run "
        f"({sum(agreement(again[n], per_layer[n]) <= 2 for n in per_layer.names)} of {len(per_layer.layers)} layers "
        f"within 2 combined standard errors). The shared estimator's ρ = {spearman(report, per_layer):.3f} against "
        f"the per-layer run is {'at or above' if spearman(report, per_layer) >= ceiling else 'below'} that ceiling.",
        "",
        f"Shared run: iterations to converge: median "
        f"{int(np.median(iterations))}, min {iterations.min()}, max {iterations.max()} "
        f"({int((~np.array([layer.converged for layer in report.layers])).sum())} layers hit --max-iter). "
        "A layer's seconds are its Hessian-vector products plus an even share of each forward pass and "
        "first-order gradient (shared by the layers still running). s.e. / mean: standard error of the "
        "estimate relative to it.",
    ]
    if reference is not None:
        lines.append(f"Reference: {reference.max_iter} samples per layer with tol 0 (another seed) in "
                     f"{reference.seconds:.2f} s; Δ is the early-stopped estimate's relative difference from it.")
    cli = {}
    if args.ckpt is not None and args.dng_frames:
        seconds, order = cli_defaults(args, work / "frames" / "short", work)
        text, within = cli_lines(seconds, order, per_layer, again, args.dng_frames)
        lines += ["", text]
        cli = {"cli_seconds": seconds, "cli_top_within_spread": float(within)}
    facts = {**cli, "shared_seconds": report.seconds, "layers": len(report.layers), "per_layer_seconds": per_layer.seconds,
             "agree": sum(agreement(report[n], per_layer[n]) <= 2 for n in report.names),
             "spearman": spearman(report, per_layer), "spearman_ceiling": ceiling}
    return common.Section("hessian", "Hessian trace (Hutchinson): time per layer and iterations to converge",
                          common.command_line(SCRIPT, argv), lines, facts)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
