"""The ``deployq`` command line: one subcommand per job, shared option groups, clear errors.

    deployq inspect  --model deployq.examples.zoo:unet --input-shape 1,3,64,64 [--config q.yaml]
    deployq export   --ckpt qat.pt --target int8 --out build/
    deployq diff     build/model.float.onnx build/model.int8.onnx
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from deployq._version import __version__
from deployq.cli_common import POSITIVE, UserError, console, handle_errors, model_options, parse_input_shapes
from deployq.cli_train import hessian, train

DEVICE_NAMES = ("cpu", "nnapi", "qnn", "coreml")  # the profiles of deployq.devices.DEVICES (a test keeps them equal)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deployq")
def main() -> None:
    """deployq: PyTorch -> QAT (+ distillation) -> integer ONNX for onnxruntime, checked layer by layer.

    \b
    Typical flow:
      deployq inspect --model pkg.mod:build --input-shape 1,3,224,224   # list quant points
      deployq hessian --ckpt qat.pt --data calib/ --out distill.yaml     # where to distill
      deployq train   --recipe recipe.yaml                               # QAT + distillation
      deployq export  --ckpt qat.pt --target int8 --out build/            # float + QDQ ONNX
      deployq diff    build/model.float.onnx build/model.int8.onnx       # per-layer parity
      deployq check   --ckpt qat.pt --onnx build/model.int8.onnx         # torch vs ONNX codes
    """


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the quant points as JSON.")
@handle_errors
def inspect(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str],
            input_shape: Optional[list], as_json: bool) -> None:
    """List every quant point: name, kind, op, bits, scheme, quantizer, observer.

    The names are the ones to use in a config's `layers:` section, in checkpoints, in
    qparams.json, in the ONNX graph and in diff reports.
    """
    from deployq.model_source import resolve_model
    from deployq.prepare import quant_points

    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs)
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
                   "DepthToSpace); qnn (u8/u16 activations, 8-bit symmetric weights, fixed shapes); coreml "
                   "(no Q/DQ: also writes model.coreml.onnx, float with the learned weights). Configs a "
                   "device cannot run are refused.")
@click.option("--ort/--no-ort", "ort_format", default=True, show_default=True,
              help="Also write the ORT-format model (.ort) and the required-operators config of a reduced build.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write what was exported and measured (files, quant points, provider coverage) as JSON; - for stdout.")
@handle_errors
def export(ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict], config: Optional[str], input_shape: Optional[list],
           calib: Optional[str], calib_batches: int, target: str, out_dir: str, opset: int,
           weight_bits: Optional[int], act_signed: bool, dynamic_hw: bool, device: str, ort_format: bool,
           json_path: Optional[str]) -> None:
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
    from deployq.files import check_output, json_text
    from deployq.model_source import resolve_model

    check_output(out_dir, "--out", folder=True)
    deployed = deployed_file_name(target, device)
    for name in ("model.float.onnx", f"model.{target}.onnx", "qparams.json", f"model.{target}.pt",
                 f"model.{deployed}.onnx", f"model.{deployed}.ort", f"model.{deployed}.required_operators.config"):
        check_output(Path(out_dir) / name, "--out")
    if json_path and json_path != "-":
        check_output(json_path, "--json")

    if ckpt is None:
        raise UserError("export needs --ckpt (a deployq checkpoint, or a float state_dict with --model)")
    source = resolve_model(ckpt=ckpt, factory=factory, config=config, input_shape=input_shape,
                           factory_kwargs=model_kwargs)
    result = run_export(source, out_dir, target=target, opset=opset, weight_bits=weight_bits,
                        act_signed=act_signed, calib=calib, calib_limit=calib_batches, dynamic_hw=dynamic_hw,
                        device=device, ort_format=ort_format)
    if json_path == "-":
        click.echo(json_text(export_json(result)), nl=False)
        return
    if json_path:
        from deployq.files import AtomicOutputs

        with AtomicOutputs() as out:
            out.write_text(json_path, json_text(export_json(result)))
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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every number as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--top", type=click.IntRange(1), help="Show only the K worst quant points.")
@click.option("--fail-below", type=float, metavar="SQNR_DB", help="Exit 1 if the output SQNR is below this (CI gate).")
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
    """
    from deployq.diff import diff as run_diff
    from deployq.files import AtomicOutputs, check_output, json_text
    from deployq.report import table, to_html
    from deployq.sim import (check_same_inputs, file_feeds, isa_text, load_onnx, quantize_count, random_feeds,
                             with_shapes)

    for path, option in ((json_path, "--json"), (html_path, "--html")):
        if path:
            check_output(path, option)

    if input_path and random_count:
        raise UserError("give --input or --random, not both")
    float_model, quant_model = load_onnx(float_onnx), load_onnx(quant_onnx)
    if quantize_count(float_model) and not quantize_count(quant_model):
        raise UserError(f"the models are swapped: the first, {float_onnx}, is the quantized one (it has QuantizeLinear "
                        f"nodes) and the second, {quant_onnx}, is float; give FLOAT.onnx first")
    if not quantize_count(quant_model):
        raise UserError(f"{quant_onnx} has no QuantizeLinear: it is not a quantized (QDQ) model")
    inputs = with_shapes(check_same_inputs(float_model, quant_model, float_onnx, quant_onnx), input_shape)
    if input_path:
        batches = file_feeds(input_path, inputs, ratio=ratio, limit=limit)
    else:
        batches = list(random_feeds(inputs, random_count or 4, ranges=_input_ranges(quant_model)))
    report = run_diff(float_model, quant_model, batches, mode=mode, points=list(points) or None)
    console.print(table(report, top))
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    if mode == "kernel":
        console.print(f"CPU: {isa_text(report.isa)}")
    with AtomicOutputs() as out:
        if json_path:
            out.write_text(json_path, json_text(report.to_json()))
        if html_path:
            out.write_text(html_path, to_html(report, f"deployq diff: {quant_onnx}", fail_below))
    click.echo(f"verdict: {report.verdict(fail_below)}")
    if not report.passed(fail_below):
        sys.exit(1)


