"""The ``deployq`` command line: one subcommand per job, shared option groups, clear errors.

    deployq inspect  --model deployq.examples.zoo:unet --input-shape 1,3,64,64 [--config q.yaml]
    deployq export   --ckpt qat.pt --target int8 --out build/
    deployq diff     build/model.float.onnx build/model.int8.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from deployq._version import __version__
from deployq.cli_common import (EXIT_GATE, POSITIVE, UserError, console, handle_errors, json_option, model_options,
                                parse_input_shapes, say, write_json)
from deployq.cli_train import hessian, train

DEVICE_NAMES = ("cpu", "nnapi", "qnn", "xnnpack", "coreml")  # the profiles of deployq.devices.DEVICES (a test keeps them equal)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deployq")
def main() -> None:
    """deployq: PyTorch -> QAT (+ distillation) -> integer ONNX for onnxruntime, checked layer by layer.

    \b
    Typical flow:
      deployq inspect --model pkg.mod:build --input-shape 1,3,224,224   # list quant points
      deployq hessian --ckpt qat.pt --input calib/ --yaml distill.yaml   # where to distill
      deployq train   --recipe recipe.yaml                               # QAT + distillation
      deployq export  --ckpt qat.pt --target int8 --out build/            # float + QDQ ONNX
      deployq diff    build/model.float.onnx build/model.int8.onnx       # per-layer parity
      deployq check   --ckpt qat.pt --onnx build/model.int8.onnx         # torch vs ONNX codes
    """


@main.command()
@model_options
@json_option("the quant points")
@handle_errors
def inspect(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str],
            input_shape: Optional[list], json_path: Optional[str]) -> None:
    """List every quant point: name, kind, op, bits, scheme, quantizer, observer.

    The names are the ones to use in a config's `layers:` section, in checkpoints, in
    qparams.json, in the ONNX graph and in diff reports.
    """
    from deployq.model_source import resolve_model
    from deployq.prepare import quant_points

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs)
    points = quant_points(source.qmodel)
    write_json(json_path, [{"name": p.name, "kind": p.kind, "op": p.op, **p.spec.to_dict(), "input": p.input}
                           for p in points.values()])
    if json_path == "-":
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
@click.option("--input", "--calib", "calib", type=click.Path(exists=True),
              help="Calibration data (folder of raw files, images, .npy/.npz): post-training quantization.")
@click.option("--calib-batches", type=click.IntRange(1), default=100, show_default=True,
              help="How many calibration inputs to observe (the thesis: ~100 is enough).")
@click.option("--target", type=click.Choice(["int8", "int16", "fp32"]), default="int8", show_default=True,
              help="int8: 8-bit body, special layers at their bits; int16: everything 16-bit; fp32: float only.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="deployq-out", show_default=True,
              help="Output folder for model.float.onnx, model.<target>.onnx and qparams.json.")
@click.option("--opset", type=click.IntRange(21), default=21, show_default=True,
              help="ONNX opset: 21 (16-bit QuantizeLinear) up to the newest the installed onnxruntime runs.")
@click.option("--weight-bits", type=click.IntRange(2, 16),
              help="Bits of the 8-bit-body weights, e.g. 7 for CPUs without VNNI (u8 x s8 saturation).")
@click.option("--act-signed", is_flag=True, help="Signed 8-bit activations (s8s8 kernels; exact, same grid).")
@click.option("--dynamic-hw", is_flag=True,
              help="Keep input height and width symbolic (fully convolutional models): `deployq run` then "
                   "processes whole frames in one call instead of tiles.")
@click.option("--device", type=click.Choice(list(DEVICE_NAMES)), default="cpu", show_default=True,
              help="Device profile: cpu (any config); nnapi (8-bit, fixed shapes, ConvTranspose as Conv + "
                   "DepthToSpace); qnn (u8/u16 activations, 8-bit symmetric weights, fixed shapes); xnnpack "
                   "(8-bit, symmetric weights, ConvTranspose as Conv + DepthToSpace); coreml "
                   "(no Q/DQ: also writes model.coreml.onnx, float with the learned weights). Configs a "
                   "device cannot run are refused.")
@click.option("--ort/--no-ort", "ort_format", default=True, show_default=True,
              help="Also write the ORT-format model (.ort) and the required-operators config of a reduced build.")
@click.option("--output-names", metavar="NAME[,NAME...]",
              callback=lambda c, p, v: [n.strip() for n in v.split(",")] if v else None,
              help="Names of the exported models' outputs, in order (default: the traced names, e.g. output_0).")
@json_option("what was exported and measured (files, quant points, provider coverage)")
@handle_errors
def export(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str], input_shape: Optional[list],
           calib: Optional[str], calib_batches: int, target: str, out_dir: str, opset: int,
           weight_bits: Optional[int], act_signed: bool, dynamic_hw: bool, device: str, ort_format: bool,
           output_names: Optional[list], json_path: Optional[str]) -> None:
    """Export a checkpoint to ONNX: the float model and the integer (QDQ) model.

    \b
    deployq export --ckpt qat.pt --target int8 --out build/
    deployq export --ckpt float.pth --model pkg.mod:build --input-shape 1,3,224,224 --calib images/

    deployq export --ckpt qat_all8.pt --device nnapi --input-shape 1,4,256,256 --out build/nnapi/

    BatchNorm is folded and Conv+activation fused by the rewriter; every quant point gets
    QuantizeLinear/DequantizeLinear with the learned scales and zero points (9-16-bit layers as
    Clip + 16-bit Q/DQ, exact). The summary ends with how many nodes NNAPI and CoreML would take,
    by onnxruntime's own mobile usability checker. Files appear only when the whole export succeeded.
    """
    from deployq.export import bit_width_summary, deployed_file_name, export as run_export, export_json
    from deployq.files import check_output
    from deployq.model_source import resolve_model

    check_output(out_dir, "--out", folder=True)
    deployed = deployed_file_name(target, device)
    for name in ("model.float.onnx", f"model.{target}.onnx", "qparams.json", f"model.{target}.pt",
                 f"model.{deployed}.onnx", f"model.{deployed}.ort", f"model.{deployed}.required_operators.config"):
        check_output(Path(out_dir) / name, "--out")

    if ckpt is None:
        raise UserError("export needs --ckpt (a deployq checkpoint, or a float state_dict with --model)")
    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs)
    result = run_export(source, out_dir, target=target, opset=opset, weight_bits=weight_bits,
                        act_signed=act_signed, calib=calib, calib_limit=calib_batches, dynamic_hw=dynamic_hw,
                        device=device, ort_format=ort_format, output_names=output_names, progress=json_path != "-")
    write_json(json_path, export_json(result))
    if json_path == "-":
        return
    table = Table(title=f"deployq export --device {device} -> {result.out_dir}  ({result.seconds:.1f} s)")
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
    for c in result.coverage:
        table.add_row(f"{c.provider} would take", c.text())
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")


@main.command()
@click.argument("float_onnx", type=click.Path(dir_okay=False))
@click.argument("quant_onnx", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", type=click.Path(exists=True),
              help="Inputs: a raw file or folder (rawpy), images, or .npy/.npz.")
@click.option("--random", "random_count", type=click.IntRange(1), help="N random inputs of the model's input shape.")
@click.option("--ratio", type=POSITIVE, help="Exposure ratio applied to raw inputs (SID-style).")
@click.option("--limit", type=click.IntRange(1), default=16, show_default=True, help="At most this many inputs from --input.")
@click.option("--mode", type=click.Choice(["accumulated", "local", "sensitivity", "kernel"]), default="accumulated",
              show_default=True, help="Which error to measure (see below).")
@json_option("every number")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--top", type=click.IntRange(1), help="Show only the K worst quant points.")
@click.option("--fail-below", type=float, metavar="SQNR_DB",
              help="CI gate: exit 3 if the output SQNR is below this (errors exit 1).")
@click.option("--input-shape", multiple=True, callback=lambda c, p, v: parse_input_shapes(v), metavar="[NAME:]N,C,H,W",
              help="Input shape for models with symbolic height/width (a --dynamic-hw export); repeat as NAME:N,C,H,W.")
@click.option("--points", multiple=True, metavar="GLOB",
              help="Only these quant points (repeatable glob, e.g. 'layer4.*'); sensitivity and kernel modes then "
                   "measure only them.")
@handle_errors
def diff(float_onnx: str, quant_onnx: str, input_path: Optional[str], random_count: Optional[int],
         ratio: Optional[float], limit: int, mode: str, json_path: Optional[str], html_path: Optional[str],
         top: Optional[int], fail_below: Optional[float], input_shape: Optional[list], points: tuple[str, ...]) -> None:
    """Compare a float ONNX model and its quantized (QDQ) model, quant point by quant point.

    \b
    Modes:
      accumulated  both whole models; each layer's error includes what flowed in from above
      local        each layer fed with the float model's values: its own error only
      sensitivity  one quant point quantized at a time, everything else float; output error, ranked
      kernel       real integer kernels (fully optimized sub-models) vs the reference view
    Works on deployq exports and on onnxruntime.quantization.quantize_static models.
    Exit status: 0 pass, 3 below --fail-below (the gate), 1 an error (bad file, option or input).
    """
    from deployq.api import diff as run_diff
    from deployq.files import AtomicOutputs, check_output, json_text
    from deployq.report import table
    from deployq.sim import isa_text

    if html_path:
        check_output(html_path, "--html")
    if input_path and random_count:
        raise UserError("give --input or --random, not both")
    report = run_diff(float_onnx, quant_onnx, input_path, mode=mode, random=random_count or 4,
                      points=list(points) or None, input_shapes=input_shape, ratio=ratio, limit=limit, progress=True)
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


@main.command()
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

    report = run_check(ckpt, onnx_path, input_path, random=random_count, local=not accumulated, factory=factory,
                       progress=True)
    write_json(json_path, report.to_json())
    if json_path != "-":
        t = Table(title=f"deployq check: torch fake-quant vs {report.onnx} (codes)")
        for col in ("name", "kind", "bits", "elements", "equal", "1 LSB", ">1 LSB"):
            t.add_column(col, justify="left" if col in ("name", "kind") else "right", no_wrap=col == "name")
        for p in report.points:
            t.add_row(p.name, p.kind, str(p.bits), str(p.elements), f"{100 * p.exact_fraction:.3f}%", str(p.one),
                      f"[bold red]{p.more}[/]" if p.more else "0")
        console.print(t)
        say(report.verdict()) if report.passed() else click.echo(report.verdict())
    if not report.passed():
        sys.exit(EXIT_GATE)


@main.command(name="run")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.argument("inputs", metavar="INPUT...", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="deployq-run", show_default=True,
              help="Folder for the PNGs (one per input, named after it).")
@click.option("--ratio", type=POSITIVE,
              help="Exposure ratio (SID: long / short). Default: from SID file names, else 1.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--tile", type=click.IntRange(8),
              help="Process in tiles of this side (packed pixels). Default: a model exported with --dynamic-hw takes "
                   "whole frames up to 2048x2048 packed pixels; a fixed-size model, tiles of its input size.")
@click.option("--overlap", type=click.IntRange(0),
              help="Overlap between tiles, in packed pixels; seams are blended over it (default: a quarter tile, at most 16).")
@click.option("--batch", type=click.IntRange(1), default=4, show_default=True, help="Tiles per onnxruntime call.")
@click.option("--bench", "bench_runs", type=click.IntRange(1), help="Also time N calls and print latency percentiles.")
@json_option("the PNGs written and the latency percentiles")
@handle_errors
def run_command(model_path: str, inputs: tuple[str, ...], out_dir: str, ratio: Optional[float], threads: Optional[int],
                tile: Optional[int], overlap: Optional[int], batch: int, bench_runs: Optional[int],
                json_path: Optional[str]) -> None:
    """Enhance raw camera files with an ONNX model (float or int8): raw -> packed -> ORT -> sRGB PNG.

    \b
    deployq run build/model.int8.onnx short/ --ratio 250 --out out/
    deployq run build/model.int8.onnx --bench 50          # latency only

    A model exported with `deployq export --dynamic-hw` takes each frame whole (no seams); a
    fixed-size model, or a frame over 2048x2048 packed pixels, is processed in overlapping tiles
    whose seams are blended. Reads what LibRaw reads (ARW, DNG, NEF, CR2, ...).
    """
    from deployq.files import check_output
    from deployq.run import bench, enhance, load_engine

    if inputs:
        check_output(out_dir, "--out", folder=True)

    if not inputs and not bench_runs:
        raise UserError("give raw files or folders to enhance, or --bench N to time the model")
    tell = (lambda _: None) if json_path == "-" else say
    data: dict = {"model": model_path}
    if inputs:
        data["written"] = [str(p) for p in enhance(model_path, inputs, out_dir, ratio=ratio, threads=threads, tile=tile,
                                                   overlap=overlap, batch=batch, say=tell)]
    if bench_runs:
        engine = load_engine(model_path, threads)
        result = bench(engine, bench_runs, batch=batch)
        p = result.percentiles()
        th, tw = result.size
        tell(f"latency over {bench_runs} calls of {batch} tile(s) {th}x{tw}: p50 {p['p50']:.2f} ms, "
             f"p90 {p['p90']:.2f} ms, p99 {p['p99']:.2f} ms")
        data["latency_ms"] = {**p, "calls": bench_runs, "tiles_per_call": batch, "tile": [th, tw]}
    write_json(json_path, data)


main.add_command(hessian)
main.add_command(train)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
