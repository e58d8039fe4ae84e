"""Accuracy retention on the low-light example: PSNR / SSIM on the test split.

    python benchmarks/bench_lowlight.py [--float F.pt --float-control C.pt --qat Q.pt --qat-nodistill N.pt --qat-all8 A.pt]

Rows: the float model (torch, and its ONNX export in onnxruntime); the control: the float model
trained on for as many steps as QAT takes (so the QAT rows are not credited with extra training);
deployq QAT with distillation
(torch fake-quant, and onnxruntime running deployq's int8 export); QAT without distillation; QAT
with every layer at 8 bits; and onnxruntime.quantization.quantize_static of the float ONNX model
(QDQ, per-channel weights; MinMax / Entropy / Percentile calibration on training-split items).
The checkpoints are evaluated, never trained, here, on the test split: photographs, a sensor and
a band of noise levels that neither training nor checkpoint selection (the validation split) saw.
Every onnxruntime row runs fully optimized sessions (the integer kernels a CPU really runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from deployq.examples.lowlight.data import SyntheticLowLight
from deployq.examples.lowlight.evaluate import (TEST_LENGTH, TEST_SIZE, Predictor, evaluate, onnx_predictor,
                                                test_set, torch_predictor)
from deployq.deploy.export import ExportResult, bit_width_summary
from deployq.qat.loading import resolve_model

SCRIPT = "bench_lowlight.py"


@dataclass
class Row:
    model: str
    method: str
    runtime: str
    bits: str
    psnr: float  # the mean over seeds when there are several
    ssim: float
    seeds: tuple[float, ...] = ()  # PSNR of each seed's checkpoint (the shipped one first)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_lowlight_arguments(parser)
    parser.add_argument("--test-size", type=int, default=TEST_SIZE, help="test crop size in raw pixels")
    parser.add_argument("--test-items", type=int, default=TEST_LENGTH, help="test images")
    parser.add_argument("--calib-items", type=int, default=32, help="quantize_static calibration items (train split)")
    parser.add_argument("--qat-seeds", default="", metavar="PATH[,PATH...]",
                        help="checkpoints of qat.yaml trained with other seeds (deployq train --seed N --out DIR)")
    parser.add_argument("--qat-nodistill-seeds", default="", metavar="PATH[,PATH...]",
                        help="checkpoints of qat_nodistill.yaml trained with other seeds")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    return parser.parse_args(argv)


def bits_text(result: ExportResult) -> str:
    """e.g. 'act 8 (10 at 9), wt 8 (10 at 7)': the body width and the special layers."""
    parts = []
    for kind, label in (("activation", "act"), ("weight", "wt")):
        counts = bit_width_summary(result.records).get(kind, {})
        body = max(counts, key=counts.get) if counts else 8
        special = ", ".join(f"{bits} at {n}" for bits, n in sorted(counts.items()) if bits != body)
        parts.append(f"{label} {body}" + (f" ({special})" if special else ""))
    return ", ".join(parts)


def calibration_arrays(size: int, items: int) -> list[np.ndarray]:
    """Inputs from the training split (never the held-out photographs), batch of one each."""
    data = SyntheticLowLight(size=size, length=items, split="train", seed=1)
    return [data[i]["input"].numpy()[None] for i in range(items)]


def score(predict: Predictor, items: list) -> tuple[float, float]:
    """(PSNR, SSIM) of `predict` over the held-out `items`."""
    metrics = evaluate(predict, items)
    return metrics["psnr"], metrics["ssim"]


def float_rows(ckpts: common.LowlightCheckpoints, shape: tuple[int, ...], items: list, threads: int) -> list[Row]:
    kwargs = ckpts.float_kwargs
    source = resolve_model(ckpt=str(ckpts.float), factory=ckpts.float_factory, input_shape=shape, factory_kwargs=kwargs)
    float_onnx = common.shared_export(ckpts.float, factory=ckpts.float_factory, input_shape=shape, target="fp32",
                                      factory_kwargs=kwargs)
    rows = [Row("float", "-", "torch fp32", "fp32", *score(torch_predictor(source.float_model), items)),
            Row("float", "deployq export", "ORT fp32", "fp32",
                *score(onnx_predictor(str(float_onnx.files["float"]), threads=threads), items))]
    if ckpts.float_control.is_file():
        control = resolve_model(ckpt=str(ckpts.float_control), factory=ckpts.float_factory, input_shape=shape,
                                factory_kwargs=kwargs)
        rows.append(Row("float, trained on as long as QAT", "-", "torch fp32", "fp32",
                        *score(torch_predictor(control.float_model), items)))
    return rows


def _paths(text: str) -> list[Path]:
    """The seed checkpoints given that exist (they are trained, not shipped: README)."""
    return [Path(p) for p in text.split(",") if p.strip() and Path(p.strip()).is_file()]


def int8_row(label: str, ckpts: list[Path], factory, shape: tuple[int, ...], items: list, threads: int) -> Row:
    """One recipe's checkpoints (the shipped one, then other seeds), each exported and run in
    onnxruntime: PSNR / SSIM averaged over them, each seed's PSNR kept."""
    scores, bits = [], ""
    for ckpt in ckpts:
        result = common.shared_export(ckpt, factory=factory, input_shape=shape)
        bits = bits_text(result)
        scores.append(score(onnx_predictor(str(result.files["int8"]), threads=threads), items))
    psnrs = tuple(p for p, _ in scores)
    return Row(label, "deployq", "ORT int8", bits, float(np.mean(psnrs)), float(np.mean([q for _, q in scores])),
               psnrs if len(psnrs) > 1 else ())


