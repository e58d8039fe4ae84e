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


@main.command()
@model_options
@click.option("--calib", type=click.Path(exists=True),
              help="Calibration data (folder of raw files, images, .npy/.npz): post-training quantization.")
@click.option("--calib-batches", type=click.IntRange(1), default=100, show_default=True,
              help="How many calibration inputs to observe (the thesis: ~100 is enough).")
@click.option("--target", type=click.Choice(["int8", "int16", "fp32"]), default="int8", show_default=True,
              help="int8: 8-bit body, special layers at their bits; int16: everything 16-bit; fp32: float only.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="deployq-out", show_default=True,
              help="Output folder for model.float.onnx, model.<target>.onnx and qparams.json.")
@click.option("--opset", type=click.IntRange(21), default=21, show_default=True, help="ONNX opset (>= 21).")
@click.option("--weight-bits", type=click.IntRange(2, 16),
              help="Bits of the 8-bit-body weights, e.g. 7 for CPUs without VNNI (u8 x s8 saturation).")
@click.option("--act-signed", is_flag=True, help="Signed 8-bit activations (s8s8 kernels; exact, same grid).")
@handle_errors
def export(ckpt: Optional[str], factory: Optional[str], config: Optional[str], input_shape: Optional[tuple[int, ...]],
           calib: Optional[str], calib_batches: int, target: str, out_dir: str, opset: int,
           weight_bits: Optional[int], act_signed: bool) -> None:
    """Export a checkpoint to ONNX: the float model and the integer (QDQ) model.

    \b
    deployq export --ckpt qat.pt --target int8 --out build/
    deployq export --ckpt float.pth --model pkg.mod:build --input-shape 1,3,224,224 --calib images/

    BatchNorm is folded and Conv+activation fused by the rewriter; every quant point gets
    QuantizeLinear/DequantizeLinear with the learned scales and zero points (9-16-bit layers as
    Clip + 16-bit Q/DQ, exact). Files appear only when the whole export succeeded.
    """
    from deployq.export import bit_width_summary, export as run_export
    from deployq.model_source import resolve_model

    if ckpt is None:
        raise UserError("export needs --ckpt (a deployq checkpoint, or a float state_dict with --model)")
    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape)
    result = run_export(source, out_dir, target=target, opset=opset, weight_bits=weight_bits,
                        act_signed=act_signed, calib=calib, calib_limit=calib_batches)
    table = Table(title=f"deployq export -> {result.out_dir}  ({result.seconds:.1f} s)")
    table.add_column("what")
    table.add_column("value")
    for kind, counts in bit_width_summary(result.records).items():
        table.add_row(f"{kind} quant points", ", ".join(f"{n} x {b}-bit" for b, n in sorted(counts.items())))
    sizes = result.sizes()
    for name, path in result.files.items():
        table.add_row(str(path.name), f"{sizes[name] / 1024:.1f} KiB")
    if target in sizes:
        table.add_row(f"{target} / float size", f"{sizes[target] / sizes['float']:.1%}")
    for what, n in sorted(result.log.counts.items()):
        table.add_row("rewriter", f"{what}: {n}")
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")


def run() -> None:  # pragma: no cover - console entry point
    main(prog_name="deployq")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
