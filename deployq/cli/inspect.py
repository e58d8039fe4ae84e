"""``deployq inspect``: list every quant point a model gets under a config."""

from __future__ import annotations

from typing import Optional

import click
from rich.table import Table

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
    from deployq.qat.loading import resolve_model
    from deployq.qat.prepare import capture_notes, quant_points

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs, leaf_modules=leaf, onnx_file=onnx_file)
    points = quant_points(source.qmodel)
    write_json(json_path, [{"name": p.name, "kind": p.kind, "op": p.op, **p.spec.to_dict(), "input": p.input}
                           for p in points.values()])
    if json_path == "-":
        return
    how = source.qmodel.get_submodule("act_quant").capture
    how = "imported from ONNX" if how in (ONNX, ONNX_FIXED) else f"captured with {how}"
    table = Table(title=f"{len(points)} quant points ({how})", show_lines=False)
    table.add_column("name", no_wrap=True)
    for col in ("kind", "op", "type", "quantizer", "observer"):
        table.add_column(col)
    for p in points.values():
        table.add_row(p.name, p.kind, p.op, p.spec.describe(), p.spec.quantizer, p.spec.observer)
    console.print(table)
    for note in capture_notes(source.qmodel):
        console.print(f"[dim]{note}[/dim]")
