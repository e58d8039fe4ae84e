"""Device coverage: how much of each export onnxruntime's mobile providers take, before and after a profile.

    python benchmarks/bench_devices.py [--size 128] [--repeats 20]

For the low-light example (the shipped all-8-bit QAT checkpoint: NNAPI runs no 10-bit layer),
torchvision mobilenet_v2 and resnet18 (random weights, BatchNorm statistics of photographs,
post-training calibration) and the zoo UNet (a ConvTranspose), each exported with ``--device cpu``
(as exported before profiles), ``--device nnapi`` and ``--device coreml``:

* nodes taken and partitions, for NNAPI and CoreML (MLProgram), by onnxruntime's own usability
  checker (``onnxruntime.tools.mobile_helpers.usability_checker``, after its basic optimization);
* ``check``: the largest code difference between torch fake-quant and the profile's QDQ model;
* on the CPU provider: ConvTranspose nodes left in the optimized graph, and the latency of the
  nnapi-profile int8 model over the cpu-profile one (round-robin, 1 thread).
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
from deployq.examples import torchvision_models as tvm
from deployq.deploy.export import export
from deployq.qat.loading import resolve_model
from deployq.verify.check import check_parity
from deployq.core.runtime import session

SCRIPT = "bench_devices.py"
PROFILES = ("cpu", "nnapi", "coreml")
SHOWN = ("NNAPI", "CoreML MLProgram")


@dataclass
class Case:
    name: str
    ckpt: Path
    factory: str | None
    kwargs: dict
    shape: tuple[int, ...] | None
    calib: Path | None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="input height and width of the torchvision models")
    parser.add_argument("--calib", type=int, default=16, help="calibration crops")
    parser.add_argument("--repeats", type=int, default=20, help="round-robin latency rounds")
    parser.add_argument("--models", default="lowlight,mobilenet_v2,resnet18,unet")
    common.add_lowlight_arguments(parser)
    return parser.parse_args(argv)


def cases(args: argparse.Namespace, work: Path) -> list[Case]:
    ckpts = common.lowlight_checkpoints(args)
    np.save(work / "calib.npy", tvm.photo_crops(args.calib, args.size, seed=10).numpy())
    found = []
    for name in args.models.split(","):
        if name == "lowlight":
            found.append(Case("low-light (qat_all8.pt)", ckpts.qat_all8, None, {}, None, None))
        elif name == "unet":
            from deployq.examples import zoo

            torch.save(zoo.unet(width=16).state_dict(), work / "unet.pt")
            found.append(Case("zoo UNet (ConvTranspose)", work / "unet.pt", "deployq.examples.zoo:unet",
                              {"width": 16}, (1, 3, args.size, args.size), work / "calib.npy"))
        else:
            model = tvm.with_photo_statistics(tvm.build(name=name), args.size)
            torch.save(model.state_dict(), work / f"{name}.pt")
            found.append(Case(name, work / f"{name}.pt", "deployq.examples.torchvision_models:build", {"name": name},
                              (1, 3, args.size, args.size), work / "calib.npy"))
    return found


def measure(case: Case, args: argparse.Namespace, work: Path) -> list[str]:
    source = resolve_model(ckpt=str(case.ckpt), factory=case.factory, factory_kwargs=case.kwargs or None,
                           input_shape=[(None, case.shape)] if case.shape else None)
    results = {}
    for profile in PROFILES:
        with common.quiet():
            results[profile] = export(source, work / case.name.split()[0] / profile, calib=str(case.calib) if case.calib else None,
                                      calib_limit=args.calib, device=profile, ort_format=False, progress=False)
    shape = source.inputs[0].shape
    x = [torch.from_numpy(np.random.default_rng(i).uniform(0, 0.6, shape).astype(np.float32)) for i in range(2)]
    check = check_parity(results["nnapi"].qmodel, results["nnapi"].quant_model, x).max_lsb
    sessions = {p: session(results[p].quant_model, optimize=True, threads=1) for p in ("cpu", "nnapi")}
    feed = {sessions["cpu"].get_inputs()[0].name: x[0].numpy()}
    times = common.round_robin({p: (lambda s=s: s.run(None, feed)) for p, s in sessions.items()}, args.repeats)
    ops = {p: common.optimized_ops(results[p].files["int8"], 1, work) for p in ("cpu", "nnapi")}
    cover = {p: {c.provider: c for c in results[p].coverage} for p in PROFILES}
    cells = [case.name]
    for provider, profiles in (("NNAPI", ("cpu", "nnapi")), ("CoreML MLProgram", ("cpu", "coreml"))):
        for p in profiles:
            c = cover[p][provider]
            cells.append(f"{c.supported}/{c.nodes} ({common.percent(c.share, 1)}), {c.partitions}")
    cells += [str(check), f"{ops['cpu']['ConvTranspose']} → {ops['nnapi']['ConvTranspose']}",
              f"{common.median(times['nnapi']) / common.median(times['cpu']):.2f}"]
    return cells


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deployq-bench-devices-") as tmp:
        for case in cases(args, Path(tmp)):
            try:
                rows.append(measure(case, args, Path(tmp)))
            except Exception as err:  # a row that failed says why, the others still run
                rows.append([case.name, f"failed: {common.error_text(err)}"] + [""] * 6)
    header = ["model", "NNAPI, --device cpu", "NNAPI, --device nnapi", "CoreML MLProgram, --device cpu",
              "CoreML MLProgram, --device coreml", "check, nnapi (max LSB)", "ConvTranspose on CPU (cpu → nnapi)",
              "CPU latency nnapi / cpu"]
    lines = [f"Nodes taken / all nodes (share), partitions, by onnxruntime {common.versions()['onnxruntime']}'s "
             "mobile usability checker. `--device cpu` keeps a symbolic batch dimension, and the checker refuses "
             "every node downstream of a dynamic shape; `--device nnapi` fixes the shapes; both rewrite "
             "ConvTranspose (kernel = stride) as Conv + DepthToSpace; `--device coreml` is the float graph with the "
             "learned weights (CoreML takes no QuantizeLinear/DequantizeLinear). The checker looks at operator "
             "types and shapes only; QNN and XNNPACK have no such checker in onnxruntime.", "",
             *common.table(header, rows), "",
             "CPU latency: the nnapi-profile int8 model over the cpu-profile one on onnxruntime's CPU provider, "
             f"1 thread, median of {args.repeats} round-robin runs of one input at the size shown in the export."]
    return common.Section("devices", "Device coverage (NNAPI, CoreML) before and after a device profile",
                          common.command_line(SCRIPT, argv), lines)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
