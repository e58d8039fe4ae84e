"""``deployq hessian``: rank activations by Hessian trace and write the distillation config."""

from __future__ import annotations

import math
from typing import Optional

import click
from rich.table import Table

from deployq import api
from deployq.cli.common import (POSITIVE, UserError, api_option, console, handle_errors, json_option, model_options,
                                write_json)
from deployq.train.hessian_report import DEFAULT_SHARE


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


@click.command("hessian")
@model_options
@api_option(api.hessian, "data", "--input", "--data", required=True, type=click.Path(exists=True),
            help="Inputs (folder or file: raw, images, .npy/.npz), or a YAML dataset / recipe (uses its targets).")
@api_option(api.hessian, "layers", "--layers", multiple=True, metavar="GLOB",
            help="Only activations matching this glob (repeatable). Default: every activation quant point.")
@api_option(api.write_distill, "top", "--top", type=click.IntRange(1), show_default=True,
            help="Layers written to the config.")
@api_option(api.write_distill, "out", "--yaml", "--out", type=click.Path(dir_okay=False), show_default=True,
            help="Distillation config to write (native form; a recipe's `distill:` section).")
@api_option(api.hessian, "tol", "--tol", type=click.FloatRange(0), show_default=True,
            help="Stop a layer when the standard error of its trace estimate is at most this fraction of the "
                 "estimate (checked once every batch has contributed).")
@api_option(api.hessian, "max_iter", "--max-iter", type=click.IntRange(1), show_default=True,
            help="At most this many Rademacher samples per layer.")
@api_option(api.write_distill, "coeff", "--coeff", type=POSITIVE, show_default=True,
            help="The distillation weights sum to this.")
@api_option(api.hessian, "limit", "--batches", type=click.IntRange(1), show_default=True,
            help="How many batches of the data to use.")
@api_option(api.hessian, "batch_size", "--batch-size", type=click.IntRange(1), show_default=True,
            help="Batch size for a YAML dataset (input files come in the model's input shape).")
@api_option(api.hessian, "loss", "--loss", show_default=True,
            help="auto | mse | l1 | cross_entropy | lowlight: the loss whose Hessian is traced (with targets).")
@api_option(api.hessian, "mode", "--mode", type=click.Choice(["float", "quantize"]), show_default=True,
            help="Trace the float network (the thesis) or the fake-quantized one (a calibrated checkpoint).")
@api_option(api.hessian, "seed", "--seed", type=int, show_default=True, help="Seed of the Rademacher vectors.")
@api_option(api.hessian, "estimator", "--estimator", type=click.Choice(["shared", "per-layer"]), show_default=True,
            help="shared: every layer's trace from one Hessian-vector product per sample (fast); per-layer: "
                 "one product per layer and sample (less variance, time grows with the layer count).")
@api_option(api.hessian, "refine", "--refine", type=click.IntRange(0), show_default=True,
            help="With the shared estimator: estimate the N layers it ranks highest again with per-layer products "
                 "(the shared estimate's cross terms can swap close layers at the top; 0: don't).")
@api_option(api.hessian, "pixels", "--pixels", type=click.IntRange(1024), show_default=True,
            help="Pixels per sample read from files: a larger model input is read as crops of about this many "
                 "(aspect kept) where the model runs on them (fully convolutional), which bounds the time.")
@json_option("every layer's trace, standard error and suggested bits")
@handle_errors
def hessian(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str],
            input_shape: Optional[list], leaf: tuple, data: str, layers: tuple[str, ...], top: int, out: str,
            tol: float, max_iter: int, coeff: float, limit: int, batch_size: int, loss: str, mode: str, seed: int,
            estimator: str, refine: int, pixels: int, json_path: Optional[str]) -> None:
    """Rank activations by Hessian trace (Hutchinson) and write a distillation config.

    \b
    deployq hessian --ckpt qat.pt --data calib/ --top 3 --out distill.yaml
    deployq hessian --ckpt float.pth --model pkg.mod:build --input-shape 1,4,64,64 --data recipe.yaml

    Sensitivity is Tr(H)/n of the loss w.r.t. each activation (HAWQ-V2); the top layers are
    written with weights proportional to it. The bit-width column is a HAWQ-style suggestion.
    """
    from deployq.core.files import check_output
    from deployq.train.losses import DistillError

    check_output(out, "--yaml")
    source = api.load_model(ckpt=ckpt, factory=factory, model_kwargs=model_kwargs, config=config,
                            input_shape=input_shape, leaf=leaf)
    report = api.hessian(source, data, layers=layers, tol=tol, max_iter=max_iter, limit=limit, batch_size=batch_size,
                         loss=loss, mode=mode, seed=seed, estimator=estimator, refine=refine, pixels=pixels,
                         progress=True)
    try:
        weights = dict(report.distill_config(top, coeff).layers)
    except DistillError as err:
        weights, problem = {}, str(err)
    else:
        problem = None
    suggestions = {s.name: s for s in report.bit_suggestions()}
    low, high = report.bits
    table = Table(title=f"Hessian trace of {len(report.layers)} activations ({report.seconds:.1f} s)")
    for column in ("#", "layer", "n", "Tr(H)", "± s.e.", "Tr(H)/n", "iters", "s", f"Ω{low}", f"Ω{high}",
                   "bits (suggested)", "λ"):
        table.add_column(column, no_wrap=column == "layer", justify="left" if column == "layer" else "right")
    for rank, layer in enumerate(report.layers, 1):
        s = suggestions[layer.name]
        table.add_row(str(rank), layer.name, str(layer.numel), _fmt(layer.trace), _fmt(layer.stderr),
                      _fmt(layer.per_element), f"{layer.iterations}{'' if layer.converged else '*'}",
                      f"{layer.seconds:.2f}", _fmt(s.omega[low]), _fmt(s.omega[high]), str(s.bits),
                      _fmt(weights[layer.name]) if layer.name in weights else "")
    if json_path == "-":
        console.quiet = True  # stdout carries only the JSON
    console.print(table)
    console.print(f"[dim]Hessian of: {report.loss}.[/dim]")
    if not all(layer.converged for layer in report.layers):
        console.print(f"[dim]* stopped at --max-iter {max_iter} with its standard error above --tol {tol:g} of the "
                      "estimate (± s.e. column).[/dim]")
    console.print(f"[dim]bits: a HAWQ-style suggestion, {high} where Ω{low} = ½·Tr(H)/n·‖Q{low}(a) − a‖² "
                  f"carries ≥ {DEFAULT_SHARE:.0%} of the total; confirm with a parity check.[/dim]")
    if problem is not None:
        raise UserError(f"no distillation config written: {problem}")
    chosen = api.write_distill(report, out, top=top, coeff=coeff)
    console.print(f"wrote {out}: {len(chosen.layers)} layers, Σλ = {coeff:g}")
    write_json(json_path, {**report.to_json(), "distill_config": str(out),
                           "suggested_bits": {n: s.bits for n, s in suggestions.items()}})
