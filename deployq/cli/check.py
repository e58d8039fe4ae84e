"""``deployq check``: a checkpoint's torch fake-quant model against its ONNX export, in integer codes."""

from __future__ import annotations

import sys
from typing import Optional

import click

from deployq.cli.common import EXIT_GATE, console, handle_errors, json_option, say, write_json


@click.command("check")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="The deployq checkpoint.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False),
              help="Its exported QDQ model (.onnx), or its ORT-format file (.ort, read with the .onnx beside it).")
@click.option("--model", "factory", metavar="PKG.MOD:FACTORY", help="Model factory, if not inside deployq.")
@click.option("--input", "input_path", type=click.Path(exists=True), help="Inputs (raw, images, .npy/.npz); default: random.")
@click.option("--random", "random_count", type=click.IntRange(1), default=4, show_default=True, help="Random inputs if no --input.")
@click.option("--accumulated", is_flag=True, help="Let both run freely (errors spread) instead of comparing each point on the same inputs.")
@json_option("the per-point parity")
@handle_errors
def check(ckpt: str, onnx_path: str, factory: Optional[str], input_path: Optional[str], random_count: int,
          accumulated: bool, json_path: Optional[str]) -> None:
    """Torch fake-quant vs the ONNX model, in integer codes, at every quant point.

    Runs onnxruntime in the reference view (QDQ semantics exactly) and the checkpoint's QAT model
    on the same inputs; each torch quantizer continues from onnxruntime's codes (unless
    --accumulated), so every point shows its own arithmetic. Exit 3 if any point is more than
    1 LSB apart (the gate); 1 on an error.

    An ORT-format file has no intermediate tensors to read: check reads them from the .onnx beside
    it, then runs the .ort and the .onnx (integer kernels) on the same inputs; their outputs must
    be at most 1 LSB apart.
    """
    from deployq.api import check as run_check
    from deployq.verify.report import parity_table

    report = run_check(ckpt, onnx_path, input_path, random=random_count, local=not accumulated, factory=factory,
                       progress=True)
    write_json(json_path, report.to_json())
    if json_path != "-":
        console.print(parity_table(report))
        say(report.verdict()) if report.passed() else click.echo(report.verdict())
    if not report.passed():
        sys.exit(EXIT_GATE)
