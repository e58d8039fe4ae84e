"""ONNX import parity: every torchvision architecture, exported by torch.onnx, imported by deployq.

    python benchmarks/bench_onnx_convert.py [--models resnet18,swin_t,...]

Each model of ``deployq.examples.torchvision_models`` (random weights, BatchNorm statistics of
photographs) is written by ``torch.onnx.export`` (TorchScript exporter, opset 17: LayerNormalization
nodes, shape arithmetic for reshapes and attention masks) and imported by
``deployq.qat.onnx_import.load`` at its input size (parameters torchvision initializes to zero, ViT's head,
drawn at random instead, so that no output is 0 whatever the import computes). Columns: the nodes of the file, the nodes of the
fx graph deployq writes, the largest absolute difference between the imported model (torch) and
onnxruntime running the file on the same random input, relative to the output's largest value,
and the seconds the import took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_onnx_convert.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from deployq.examples.torchvision_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    return parser.parse_args(argv)


def measure(name: str, work: Path) -> list[str]:
    import onnx
    import onnxruntime as ort
    import torch

    from deployq.examples.torchvision_models import MODELS, build
    from deployq.qat.onnx_import import load

    size = MODELS[name].get("image_size", 224)
    model = build(name).eval()
    torch.manual_seed(0)
    for parameter in model.parameters():  # torchvision zero-initializes some heads (ViT): an output of 0 tests nothing
        if not parameter.detach().abs().max():
            torch.nn.init.normal_(parameter, 0.0, 0.02)
    x = torch.rand(1, 3, size, size)
    path = work / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    imported, seconds = common.timed(lambda: load(str(path), shapes=[list(x.shape)]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ours = imported(x)
    ours = (ours["out"] if isinstance(ours, dict) else ours[0] if isinstance(ours, tuple) else ours).numpy()
    error = float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))
    nodes = sum(n.op in ("call_module", "call_function", "call_method") for n in imported.graph.nodes)
    return [name, str(len(onnx.load(str(path)).graph.node)), str(nodes), f"{error:.1e}", f"{seconds:.2f}"]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    from deployq.examples.torchvision_models import MODELS

    rows = []
    with common.torch_threads(1), tempfile.TemporaryDirectory(prefix="bench_onnx_convert.") as tmp:
        for name in common.chosen_models(args.models, list(MODELS)):
            try:
                rows.append(measure(name, Path(tmp)))
            except Exception as err:  # a model the importer cannot take is a row
                rows.append([name, "", "", f"cannot: {common.error_text(err)[:200]}", ""])
            print(f"{name}: {rows[-1][1:]}", file=sys.stderr, flush=True)
    body = common.table(["model", "ONNX nodes", "fx nodes", "max error / max output", "import seconds"], rows)
    body += ["", "Random input in [0, 1), batch 1; onnxruntime's CPU provider. Machine: " + common.machine_text() + "."]
    return common.Section("onnx_convert", "ONNX import parity: torchvision architectures exported by torch.onnx",
                          common.command_line(SCRIPT, argv), body)


if __name__ == "__main__":
    sys.exit(common.main_for(run, sys.argv[1:]))
