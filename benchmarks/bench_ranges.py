"""Activation ranges: min/max (deployq's default) against the MSE-optimal clip, in one run.

    python benchmarks/bench_ranges.py [--models digits,lowlight,resnet18,mobilenet_v2,PNet,RNet,ONet]
    pip install --no-deps facenet-pytorch==2.6.0 requests   # for PNet, RNet, ONet (weights inside the wheel)

Every model is exported by plain ``deployq export --calib`` twice, the activation observer being
the only difference: ``minmax`` (the range seen, the default) and ``mse`` (the clip of the
histogram that minimizes the quantization MSE), next to onnxruntime's ``quantize_static`` (MinMax)
on the same float graph and calibration inputs. Score: output SQNR of the fully optimized int8
graph against the float model on held-out inputs. Models and data as in ``bench_ptq.py`` (digits
and the low-light network trained; torchvision models with random weights) and ``bench_budgets.py``
(facenet-pytorch's trained MTCNN networks on photo crops). Not part of ``run_all.py``, as
``bench_budgets.py`` is not (facenet-pytorch is installed by hand); results in
``benchmarks/results/ranges.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_ranges.py"
MODELS = ("digits", "lowlight", "resnet18", "mobilenet_v2", "PNet", "RNet", "ONet")
CONFIGS = (("min/max", None), ("MSE", {"activation": {"observer": "mse"}}))


def parse_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks import bench_ptq

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--calib", type=int, default=32, help="calibration inputs (every contender)")
    parser.add_argument("--eval", type=int, default=32, help="held-out inputs every number is measured on")
    args = parser.parse_args(argv)
    ptq_args = bench_ptq.parse_args(["--calib", str(args.calib), "--eval", str(args.eval)])
    return argparse.Namespace(**{**vars(ptq_args), **vars(args)})


def _cases(name: str, args: argparse.Namespace, work: Path) -> tuple[Callable, list, list]:
    """(export(config, folder) -> ExportResult, calibration inputs, held-out inputs), batch 1 each."""
    import torch

    import deployq
    from benchmarks import bench_budgets, bench_ptq
    from deployq.deploy.export import export

    if name in ("PNet", "RNet", "ONet"):
        (class_name, weights, size), = [n for n in bench_budgets.NETWORKS if n[0] == name]
        model = bench_budgets.trained(class_name, weights)
        calib = bench_budgets.crops(size, args.calib, 0, bench_budgets.CALIB_PHOTOS)
        held_out = bench_budgets.crops(size, args.eval, 1, bench_budgets.HELD_OUT_PHOTOS)
        return (lambda config, folder: deployq.export(model, torch.from_numpy(calib[0]), folder, config=config,
                                                      calib=[torch.from_numpy(c) for c in calib],
                                                      calib_limit=args.calib, ort_format=False), calib, held_out)
    case = (bench_ptq.lowlight_case(args) if name == "lowlight" else bench_ptq.digits_case(args, work)
            if name == "digits" else bench_ptq.torchvision_case(name, args, work))
    return (lambda config, folder: export(case.source(config), folder, calib=list(case.calibration),
                                          calib_limit=args.calib, progress=False, ort_format=False),
            case.calibration, case.held_out)


def measure(name: str, args: argparse.Namespace, work: Path) -> list[float]:
    """Output SQNR (dB) for each of CONFIGS, then quantize_static MinMax."""
    from benchmarks.bench_conformance import outputs, sqnr_db

    export, calibration, held_out = _cases(name, args, work)
    scores, static = [], None
    for label, config in CONFIGS:
        result = export(config, work / label.split()[0].replace("/", ""))
        feeds = [{result.quant_model.graph.input[0].name: x} for x in held_out]
        reference = [o for out in outputs(result.files["float"], feeds) for o in out]

        def score(path: Path) -> float:
            return sqnr_db(reference, [o for out in outputs(path, feeds) for o in out])

        scores.append(score(result.files["int8"]))
        if static is None:
            static = score(common.quantize_static_qdq(result.files["float"], work / "static.onnx", calibration, "MinMax"))
    return [*scores, static]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    names = common.chosen_models(args.models, MODELS)
    rows, gains = [], []
    with common.torch_threads(1):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"bench_ranges.{name}.") as tmp, common.quiet():
                minmax, mse, static = measure(name, args, Path(tmp))
            gains.append(mse - minmax)
            rows.append([name, f"{minmax:.2f}", f"{mse:.2f}", f"{mse - minmax:+.2f}", f"{static:.2f}",
                         f"{mse - static:+.2f}"])
            print(f"{name}: min/max {minmax:.2f}, MSE {mse:.2f}, quantize_static {static:.2f}", file=sys.stderr, flush=True)
    body = common.table(["model", "min/max (default)", "MSE", "MSE − min/max", "quantize_static MinMax",
                         "MSE − static"], rows)
    notes = ["", f"Mean change from min/max to MSE: {np.mean(gains):+.2f} dB (median {np.median(gains):+.2f}, "
             f"{sum(g > 0 for g in gains)} of {len(gains)} models gain).", "",
             f"Output SQNR (dB) of the fully optimized int8 graph against the float model on {args.eval} held-out "
             f"inputs; {args.calib} calibration inputs, the same for every contender; one seed. digits, lowlight and "
             "the MTCNN networks are trained; resnet18 and mobilenet_v2 have random weights (BatchNorm statistics "
             "of photographs). Machine: " + common.machine_text() + "."]
    return common.Section("ranges", "Activation ranges: min/max against the MSE-optimal clip",
                          common.command_line(SCRIPT, argv), body + notes)


if __name__ == "__main__":
    sys.exit(common.main_for(run, sys.argv[1:]))
