"""Post-training quantization: deployq's methods against onnxruntime's quantize_static.

    python benchmarks/bench_ptq.py [--models digits,lowlight,resnet18,mobilenet_v2,mnasnet0_5]
    python benchmarks/bench_ptq.py --models lowlight --merge   # the other columns as results/ptq.json has them

For every model, with the same calibration inputs for every contender and held-out inputs for
every number: int8 output SQNR of the fully optimized onnxruntime graph against the user's float
model (and top-1 agreement for the classifiers), for

* ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations) with MinMax, Entropy, Percentile;
* deployq PTQ as ``deployq export --calib`` does it (min/max observers), and with each ``--ptq``
  method alone (cle, search, adaround, bias), their best combination, and ``--calib zeroq``
  (no data: inputs synthesized from BatchNorm statistics);
* the ceiling of any 8-bit PTQ that quantizes the input: the torch model with only its input
  quantized (every other tensor float).

Models: ``digits`` is a classifier trained here (``benchmarks.models:digits_cnn`` on scikit-learn's
digits, as bench_digits.py trains it, seed 0; calibration from the training split, numbers on the
whole test split); ``lowlight`` is the example's trained float model (float.pt; calibration from the
training split, numbers on the test split); the torchvision models have random weights and
BatchNorm statistics of photographs (see bench_conformance.py).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import common
from benchmarks.bench_conformance import FACTORY, outputs, sqnr_db, top1
from deployq.deploy.export import export
from deployq.examples import torchvision_models as tvm
from deployq.ptq.pipeline import ZEROQ, PTQOptions
from deployq.qat.calibrate import calibrate, set_mode
from deployq.qat.loading import ModelSource, resolve_model
from deployq.qat.prepare import prepare, quant_points

SCRIPT = "bench_ptq.py"
MODELS = ["digits", "lowlight", "resnet18", "mobilenet_v2", "mnasnet0_5"]
TRAINED = ("digits", "lowlight")  # the models this benchmark does not take from torchvision
STATIC = ("MinMax", "Entropy", "Percentile")
# (row label, --ptq methods, calibration: "data" or zeroq)
RENAMED = {"deployq PTQ (min/max)": "deployq PTQ (plain)"}  # row labels of earlier records, as named now
DEPLOYQ = (("deployq PTQ (plain)", (), "data"), ("+ cle", ("cle",), "data"), ("+ search", ("search",), "data"),
           ("+ adaround", ("adaround",), "data"), ("+ bias", ("bias",), "data"),
           ("+ adaround, bias", ("adaround", "bias"), "data"),
           ("+ search, adaround, bias", ("search", "adaround", "bias"), "data"),
           ("--calib zeroq (no data)", (), ZEROQ))


@dataclass
class Case:
    """One model: how to build its source, and its calibration / held-out inputs (batch 1 each)."""

    name: str
    source: Callable[..., ModelSource]  # source(config=None): the model prepared under a quantization config
    calibration: list[np.ndarray]
    held_out: list[np.ndarray]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="lowlight and/or torchvision models, comma-separated")
    parser.add_argument("--size", type=int, default=96, help="torchvision input side in pixels")
    parser.add_argument("--lowlight-size", type=int, default=64, help="low-light packed input side")
    parser.add_argument("--calib", type=int, default=32, help="calibration inputs (every contender)")
    parser.add_argument("--eval", type=int, default=16, help="held-out inputs every number is measured on")
    parser.add_argument("--digits-epochs", type=int, default=30, help="float training epochs of the digits CNN")
    parser.add_argument("--digits-eval", type=int, default=450, help="held-out digits images (the test split has 450)")
    parser.add_argument("--adaround-iterations", type=int, default=200, help="AdaRound steps per layer")
    parser.add_argument("--rows", default="", help="only these deployq rows (labels, comma-separated; quick runs)")
    parser.add_argument("--merge", type=Path, nargs="?", const=common.RESULTS / "ptq.json", metavar="RECORD",
                        help="keep the columns of the models not run from an earlier run's record "
                             "(default benchmarks/results/ptq.json); the notes name that run")
    common.add_lowlight_arguments(parser)
    return parser.parse_args(argv)


def torchvision_case(name: str, args: argparse.Namespace, work: Path) -> Case:
    kwargs = {"name": name, **({"image_size": args.size} if name.startswith("vit") else {})}
    model = tvm.with_photo_statistics(tvm.build(**kwargs), args.size)
    torch.save(model.state_dict(), work / "state.pt")
    shape = (1, 3, args.size, args.size)
    return Case(name, lambda config=None: resolve_model(ckpt=str(work / "state.pt"), factory=FACTORY,
                                                        factory_kwargs=kwargs, input_shape=shape, config=config),
                [x[None] for x in tvm.photo_crops(args.calib, args.size, seed=10).numpy()],
                [x[None] for x in tvm.photo_crops(args.eval, args.size, held_out=True, seed=20).numpy()])


def lowlight_case(args: argparse.Namespace) -> Case:
    from benchmarks.bench_lowlight import calibration_arrays
    from deployq.examples.lowlight.evaluate import test_set

    ckpts = common.lowlight_checkpoints(args)
    side = args.lowlight_size
    test = test_set(size=2 * side, length=args.eval)
    return Case("lowlight (trained)", lambda config=None: resolve_model(
        ckpt=str(ckpts.float), factory=ckpts.float_factory, factory_kwargs=ckpts.float_kwargs,
        input_shape=(1, 4, side, side), config=config),
        calibration_arrays(2 * side, args.calib), [test[i]["input"].numpy()[None] for i in range(args.eval)])


def digits_case(args: argparse.Namespace, work: Path) -> Case:
    from benchmarks.bench_digits import fit, load_digits_split
    from benchmarks.models import digits_cnn

    data = load_digits_split()
    torch.manual_seed(0)
    with common.torch_threads(1):  # the same weights whatever threads the tools then run at
        model = fit(digits_cnn(seed=0), data, args.digits_epochs, lr=3e-3, seed=0)
    torch.save(model.state_dict(), work / "digits.pt")
    return Case("digits CNN (trained)", lambda config=None: resolve_model(
        ckpt=str(work / "digits.pt"), factory="benchmarks.models:digits_cnn", input_shape=(1, 1, 8, 8),
        config=config),
        [x[None].numpy() for x in data.x_train[:args.calib]], [x[None].numpy() for x in data.x_test[:args.digits_eval]])


def input_only_ceiling(source: ModelSource, case: Case) -> float:
    """Output SQNR (dB) of the torch model with only its input quantized (8-bit, min/max)."""
    model = prepare(source.float_model, source.example_inputs())
    calibrate(model, [torch.from_numpy(x) for x in case.calibration], progress=False)
    set_mode(model, "float")
    reference = [_flat(model(torch.from_numpy(x))) for x in case.held_out]
    for point in quant_points(model).values():
        if point.kind == "input":
            model.get_submodule(point.quantizer).mode = "quantize"
    with torch.no_grad():
        values = [_flat(model(torch.from_numpy(x))) for x in case.held_out]
    return sqnr_db([r for rs in reference for r in rs], [v for vs in values for v in vs])


def _flat(output: object) -> list[np.ndarray]:
    items = output if isinstance(output, (tuple, list)) else (output,)
    return [t.detach().numpy() for t in items]


def measure(case: Case, args: argparse.Namespace, work: Path) -> list[tuple]:
    """(row label, output SQNR dB, top-1 agreement or None, seconds[, why it could not run]) for every
    contender."""
    rows = []
    plain = export(case.source(), work / "plain", calib=list(case.calibration), calib_limit=args.calib,
                   progress=False, ort_format=False)
    name = plain.quant_model.graph.input[0].name
    feeds = [{name: x} for x in case.held_out]
    reference = outputs(plain.files["float"], feeds)
    flat = [o for out in reference for o in out]

    def score(path: Path) -> tuple[float, Optional[float]]:
        ours = outputs(path, feeds)
        return sqnr_db(flat, [o for out in ours for o in out]), top1(reference, ours)

    for method in STATIC:
        path, seconds = common.timed(lambda: common.quantize_static_qdq(
            plain.files["float"], work / f"static_{method}.onnx", case.calibration, method))
        rows.append((f"quantize_static {method}", *score(path), seconds))
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    for label, methods, calibration in DEPLOYQ:
        if wanted and label not in wanted:
            continue
        folder = work / f"deployq_{len(rows)}"
        calib = ZEROQ if calibration == ZEROQ else list(case.calibration)
        options = PTQOptions(methods, adaround_iterations=args.adaround_iterations)
        try:
            result, seconds = common.timed(lambda: export(case.source(), folder, calib=calib, calib_limit=args.calib,
                                                          ptq=options, progress=False, ort_format=False))
        except ValueError as err:  # a method this model cannot take (zeroq without BatchNorm) is a result
            rows.append((label, math.nan, None, math.nan, common.error_text(err)))
            continue
        rows.append((label, *score(result.files["int8"]), seconds))
    rows.append(("only the input quantized (ceiling, torch)", input_only_ceiling(case.source(), case), None, math.nan))
    return rows


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(tvm.MODELS) - set(TRAINED))
    if unknown:
        raise common.BenchmarkError(f"unknown models {unknown}; known: {', '.join(TRAINED)}, {', '.join(tvm.MODELS)}")
    results: dict[str, dict[str, tuple]] = {}
    with common.torch_threads(1):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"bench_ptq.{name}.") as tmp:
                with common.quiet():
                    case = (lowlight_case(args) if name == "lowlight" else digits_case(args, Path(tmp)) if name == "digits"
                            else torchvision_case(name, args, Path(tmp)))
                    rows = measure(case, args, Path(tmp))
                results[case.name] = {label: rest for label, *rest in rows}
                print(f"{case.name}: " + ", ".join(f"{label} {v[0]:.2f}" for label, *v in rows), file=sys.stderr,
                      flush=True)
    kept_note = ""
    if args.merge is not None:
        earlier, run_of = kept_columns(args.merge)
        kept = [model for model in earlier if model not in results]
        results = {model: results.get(model) or earlier[model] for model in [*earlier, *results]}
        if kept:
            kept_note = (f" Columns {', '.join(kept)}: from the run of {run_of['date']} (`{run_of['command']}`), "
                         "kept by `--merge`.")
    return common.Section("ptq", "Post-training quantization: deployq's methods vs quantize_static",
                          common.command_line(SCRIPT, argv), body(results, args, kept_note))


_CELL = re.compile(r"^(-?\d+\.\d+|nan)(?: \((\d+)%\))?(?:, (\d+) s)?$")


def parse_cell(text: str) -> Optional[tuple]:
    """A table cell back to its result: ``(sqnr, agreement or None, seconds[, why it could not run])``;
    None for an empty cell. The inverse of :func:`body`'s cells, to the digits they show."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("cannot: "):
        return (math.nan, None, math.nan, text.removeprefix("cannot: "))
    match = _CELL.match(text)
    if match is None:
        raise common.BenchmarkError(f"cannot read the PTQ table cell {text!r}")
    sqnr, agree, seconds = match.groups()
    return (float(sqnr), None if agree is None else int(agree) / 100, math.nan if seconds is None else float(seconds))


