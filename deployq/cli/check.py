"""``deployq check``: a checkpoint's torch fake-quant model against its ONNX export, in integer codes."""

from __future__ import annotations

import sys
from typing import Optional

import click

from deployq import api
from deployq.cli.common import EXIT_GATE, api_option, console, handle_errors, json_option, parse_input_shapes, say, write_json


@click.command("check")
@api_option(api.check, "model", "--ckpt", required=True, type=click.Path(dir_okay=False),
            help="The deployq checkpoint.")
@api_option(api.check, "onnx_model", "--onnx", required=True, type=click.Path(dir_okay=False),
            help="Its exported QDQ model (.onnx), or its ORT-format file (.ort, read with the .onnx beside it).")
@api_option(api.check, "factory", "--model", metavar="PKG.MOD:FACTORY", help="Model factory, if not inside deployq.")
@api_option(api.check, "inputs", "--input", type=click.Path(exists=True),
            help="Inputs (raw, images, .npy/.npz); default: random.")
@api_option(api.check, "random", "--random", type=click.IntRange(1), show_default=True,
            help="Random inputs if no --input.")
@api_option(api.check, "local", "--local/--accumulated", show_default=True,
            help="--local: each torch quantizer continues from onnxruntime's codes, so every point shows its own "
                 "arithmetic; --accumulated: both run freely (errors spread).")
@api_option(api.check, "input_shapes", "--input-shape", multiple=True, callback=lambda c, p, v: parse_input_shapes(v),
            metavar="[NAME:]N,C,H,W",
            help="Input shape where the export's height and width are symbolic and the checkpoint's are not "
                 "wanted; repeat as NAME:N,C,H,W. Default: the checkpoint's shapes.")
@json_option("the per-point parity")
@handle_errors
def check(model: str, onnx_model: str, factory: Optional[str], inputs: Optional[str], random: int, local: bool,
          input_shapes: Optional[list], json_path: Optional[str]) -> None:
    """Torch fake-quant vs the ONNX model, in integer codes, at every quant point.

    Runs onnxruntime in the reference view (QDQ semantics exactly) and the checkpoint's QAT model
    on the same inputs; each torch quantizer continues from onnxruntime's codes (unless
    --accumulated), so every point shows its own arithmetic. Exit 3 if any point is more than
    1 LSB apart (the gate); 1 on an error.

    An ORT-format file has no intermediate tensors to read: check reads them from the .onnx beside
    it, then runs the .ort and the .onnx (integer kernels) on the same inputs; their outputs must
    be at most 1 LSB apart.
    """
    from deployq.verify.report import parity_table

    report = api.check(model, onnx_model, inputs, random=random, local=local, factory=factory,
                       input_shapes=input_shapes, progress=True)
    write_json(json_path, report.to_json())
    if json_path != "-":
        console.print(parity_table(report))
        say(report.verdict()) if report.passed() else click.echo(report.verdict())
    if not report.passed():
        sys.exit(EXIT_GATE)
