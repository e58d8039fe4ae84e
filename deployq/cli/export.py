"""``deployq export``: a checkpoint (or a float model and calibration data) to float and QDQ ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from deployq import api
from deployq.cli.common import (UserError, api_option, console, handle_errors, json_option, model_options,
                                onnx_model_option, write_json)
from deployq.ptq.pipeline import ZEROQ, parse_methods


def _calibration(value: Optional[str]) -> Optional[str]:
    """--calib: an existing path, or the word zeroq."""
    if value is None or value == ZEROQ:
        return value
    if not Path(value).exists():
        raise click.BadParameter(f"{value!r} does not exist (a folder or file of inputs, or '{ZEROQ}')")
    return value


def _methods(value: object) -> tuple:
    if not value:  # the API's default: no method
        return ()
    try:
        return parse_methods(value)
    except ValueError as err:
        raise click.BadParameter(str(err).removeprefix("--ptq: ")) from None


DEVICE_NAMES = ("cpu", "nnapi", "qnn", "xnnpack", "coreml")  # the profiles of deployq.deploy.devices.DEVICES (a test keeps them equal)


@click.command("export")
@onnx_model_option
@model_options
@api_option(api.export, "calib", "--input", "--calib", metavar="PATH|zeroq", callback=lambda c, p, v: _calibration(v),
            help="Calibration data (folder of raw files, images, .npy/.npz): post-training quantization. "
                 "'zeroq': no data, inputs synthesized to match the model's BatchNorm statistics (a path "
                 "called zeroq: ./zeroq).")
@api_option(api.export, "calib_limit", "--calib-batches", type=click.IntRange(1), show_default=True,
            help="How many calibration inputs to observe (the thesis: ~100 is enough).")
@api_option(api.export, "ptq", "--ptq", metavar="METHOD[,METHOD...]", callback=lambda c, p, v: _methods(v),
            help="Post-training methods applied with --calib: cle (cross-layer equalization), search (each "
                 "activation's calibration method picked by the output it gives), adaround (learned weight "
                 "rounding), bias (bias correction). BENCHMARKS.md measures each.")
@api_option(api.export, "adaround_iterations", "--adaround-iterations", type=click.IntRange(1), show_default=True,
            help="--ptq adaround: optimization steps per layer.")
@api_option(api.export, "refine_samples", "--refine-samples", type=click.IntRange(1), show_default=True,
            help="--ptq adaround / bias: how many calibration samples they learn from (samples, not batches: "
                 "the same at any batch size; their time grows with it).")
@api_option(api.export, "search_samples", "--search-samples", type=click.IntRange(1), show_default=True,
            help="--ptq search: calibration samples each choice is scored on (held out of the observation "
                 "when the calibration set has at least twice as many).")
@api_option(api.export, "bias_shrink", "--bias-shrink", type=click.FloatRange(0), show_default=True,
            help="--ptq bias: each channel's correction is its mean error on the samples less this many standard "
                 "deviations of that error over the samples. 0 corrects the whole mean error, as the papers do; a "
                 "shrink corrects less where the samples disagree. On NudeNet's YOLOv8n 0.25 kept the box F1 that "
                 "the whole correction lowered; on most other models it lowered the output SQNR (BENCHMARKS.md).")
@api_option(api.export, "target", "--target", type=click.Choice(["int8", "int16", "fp32"]), show_default=True,
            help="int8: 8-bit body, special layers at their bits; int16: everything 16-bit; fp32: float only.")
@api_option(api.export, "out_dir", "--out", type=click.Path(file_okay=False), show_default=True,
            help="Output folder for model.float.onnx, model.<target>.onnx and qparams.json.")
@api_option(api.export, "opset", "--opset", type=click.IntRange(21), show_default=True,
            help="ONNX opset: 21 (16-bit QuantizeLinear) up to the newest the installed onnxruntime runs.")
@api_option(api.export, "weight_bits", "--weight-bits", type=click.IntRange(2, 16),
            help="Bits of the 8-bit-body weights, e.g. 7 for CPUs without VNNI (u8 x s8 saturation), or 4; "
                 "at 4 or fewer the default observer (auto) searches each channel's range for the least "
                 "squared error instead of taking its min/max.")
@api_option(api.export, "act_signed", "--act-signed", is_flag=True,
            help="Signed 8-bit activations (s8s8 kernels; exact, same grid).")
@api_option(api.export, "dynamic_hw", "--dynamic-hw", is_flag=True,
            help="Keep input height and width symbolic (fully convolutional models): `deployq run` then "
                 "processes whole frames in one call instead of tiles.")
@api_option(api.export, "device", "--device", type=click.Choice(list(DEVICE_NAMES)), show_default=True,
            help="Device profile: cpu (any config, ConvTranspose as Conv + DepthToSpace); nnapi (8-bit, fixed "
                 "shapes, ConvTranspose as Conv + DepthToSpace); qnn (u8/u16 activations, 8-bit symmetric weights, "
                 "fixed shapes); xnnpack (8-bit, symmetric weights, ConvTranspose as Conv + DepthToSpace); coreml "
                 "(no Q/DQ: also writes model.coreml.onnx, float with the learned weights). Configs a "
                 "device cannot run are refused.")
@api_option(api.export, "ort_format", "--ort/--no-ort", show_default=True,
            help="Also write the ORT-format model (.ort) and the required-operators config of a reduced build.")
@api_option(api.export, "output_names", "--output-names", metavar="NAME[,NAME...]",
            callback=lambda c, p, v: [n.strip() for n in v.split(",")] if v else None,
            help="Names of the exported models' outputs, in order (default: the traced names, e.g. output_0).")
@json_option("what was exported and measured (files, quant points, provider coverage)")
@handle_errors
def export(onnx_file: Optional[str], ckpt: Optional[str], factory: Optional[str], model_kwargs: Optional[dict],
           config: Optional[str], input_shape: Optional[list], leaf: tuple, calib: Optional[str], calib_limit: int,
           ptq: tuple, adaround_iterations: int, refine_samples: int, search_samples: int, bias_shrink: float,
           target: str,
           out_dir: str, opset: int, weight_bits: Optional[int], act_signed: bool, dynamic_hw: bool, device: str,
           ort_format: bool, output_names: Optional[list], json_path: Optional[str]) -> None:
    """Export a checkpoint to ONNX: the float model and the integer (QDQ) model.

    \b
    deployq export --ckpt qat.pt --target int8 --out build/
    deployq export --ckpt float.pth --model pkg.mod:build --input-shape 1,3,224,224 --calib images/
    deployq export --onnx model.onnx --calib images/ --ptq bias --out build/

    deployq export --ckpt qat_all8.pt --device nnapi --input-shape 1,4,256,256 --out build/nnapi/

    BatchNorm is folded and Conv+activation fused by the rewriter; every quant point gets
    QuantizeLinear/DequantizeLinear with the learned scales and zero points (9-16-bit layers as
    Clip + 16-bit Q/DQ, exact). The summary ends with how many nodes NNAPI and CoreML would take,
    by onnxruntime's own mobile usability checker. Files appear only when the whole export succeeded.
    """
    from deployq.deploy.export import bit_width_summary, deployed_file_name, export_json
    from deployq.core.files import check_output

    check_output(out_dir, "--out", folder=True)
    deployed = deployed_file_name(target, device)
    for name in ("model.float.onnx", f"model.{target}.onnx", "qparams.json", f"model.{target}.pt",
                 f"model.{deployed}.onnx", f"model.{deployed}.ort", f"model.{deployed}.required_operators.config"):
        check_output(Path(out_dir) / name, "--out")

    if ckpt is None and onnx_file is None:
        raise UserError("export needs --ckpt (a deployq checkpoint, or a float state_dict with --model) "
                        "or --onnx (a float ONNX model, with --calib)")
    source = api.load_model(ckpt=ckpt, factory=factory, model_kwargs=model_kwargs, onnx_file=onnx_file,
                            config=config, input_shape=input_shape, leaf=leaf)
    result = api.export(source, out_dir=out_dir, calib=calib, calib_limit=calib_limit, ptq=ptq,
                        adaround_iterations=adaround_iterations, refine_samples=refine_samples,
                        search_samples=search_samples, bias_shrink=bias_shrink, target=target, device=device, opset=opset,
                        dynamic_hw=dynamic_hw, ort_format=ort_format, weight_bits=weight_bits, act_signed=act_signed,
                        output_names=output_names, progress=json_path != "-")
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