def kept_columns(record: Path) -> tuple[dict[str, dict[str, tuple]], dict]:
    """Every model column of the PTQ table in an earlier run's record, and that run."""
    section, data = common.load_section_record(record.parent, record.stem)
    rows = [line for line in section.lines if line.startswith("| ")]
    if not rows or not rows[0].startswith("| quantization |"):
        raise common.BenchmarkError(f"{record}: no PTQ table in it")
    models = [cell.strip() for cell in rows[0].strip("|").split("|")[1:]]
    columns: dict[str, dict[str, tuple]] = {model: {} for model in models}
    for line in rows[1:]:
        label, *cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for model, cell in zip(models, cells):
            value = parse_cell(cell)
            if value is not None:
                columns[model][RENAMED.get(label, label)] = value
    return columns, data["run"]


def body(results: dict[str, dict[str, tuple]], args: argparse.Namespace, kept_note: str = "") -> list[str]:
    models = list(results)
    labels = list(dict.fromkeys(label for rows in results.values() for label in rows))

    def cell(model: str, label: str) -> str:
        value = results[model].get(label)
        if value is None:
            return ""
        if len(value) > 3:
            return f"cannot: {value[3]}"
        sqnr, agree, seconds = value
        text = f"{sqnr:.2f}" + (f" ({100 * agree:.0f}%)" if agree is not None else "")
        return text + (f", {seconds:.0f} s" if not math.isnan(seconds) else "")

    lines = common.table(["quantization", *models], [[label, *(cell(m, label) for m in models)] for label in labels],
                         "l" + "r" * len(models))
    return lines + [""] + summary(results) + ["", notes(args) + kept_note]


