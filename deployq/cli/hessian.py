"""``deployq hessian``: rank activations by Hessian trace and write the distillation config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import click
import yaml
from rich.table import Table

from deployq.cli.common import POSITIVE, UserError, console, handle_errors, json_option, model_options, write_json
from deployq.train.hessian import DEFAULT_MAX_ITER, DEFAULT_TOL
from deployq.train.hessian_report import DEFAULT_SHARE

YAML_SUFFIXES = (".yaml", ".yml")


def _dataset_batches(path: Path, batch_size: int, limit: int) -> list[Any]:
    """Batches from a recipe-style dataset: a YAML file with a ``data:`` section (a recipe) or
    the section itself (``kind: ...``); the train split, relative paths from the file's folder."""
    from torch.utils.data import DataLoader

    from deployq.train.data import RecipeError, build_dataset, data_spec
    from deployq.train.models import collate

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    section = doc.get("data", doc) if isinstance(doc, dict) else doc
    spec = data_spec(section, path.resolve().parent, str(path))
    loader = DataLoader(build_dataset(spec, "train"), batch_size=batch_size, collate_fn=collate)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == limit:
            break
    return batches


def _input_batches(path: Path, inputs: list, limit: int) -> list[Any]:
    """Input-only batches from a file or folder (raw files, images, .npy/.npz; .npz keyed by input
    name for several inputs), each of the model's input shapes (deployq.calib.data.load_feeds)."""
    import torch

    from deployq.calib.data import load_feeds

    feeds = load_feeds(path, [(i.name, i.shape) for i in inputs], limit=limit)
    return [{"input": tuple(torch.from_numpy(f[i.name]) for i in inputs)} for f in feeds]


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


@click.command("hessian")
@model_options
@click.option("--input", "--data", "data", required=True, type=click.Path(exists=True),
              help="Inputs (folder or file: raw, images, .npy/.npz), or a YAML dataset / recipe (uses its targets).")
@click.option("--layers", "patterns", multiple=True, metavar="GLOB",
              help="Only activations matching this glob (repeatable). Default: every activation quant point.")
@click.option("--top", type=click.IntRange(1), default=3, show_default=True, help="Layers written to the config.")
@click.option("--yaml", "--out", "out", type=click.Path(dir_okay=False), default="distill.yaml", show_default=True,
              help="Distillation config to write (native form; a recipe's `distill:` section).")
@click.option("--tol", type=click.FloatRange(0), default=DEFAULT_TOL, show_default=True,
              help="Stop a layer when the relative change of its running mean is below this.")
@click.option("--max-iter", type=click.IntRange(1), default=DEFAULT_MAX_ITER, show_default=True,
              help="At most this many Rademacher samples per layer.")
@click.option("--coeff", type=POSITIVE, default=1.0, show_default=True,
              help="The distillation weights sum to this.")
@click.option("--batches", "limit", type=click.IntRange(1), default=8, show_default=True,
              help="How many batches of the data to use.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="Batch size for a YAML dataset (input files come in the model's input shape).")
@click.option("--loss", default="auto", show_default=True,
              help="auto | mse | l1 | cross_entropy | lowlight: the loss whose Hessian is traced (with targets).")
@click.option("--mode", type=click.Choice(["float", "quantize"]), default="float", show_default=True,
              help="Trace the float network (the thesis) or the fake-quantized one (a calibrated checkpoint).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Rademacher vectors.")
@click.option("--estimator", type=click.Choice(["shared", "per-layer"]), default="shared", show_default=True,
              help="shared: every layer's trace from one Hessian-vector product per sample (fast); per-layer: "
                   "one product per layer and sample (less variance, time grows with the layer count).")
@json_option("every layer's trace, standard error and suggested bits")
@handle_errors
def hessian(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str],
            input_shape: Optional[list], leaf: tuple,
            data: str, patterns: tuple[str, ...], top: int, out: str, tol: float, max_iter: int, coeff: float,
            limit: int, batch_size: int, loss: str, mode: str, seed: int, estimator: str,
            json_path: Optional[str]) -> None:
    """Rank activations by Hessian trace (Hutchinson) and write a distillation config.

    \b
    deployq hessian --ckpt qat.pt --data calib/ --top 3 --out distill.yaml
    deployq hessian --ckpt float.pth --model pkg.mod:build --input-shape 1,4,64,64 --data recipe.yaml

    Sensitivity is Tr(H)/n of the loss w.r.t. each activation (HAWQ-V2); the top layers are
    written with weights proportional to it. The bit-width column is a HAWQ-style suggestion.
    """
    from deployq.train.losses import DistillError
    from deployq.core.files import check_output
    from deployq.train.hessian import hessian_traces
    from deployq.train.hessian_report import write_distill_config
    from deployq.qat.loading import resolve_model

    check_output(out, "--yaml")

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs, leaf_modules=leaf)
    path = Path(data)
    if path.is_file() and path.suffix.lower() in YAML_SUFFIXES:
        batches = _dataset_batches(path, batch_size, limit)
    else:
        batches = _input_batches(path, source.inputs, limit)
    report = hessian_traces(source.qmodel, batches, list(patterns) or None, loss=loss, mode=mode, tol=tol,
                            max_iter=max_iter, seed=seed, progress=True, estimator=estimator)
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
        console.print(f"[dim]* stopped at --max-iter {max_iter} before the relative change fell below --tol {tol:g}.[/dim]")
    console.print(f"[dim]bits: a HAWQ-style suggestion, {high} where Ω{low} = ½·Tr(H)/n·‖Q{low}(a) − a‖² "
                  f"carries ≥ {DEFAULT_SHARE:.0%} of the total; confirm with a parity check.[/dim]")
    if problem is not None:
        raise UserError(f"no distillation config written: {problem}")
    chosen = write_distill_config(report, out, top, coeff)
    console.print(f"wrote {out}: {len(chosen.layers)} layers, Σλ = {coeff:g}")
    write_json(json_path, {**report.to_json(), "distill_config": str(out),
                           "suggested_bits": {n: s.bits for n, s in suggestions.items()}})
