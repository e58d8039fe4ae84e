"""``deployq diff``: a float ONNX model against its quantized model, quant point by quant point."""

from __future__ import annotations

import sys
from typing import Optional

import click
from click.core import ParameterSource

from deployq import api
from deployq.cli.common import (EXIT_GATE, POSITIVE, UserError, api_option, console, handle_errors, json_option,
                                parse_input_shapes, say, write_json)


def _given(name: str) -> bool:
    """Whether the user gave option `name` (not its default)."""
    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


@click.command("diff")
@click.argument("float_onnx", type=click.Path(dir_okay=False))
@click.argument("quant_onnx", type=click.Path(dir_okay=False))
@api_option(api.diff, "inputs", "--input", type=click.Path(exists=True),
            help="Inputs: a raw file or folder (rawpy), images, or .npy/.npz.")
@api_option(api.diff, "random", "--random", type=click.IntRange(1), show_default=True,
            help="N random inputs of the model's input shape, uniform over its quantized range (when no --input).")
@api_option(api.diff, "ratio", "--ratio", type=POSITIVE, help="Exposure ratio applied to raw inputs (SID-style).")
@api_option(api.diff, "limit", "--limit", type=click.IntRange(1), show_default=True,
            help="At most this many inputs from --input.")
@api_option(api.diff, "mode", "--mode", type=click.Choice(["accumulated", "local", "sensitivity", "kernel"]),
            show_default=True, help="Which error to measure (see below).")
@json_option("every number")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--top", type=click.IntRange(1), help="Show only the K worst quant points.")
@click.option("--fail-below", type=float, metavar="SQNR_DB",
              help="CI gate: exit 3 if the output SQNR is below this (errors exit 1).")
@api_option(api.diff, "input_shapes", "--input-shape", multiple=True, callback=lambda c, p, v: parse_input_shapes(v),
            metavar="[NAME:]N,C,H,W",
            help="Input shape for models with symbolic height/width (a --dynamic-hw export); repeat as NAME:N,C,H,W. "
                 "Default with --input files: the first file's own size.")
@api_option(api.diff, "points", "--points", multiple=True, metavar="GLOB",
            help="Only these quant points (repeatable glob, e.g. 'layer4.*'); sensitivity and kernel modes then "
                 "measure only them.")
@handle_errors
def diff(float_onnx: str, quant_onnx: str, inputs: Optional[str], random: int, ratio: Optional[float], limit: int,
         mode: str, json_path: Optional[str], html_path: Optional[str], top: Optional[int],
         fail_below: Optional[float], input_shapes: Optional[list], points: tuple[str, ...]) -> None:
    """Compare a float ONNX model and its quantized (QDQ) model, quant point by quant point.

    \b
    Modes:
      accumulated  both whole models; each layer's error includes what flowed in from above
      local        each layer fed with the float model's values: its own error only
      sensitivity  one quant point quantized at a time, everything else float; output error, ranked
      kernel       real integer kernels (fully optimized sub-models) vs the reference view
    Quant points pair with the float model's tensors by name: deployq exports and
    onnxruntime.quantization.quantize_static models keep them. Another tool's
    export of the same network whose names differ (/conv1/Conv_output_0) pairs
    by graph position: weight layers by their weights, every other op from there.
    Exit status: 0 pass, 3 below --fail-below (the gate), 1 an error (bad file, option or input).
    """
    from deployq.core.files import AtomicOutputs, check_output, json_text
    from deployq.verify.report import table
    from deployq.core.runtime import isa_text

    if html_path:
        check_output(html_path, "--html")
    if inputs and _given("random"):
        raise UserError("give --input or --random, not both")
    report = api.diff(float_onnx, quant_onnx, inputs, mode=mode, random=random, points=list(points) or None,
                      input_shapes=input_shapes, ratio=ratio, limit=limit, progress=True)
    for warning in report.warnings:  # on stderr: also under -q and --json -
        click.echo(click.style("warning: ", fg="yellow", bold=True) + warning, err=True)
    if json_path == "-":
        write_json("-", report.to_json())
    else:
        console.print(table(report, top))
        if mode == "kernel":
            console.print(f"CPU: {isa_text(report.isa)}")
    with AtomicOutputs() as out:
        if json_path and json_path != "-":
            out.write_text(json_path, json_text(report.to_json()))
        if html_path:
            out.write_text(html_path, report.to_html(fail_below))
    if json_path != "-":
        say(f"verdict: {report.verdict(fail_below)}") if report.passed(fail_below) else \
            click.echo(f"verdict: {report.verdict(fail_below)}")
    if not report.passed(fail_below):
        sys.exit(EXIT_GATE)