def deployq_rows(ckpts: common.LowlightCheckpoints, shape: tuple[int, ...], items: list, threads: int,
                 seeds: dict[str, list[Path]]) -> list[Row]:
    """Each QAT checkpoint exported and run in onnxruntime (over its seeds, where given); the
    distilled one in torch too."""
    result = common.shared_export(ckpts.qat, factory=ckpts.factory, input_shape=shape)
    rows = [Row("QAT + distillation", "deployq", "torch fake-quant", bits_text(result),
                *score(torch_predictor(result.qmodel), items))]
    for label, key, ckpt in (("QAT + distillation", "qat", ckpts.qat),
                             ("QAT, no distillation", "qat_nodistill", ckpts.qat_nodistill),
                             ("QAT, all 8-bit", "qat_all8", ckpts.qat_all8)):
        if ckpt.is_file():  # the ablations are trained (README), not shipped
            rows.append(int8_row(label, [ckpt, *seeds.get(key, [])], ckpts.factory, shape, items, threads))
    return rows


def quantize_static_rows(float_onnx: Path, calibration: list[np.ndarray], items: list, threads: int,
                         work: Path) -> list[Row]:
    rows = []
    for method in common.CALIBRATION_METHODS:
        path = common.quantize_static_qdq(float_onnx, work / f"ort_{method}.onnx", calibration, method)
        rows.append(Row("float", f"ORT quantize_static {method}", "ORT int8", "act 8, wt 8",
                        *score(onnx_predictor(str(path), threads=threads), items)))
    return rows


