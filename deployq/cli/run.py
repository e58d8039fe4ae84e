"""``deployq run``: enhance raw camera files with an ONNX model, or time it."""

from __future__ import annotations

from typing import Optional

import click

from deployq import api
from deployq.cli.common import POSITIVE, UserError, api_option, handle_errors, json_option, say, write_json


@click.command("run")
@click.argument("model", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.argument("inputs", metavar="INPUT...", nargs=-1, type=click.Path())
@api_option(api.run, "out_dir", "--out", type=click.Path(file_okay=False), show_default=True,
            help="Folder for the PNGs (one per input, named after it).")
@api_option(api.run, "ratio", "--ratio", type=POSITIVE,
            help="Exposure ratio (SID: long / short). Default: from SID file names, else 1.")
@api_option(api.run, "threads", "--threads", type=click.IntRange(1),
            help="onnxruntime intra-op threads (default: all cores).")
@api_option(api.run, "tile", "--tile", type=click.IntRange(8),
            help="Process in tiles of this side (packed pixels). Default: a model exported with --dynamic-hw takes "
                 "whole frames up to 2048x2048 packed pixels; a fixed-size model, tiles of its input size.")
@api_option(api.run, "overlap", "--overlap", type=click.IntRange(0),
            help="Overlap between tiles, in packed pixels; seams are blended over it (default: a quarter tile, "
                 "at most 16).")
@api_option(api.run, "batch", "--batch", type=click.IntRange(1), show_default=True, help="Tiles per onnxruntime call.")
@api_option(api.latency, "runs", "--bench", type=click.IntRange(1),
            help="Also time N calls and print latency percentiles.")
@json_option("the PNGs written and the latency percentiles")
@handle_errors
def run_command(model: str, inputs: tuple[str, ...], out_dir: str, ratio: Optional[float], threads: Optional[int],
                tile: Optional[int], overlap: Optional[int], batch: int, runs: Optional[int],
                json_path: Optional[str]) -> None:
    """Enhance raw camera files with an ONNX model (float or int8): raw -> packed -> ORT -> sRGB PNG.

    \b
    deployq run build/model.int8.onnx short/ --ratio 250 --out out/
    deployq run build/model.int8.onnx --bench 50          # latency only

    A model exported with `deployq export --dynamic-hw` takes each frame whole (no seams); a
    fixed-size model, or a frame over 2048x2048 packed pixels, is processed in overlapping tiles
    whose seams are blended. Reads what LibRaw reads (ARW, DNG, NEF, CR2, ...): each frame is
    black-subtracted, packed RGGB, multiplied by the exposure ratio and the file's as-shot white
    balance, and taken to linear sRGB by the file's colour matrix, so frames from any camera reach
    the model in one colour space (the same loading as `diff`, `hessian` and `export --calib`).
    """
    from deployq.core.files import check_output

    if inputs:
        check_output(out_dir, "--out", folder=True)
    if not inputs and not runs:
        raise UserError("give raw files or folders to enhance, or --bench N to time the model")
    tell = (lambda _: None) if json_path == "-" else say
    data: dict = {"model": model}
    if inputs:
        data["written"] = [str(p) for p in api.run(model, inputs, out_dir, ratio=ratio, threads=threads, tile=tile,
                                                   overlap=overlap, batch=batch, say=tell)]
    if runs:
        result = api.latency(model, runs, batch=batch, threads=threads)
        p = result.percentiles()
        th, tw = result.size
        tell(f"latency over {runs} calls of {batch} tile(s) {th}x{tw}: p50 {p['p50']:.2f} ms, "
             f"p90 {p['p90']:.2f} ms, p99 {p['p99']:.2f} ms")
        data["latency_ms"] = {**p, "calls": runs, "tiles_per_call": batch, "tile": [th, tw]}
    write_json(json_path, data)
