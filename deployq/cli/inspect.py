"""``deployq inspect``: list every quant point a model gets under a config."""

from __future__ import annotations

from typing import Optional

import click
from rich.table import Table

from deployq import api
from deployq.cli.common import console, handle_errors, json_option, model_options, onnx_model_option, write_json


@click.command("inspect")
@onnx_model_option
@model_options
@json_option("the quant points")
@handle_errors
def inspect(onnx_file: Optional[str], ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str],
            input_shape: Optional[list], leaf: tuple, json_path: Optional[str]) -> None:
    """List every quant point: name, kind, op, bits, scheme, quantizer, observer.

    The names are the ones to use in a config's `layers:` section, in checkpoints, in
    qparams.json, in the ONNX graph and in diff reports.
    """
    from deployq.qat.capture import ONNX, ONNX_FIXED

    source = api.load_model(ckpt=ckpt, factory=factory, model_kwargs=model_kwargs, onnx_file=onnx_file,
                            config=config, input_shape=input_shape, leaf=leaf)
    found = api.inspect(source)
    write_json(json_path, found.to_json())
    if json_path == "-":
        return
    how = "imported from ONNX" if found.capture in (ONNX, ONNX_FIXED) else f"captured with {found.capture}"
    points = found.points
    table = Table(title=f"{len(points)} quant points ({how})", show_lines=False)
    table.add_column("name", no_wrap=True)
    for col in ("kind", "op", "type", "quantizer", "observer"):
        table.add_column(col)
    for p in points.values():
        table.add_row(p.name, p.kind, p.op, p.spec.describe(), p.spec.quantizer, p.spec.observer_label)
    console.print(table)
    for note in found.notes:
        console.print(f"[dim]{note}[/dim]")