def summary(results: dict[str, dict[str, tuple]]) -> list[str]:
    """Best deployq row against best quantize_static row, per model and their median; zeroq against data."""
    gaps, zeroq = [], []
    lines = []
    for model, rows in results.items():
        static = max(v[0] for k, v in rows.items() if k.startswith("quantize_static"))
        ours = {k: v[0] for k, v in rows.items() if k.startswith(("deployq", "+ ")) and not math.isnan(v[0])}
        if not ours:
            continue
        best = max(ours, key=ours.get)
        gaps.append(ours[best] - static)
        if not math.isnan(rows.get("--calib zeroq (no data)", (math.nan,))[0]) and "deployq PTQ (plain)" in rows:
            zeroq.append(rows["deployq PTQ (plain)"][0] - rows["--calib zeroq (no data)"][0])
        lines.append(f"- {model}: best deployq `{best}` {ours[best]:.2f} dB, best quantize_static {static:.2f} dB "
                     f"({ours[best] - static:+.2f} dB); the input alone caps 8-bit PTQ at "
                     f"{rows['only the input quantized (ceiling, torch)'][0]:.2f} dB")
    if gaps:
        lines.append(f"- median over models of (best deployq − best quantize_static): {float(np.median(gaps)):+.2f} dB")
    if zeroq:
        lines.append(f"- data-free (zeroq) below calibration with data, median: {float(np.median(zeroq)):.2f} dB")
    return lines