def run_rows(args: argparse.Namespace, ckpts: common.LowlightCheckpoints, work: Path) -> list[Row]:
    shape = (1, 4, args.test_size // 2, args.test_size // 2)
    held_out = test_set(size=args.test_size)
    items = [held_out[i] for i in range(min(args.test_items, len(held_out)))]
    float_onnx = common.shared_export(ckpts.float, factory=ckpts.float_factory, input_shape=shape,
                                      target="fp32", factory_kwargs=ckpts.float_kwargs).files["float"]
    calibration = calibration_arrays(args.test_size, args.calib_items)
    seeds = {"qat": _paths(args.qat_seeds), "qat_nodistill": _paths(args.qat_nodistill_seeds)}
    return (float_rows(ckpts, shape, items, args.threads) + deployq_rows(ckpts, shape, items, args.threads, seeds)
            + quantize_static_rows(float_onnx, calibration, items, args.threads, work))


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    ckpts = common.lowlight_checkpoints(args).check()
    with tempfile.TemporaryDirectory(prefix="bench_lowlight.") as tmp:
        rows = run_rows(args, ckpts, Path(tmp))
    reference = rows[0].psnr

    def psnr_text(r: Row) -> str:
        if not r.seeds:
            return f"{r.psnr:.2f}"
        return f"{r.psnr:.2f} ± {np.std(r.seeds, ddof=1):.2f} ({' / '.join(f'{p:.2f}' for p in r.seeds)})"

    body = common.table(
        ["weights", "quantization", "runtime", "bits", "PSNR (dB)", "Δ PSNR vs float (dB)", "SSIM"],
        [(r.model, r.method, r.runtime, r.bits, psnr_text(r), f"{r.psnr - reference:+.2f}", f"{r.ssim:.4f}")
         for r in rows], "llllrrr")
    notes = [
        "",
        f"Test set: SyntheticLowLight(split='test', size={args.test_size}), {min(args.test_items, TEST_LENGTH)} "
        "images: photographs, a sensor (Fujifilm X-T2 colour matrix) and a band of shot noise (2e-4 to 3.5e-4) "
        "that neither training nor checkpoint selection saw (checkpoints are picked on split='val'). "
        f"quantize_static calibrates on {args.calib_items} "
        "training-split items; QDQ format, u8 activations, s8 per-channel weights. deployq rows export each "
        "checkpoint with `deployq export` and run its int8 model; `bits` counts quant points by width "
        f"(act: activations and inputs, wt: weights). Checkpoints: {ckpts.describe()}. Where a row has "
        "several seeds, PSNR is mean ± sample sd over them (each seed's value in brackets, the shipped "
        f"checkpoint first): {', '.join(map(common.shown_path, _paths(args.qat_seeds))) or 'no other seed of qat.yaml'}; "
        f"{', '.join(map(common.shown_path, _paths(args.qat_nodistill_seeds))) or 'no other seed of qat_nodistill.yaml'}.",
    ]
    goal_lines, facts = goals(rows)
    return common.Section("lowlight", "Accuracy: low-light example (PSNR / SSIM, test split)",
                          common.command_line(SCRIPT, argv), body + goal_lines + notes, facts)


FLOAT_GOAL_DB, INT8_GAP_DB = 24.0, 0.1


def goals(rows: list[Row]) -> tuple[list[str], dict[str, float]]:
    """The example's accuracy goals against these rows: float PSNR, the int8 export (QAT +
    distillation, over its seeds) against float, and against the best quantize_static by more
    than the seeds' spread."""
    float_psnr = rows[0].psnr
    int8 = next((r for r in rows if r.model == "QAT + distillation" and r.runtime == "ORT int8"), None)
    static = [r.psnr for r in rows if r.method.startswith("ORT quantize_static")]
    if int8 is None or not static:
        return [], {}
    spread = float(np.std(int8.seeds, ddof=1)) if len(int8.seeds) > 1 else float("nan")
    lead = int8.psnr - max(static)
    lines = ["", f"- float ≥ {FLOAT_GOAL_DB:.0f} dB: {float_psnr:.2f} dB, {'met' if float_psnr >= FLOAT_GOAL_DB else 'not met'}",
             f"- int8 export (QAT + distillation, 10-bit head/tail) within {INT8_GAP_DB} dB of float: "
             f"{int8.psnr - float_psnr:+.2f} dB, {'met' if int8.psnr >= float_psnr - INT8_GAP_DB else 'not met'}",
             f"- ahead of the best quantize_static by more than the seeds' sd: {lead:+.2f} dB against sd "
             f"{spread:.2f} dB, {'met' if lead > spread else 'not met'}"]
    return lines, {"float_psnr": float_psnr, "int8_psnr": int8.psnr, "int8_sd": spread, "lead_over_static": lead}


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
