"""``deployq hessian`` and ``deployq train``: click commands for the main group.

    deployq hessian --ckpt qat.pt --data calib/ --top 3 --out distill.yaml
    deployq train --recipe qat.yaml [--resume] [--epochs N]
    torchrun --nproc_per_node=4 -m deployq.cli_train train --recipe qat.yaml

The commands are module-level click.Command objects (``hessian``, ``train``) that
``deployq.cli.main`` registers with ``add_command``; ``python -m deployq.cli_train`` runs them
without the main group (what ``torchrun -m`` needs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import click
import yaml
from rich.table import Table

from deployq.cli_common import POSITIVE, UserError, console, handle_errors, json_option, model_options, write_json
from deployq.hessian import DEFAULT_MAX_ITER, DEFAULT_SHARE, DEFAULT_TOL

YAML_SUFFIXES = (".yaml", ".yml")


def _dataset_batches(path: Path, batch_size: int, limit: int) -> list[Any]:
    """Batches from a recipe-style dataset: a YAML file with a ``data:`` section (a recipe) or
    the section itself (``kind: ...``); the train split, relative paths from the file's folder."""
    from torch.utils.data import DataLoader

    from deployq.train import RecipeError, build_dataset, collate, data_spec

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
            input_shape: Optional[list],
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
    from deployq.distill import DistillError
    from deployq.files import check_output
    from deployq.hessian import hessian_traces, write_distill_config
    from deployq.model_source import resolve_model

    check_output(out, "--yaml")

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs)
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


@click.command("train")
@click.option("--recipe", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training recipe (YAML): model, float weights, quant config, data, loss, distillation.")
@click.option("--resume", is_flag=True, help="Continue the run in the recipe's output_dir (model, optimizer, epoch, best).")
@click.option("--epochs", type=click.IntRange(1), help="Train to this many epochs (overrides the recipe).")
@json_option("the best epoch, the checkpoints and every epoch's metrics")
@handle_errors
def train(recipe: str, resume: bool, epochs: Optional[int], json_path: Optional[str]) -> None:
    """Quantization-aware training with feature distillation, from a recipe.

    \b
    deployq train --recipe qat.yaml
    deployq train --recipe qat.yaml --resume --epochs 30
    torchrun --nproc_per_node=4 -m deployq.cli_train train --recipe qat.yaml

    Writes best.pt and last.pt (deployq checkpoints), metrics.csv / metrics.json and state.pt
    (for --resume) to the recipe's output_dir, on rank 0 only.
    """
    from deployq.train import train as run_training

    if json_path == "-":
        console.quiet = True  # stdout carries only the JSON
    result = run_training(recipe, resume=resume, epochs=epochs, log=console.print)
    if not result.is_main:
        return
    best = "none" if result.best_epoch is None else f"{result.best_value:.4g} at epoch {result.best_epoch}"
    console.print(f"best: {best}; checkpoints in {result.output_dir}")
    write_json(json_path, {"best_value": result.best_value, "best_epoch": result.best_epoch,
                           "output_dir": str(result.output_dir),
                           "checkpoints": {k: str(v) for k, v in result.checkpoints.items()},
                           "history": result.history, "notes": list(result.notes)})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def commands() -> None:
    """deployq hessian / train (for `python -m deployq.cli_train`, e.g. under torchrun)."""


commands.add_command(hessian)
commands.add_command(train)

if __name__ == "__main__":  # pragma: no cover
    commands(prog_name="deployq")