def notes(args: argparse.Namespace) -> str:
    return (f"Output SQNR (dB) of the fully optimized int8 onnxruntime graph against the float model, on "
            f"{args.eval} held-out inputs ({args.digits_eval} for digits; classifiers: top-1 agreement with float "
            "in brackets); seconds: the "
            "whole export with its calibration. Every contender calibrates on the same "
            f"{args.calib} inputs (torchvision: crops of the photographs other than "
            f"{', '.join(tvm.HELD_OUT_PHOTOS)}, {args.size}×{args.size}, numbers on those two; low-light: "
            f"the training split, {args.lowlight_size}×{args.lowlight_size} packed, numbers on the test split; "
            "digits: the first images of the training split, numbers on the test split). "
            "quantize_static runs on deployq's float graph. deployq rows are `deployq export --calib ... "
            f"--ptq METHODS`; AdaRound {args.adaround_iterations} steps per layer and bias correction on "
            f"{PTQOptions().refine_samples} calibration samples; search scores on {PTQOptions().search_samples} "
            "held-out calibration samples. *only the input quantized*: every contender quantizes "
            "the input to 8 bits, and that rounding alone, propagated through the float network, gives this "
            "SQNR: no 8-bit PTQ method can pass it. Random-weight networks amplify a perturbation of their "
            "input far more than trained ones, which is why their ceiling is low.")


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
