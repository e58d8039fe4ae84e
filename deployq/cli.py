"""The ``deployq`` command line: one subcommand per job, shared option groups, clear errors.

    deployq inspect  --model deployq.examples.zoo:unet --input-shape 1,3,64,64 [--config q.yaml]
    deployq export   --ckpt qat.pt --target int8 --out build/
    deployq diff     build/model.float.onnx build/model.int8.onnx
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Optional

import click
from rich.console import Console
from rich.table import Table

from deployq._version import __version__

# a wide console when output goes to a file or pipe, so tables keep one row per line
console = Console(width=None if sys.stdout.isatty() else 200)


class UserError(click.ClickException):
    """An error caused by the input; printed as 'Error: ...' with exit status 1."""


def handle_errors(command: Callable) -> Callable:
    """Turn deployq's own errors (ValueError family, missing files) into clean CLI errors."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError, KeyError, RuntimeError, ImportError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UserError(str(message)) from err

    return wrapper


def parse_shape(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,4,128,128") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{value!r}: every dimension must be a positive integer")
    return shape


def model_options(command: Callable) -> Callable:
    """--ckpt / --model / --config / --input-shape, shared by the commands that build a model."""
    options = [
        click.option("--ckpt", type=click.Path(dir_okay=False), help="deployq checkpoint (or a plain state_dict with --model)."),
        click.option("--model", "factory", metavar="PKG.MOD:FACTORY",
                     help="Model factory to import. Naming it allows deployq to import that code."),
        click.option("--config", type=click.Path(exists=True, dir_okay=False),
                     help="Quantization config (YAML): defaults, per-layer overrides, fusion."),
        click.option("--input-shape", callback=lambda c, p, v: parse_shape(v), metavar="N,C,H,W",
                     help="Model input shape, e.g. 1,4,128,128 (default: the checkpoint's)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deployq")
def main() -> None:
    """deployq: PyTorch -> QAT (+ distillation) -> integer ONNX for onnxruntime, checked layer by layer.

    \b
    Typical flow:
      deployq inspect --model pkg.mod:build --input-shape 1,3,224,224   # list quant points
      deployq export  --ckpt qat.pt --target int8 --out build/            # float + QDQ ONNX
      deployq diff    build/model.float.onnx build/model.int8.onnx       # per-layer parity
    """


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the quant points as JSON.")
@handle_errors
def inspect(ckpt: Optional[str], factory: Optional[str], config: Optional[str],
            input_shape: Optional[tuple[int, ...]], as_json: bool) -> None:
    """List every quant point: name, kind, op, bits, scheme, quantizer, observer.

    The names are the ones to use in a config's `layers:` section, in checkpoints, in
    qparams.json, in the ONNX graph and in diff reports.
    """
    from deployq.model_source import resolve_model
    from deployq.prepare import quant_points

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape)
    points = quant_points(source.qmodel)
    if as_json:
        click.echo(json.dumps([
            {"name": p.name, "kind": p.kind, "op": p.op, **p.spec.to_dict(), "input": p.input}
            for p in points.values()], indent=2))
        return
    table = Table(title=f"{len(points)} quant points", show_lines=False)
    table.add_column("name", no_wrap=True)
    for col in ("kind", "op", "type", "quantizer", "observer"):
        table.add_column(col)
    for p in points.values():
        table.add_row(p.name, p.kind, p.op, p.spec.describe(), p.spec.quantizer, p.spec.observer)
    console.print(table)


def run() -> None:  # pragma: no cover - console entry point
    main(prog_name="deployq")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
