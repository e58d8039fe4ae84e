"""``deployq train``: quantization-aware training with distillation, from a recipe.

    deployq train --recipe qat.yaml [--resume] [--epochs N]
    torchrun --nproc_per_node=4 -m deployq.cli.train train --recipe qat.yaml

``python -m deployq.cli.train`` runs ``train`` and ``hessian`` without the main group (what
``torchrun -m`` needs); ``deployq.cli.main`` registers the same command objects.
"""

from __future__ import annotations

from typing import Optional

import click

from deployq import api
from deployq.cli.common import api_option, console, handle_errors, json_option, write_json
from deployq.cli.hessian import hessian



@click.command("train")
@api_option(api.train, "recipe", "--recipe", required=True, type=click.Path(exists=True, dir_okay=False),
            help="Training recipe (YAML): model, float weights, quant config, data, loss, distillation.")
@api_option(api.train, "resume", "--resume", is_flag=True,
            help="Continue the run in the recipe's output_dir (model, optimizer, epoch, best).")
@api_option(api.train, "epochs", "--epochs", type=click.IntRange(1),
            help="Train to this many epochs (overrides the recipe).")
@api_option(api.train, "seed", "--seed", type=int,
            help="Seed of the data order and initialization (overrides the recipe's `seed`).")
@api_option(api.train, "output_dir", "--out", type=click.Path(file_okay=False),
            help="Write to this folder instead of the recipe's output_dir (one recipe, several seeds).")
@json_option("the best epoch, the checkpoints and every epoch's metrics")
@handle_errors
def train(recipe: str, resume: bool, epochs: Optional[int], seed: Optional[int], output_dir: Optional[str],
          json_path: Optional[str]) -> None:
    """Quantization-aware training with feature distillation, from a recipe.

    \b
    deployq train --recipe qat.yaml
    deployq train --recipe qat.yaml --resume --epochs 30
    deployq train --recipe qat.yaml --seed 1 --out runs/qat_seed1
    torchrun --nproc_per_node=4 -m deployq.cli.train train --recipe qat.yaml

    Writes best.pt and last.pt (deployq checkpoints), metrics.csv / metrics.json and state.pt
    (for --resume) to the recipe's output_dir, on rank 0 only.
    """
    if json_path == "-":
        console.quiet = True  # stdout carries only the JSON
    result = api.train(recipe, resume=resume, epochs=epochs, log=console.print, seed=seed, output_dir=output_dir)
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
    """deployq hessian / train (for `python -m deployq.cli.train`, e.g. under torchrun)."""


commands.add_command(hessian)
commands.add_command(train)

if __name__ == "__main__":  # pragma: no cover
    commands(prog_name="deployq")