def _input_ranges(quant_model) -> dict[str, tuple[float, float]]:
    """The represented range of each input's quantizer: random inputs then exercise every code."""
    from deployq.diff import match_inputs

    return match_inputs(quant_model)


@main.command()
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="The deployq checkpoint.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False),
              help="Its exported QDQ model (.onnx), or its ORT-format file (.ort, read with the .onnx beside it).")
@click.option("--model", "factory", metavar="PKG.MOD:FACTORY", help="Model factory, if not inside deployq.")
@click.option("--input", "input_path", type=click.Path(exists=True), help="Inputs (raw, images, .npy/.npz); default: random.")
@click.option("--random", "random_count", type=click.IntRange(1), default=4, show_default=True, help="Random inputs if no --input.")
@click.option("--accumulated", is_flag=True, help="Let both run freely (errors spread) instead of comparing each point on the same inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the per-point parity as JSON.")
@handle_errors
def check(ckpt: str, onnx_path: str, factory: Optional[str], input_path: Optional[str], random_count: int,
          accumulated: bool, json_path: Optional[str]) -> None:
    """Torch fake-quant vs the ONNX model, in integer codes, at every quant point.

    Runs onnxruntime in the reference view (QDQ semantics exactly) and the checkpoint's QAT model
    on the same inputs; each torch quantizer continues from onnxruntime's codes (unless
    --accumulated), so every point shows its own arithmetic. Exit 1 if any point is more than
    1 LSB apart.

    An ORT-format file has no intermediate tensors to read: check reads them from the .onnx beside
    it, then runs the .ort and the .onnx (integer kernels) on the same inputs; their outputs must
    be at most 1 LSB apart.
    """
    import torch

    from deployq.files import atomic_path, check_output, json_text
    from deployq.model_source import resolve_model
    from deployq.parity import check_parity
    from deployq.sim import file_feeds, inputs_of, is_ort_format, load_onnx, quantize_count, random_feeds, with_shapes

    if json_path:
        check_output(json_path, "--json")

    ort_path = None
    if is_ort_format(onnx_path):
        ort_path, onnx_path = onnx_path, str(Path(onnx_path).with_suffix(".onnx"))
        if not Path(onnx_path).is_file():
            raise UserError(f"{ort_path}: an ORT-format file has no intermediate tensors to compare; check reads "
                            f"them from the ONNX model it was converted from, expected at {onnx_path}")
    source = resolve_model(ckpt=ckpt, factory=factory)
    model = load_onnx(onnx_path)
    if not quantize_count(model):
        raise UserError(f"{onnx_path} has no QuantizeLinear: check compares the checkpoint with its quantized (QDQ) "
                        "export (model.<target>.onnx), not with the float model")
    inputs = inputs_of(model)
    if [i.name for i in inputs] != [i.name for i in source.inputs]:
        raise UserError(f"{onnx_path} takes inputs {[i.name for i in inputs]}, the checkpoint's model "
                        f"{[i.name for i in source.inputs]}")
    free = {i.name for i in inputs if i.free}  # symbolic H/W: the checkpoint's shapes
    inputs = with_shapes(inputs, [(i.name, i.shape) for i in source.inputs if i.name in free])
    feeds = (file_feeds(input_path, inputs) if input_path else
             list(random_feeds(inputs, random_count, ranges=_input_ranges(model))))
    batches = [{name: torch.from_numpy(a) for name, a in f.items()} for f in feeds]
    report = check_parity(source.qmodel, model, batches, local=not accumulated)
    t = Table(title=f"deployq check: torch fake-quant vs {onnx_path} (codes)")
    for col in ("name", "kind", "bits", "elements", "equal", "1 LSB", ">1 LSB"):
        t.add_column(col, justify="left" if col in ("name", "kind") else "right", no_wrap=col == "name")
    for p in report.points:
        t.add_row(p.name, p.kind, str(p.bits), str(p.elements), f"{100 * p.exact_fraction:.3f}%", str(p.one),
                  f"[bold red]{p.more}[/]" if p.more else "0")
    console.print(t)
    verdict = (f"{report.elements} codes at {len(report.points)} quant points: {100 * report.exact_fraction:.4f}% equal, "
               f"max {report.max_lsb} LSB apart")
    data, same = report.to_json(), None
    if ort_path is not None:
        from deployq.parity import compare_ort_format

        same = compare_ort_format(model, ort_path, feeds)
        data["ort_format"] = {"file": ort_path, **same.to_json()}
        verdict += (f"; {Path(ort_path).name} vs {Path(onnx_path).name}: {same.equal}/{same.elements} output "
                    f"values equal, max {same.max_lsb:g} LSB apart")
    if json_path:
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json_text(data))
    if same is not None and not same.ok:
        click.echo(f"FAIL: {verdict}")
        sys.exit(1)
    failures = report.failures()
    if failures:
        click.echo(f"FAIL: {verdict}; more than 1 LSB at {', '.join(p.name for p in failures[:5])}")
        sys.exit(1)
    click.echo(f"PASS: {verdict}")


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
@handle_errors
def run_command(model_path: str, inputs: tuple[str, ...], out_dir: str, ratio: Optional[float], threads: Optional[int],
                tile: Optional[int], overlap: Optional[int], batch: int, bench_runs: Optional[int]) -> None:
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
    if inputs:
        enhance(model_path, inputs, out_dir, ratio=ratio, threads=threads, tile=tile, overlap=overlap, batch=batch,
                say=click.echo)
    if bench_runs:
        engine = load_engine(model_path, threads)
        result = bench(engine, bench_runs, batch=batch)
        p = result.percentiles()
        th, tw = result.size
        click.echo(f"latency over {bench_runs} calls of {batch} tile(s) {th}x{tw}: p50 {p['p50']:.2f} ms, "
                   f"p90 {p['p90']:.2f} ms, p99 {p['p99']:.2f} ms")


main.add_command(hessian)
main.add_command(train)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
