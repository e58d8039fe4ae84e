"""ONNX in: deployq, quantize_static and NNCF on trained ONNX models no one here wrote, in one run.

    scripts/install-peers.sh            # NNCF into .peers/, and rapidocr-onnxruntime's wheel (its models)
    python benchmarks/bench_onnx_in.py [--models cls,det]

The models are PP-OCR's, as they ship inside the ``rapidocr-onnxruntime==1.4.4`` wheel (read from the
wheel, nothing downloaded at run time): the text direction classifier (``ch_ppocr_mobile_v2.0_cls``,
opset 11) and the text detector (``ch_PP-OCRv4_det``, opset 12), both exported from Paddle. The inputs
are made offline by ``benchmarks/ocr_data.py``: text lines (half turned 180°) and pages of text
printed on photographs, preprocessed as rapidocr does. Calibration draws (seed 0) and held-out draws
(seed 1) are disjoint; every tool gets the same calibration inputs and the same user file:

* ``deployq export --onnx FILE --calib ...`` (plain min/max, and ``--ptq bias``);
* ``quantize_static`` (MinMax; QDQ, per-channel s8 weights, u8 activations);
* NNCF's ONNX ``nncf.quantize`` (its defaults: fast bias correction).

Columns, on the held-out inputs: output SQNR (dB) of the quantized model's output against the user's
float file in onnxruntime (fully optimized, 1 thread); the task metric (classifier: predictions that
agree with the float model's; detector: IoU of the text pixels, probability > 0.3, with the float
model's); the tool's seconds; for deployq, ``deployq check``'s largest code difference (LSB); and how
many of the file's quant points ``deployq diff USER_FILE QUANT_FILE`` pairs, of all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_onnx_in.py"
WHEEL = common.ROOT / ".peers" / "wheels" / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
FILES = {"cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"}
TITLES = {"cls": "PP-OCR text direction classifier (ch_ppocr_mobile_v2.0_cls, 48x192 text lines)",
          "det": "PP-OCRv4 text detector (ch_PP-OCRv4_det, 384x384 pages)"}
MODELS = tuple(FILES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--calib", type=int, default=32, help="calibration inputs (seed 0)")
    parser.add_argument("--held-out", type=int, default=64, help="held-out inputs (seed 1)")
    return parser.parse_args(argv)


def model_file(name: str, work: Path) -> Path:
    if not WHEEL.is_file():
        raise common.BenchmarkError(f"{WHEEL} is missing: run scripts/install-peers.sh first")
    with zipfile.ZipFile(WHEEL) as wheel:
        return Path(wheel.extract(FILES[name], work))


def data(name: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from benchmarks import ocr_data

    return ocr_data.text_lines(count, seed) if name == "cls" else ocr_data.pages(count, seed)


def outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])


def task_metric(name: str, reference: np.ndarray, ours: np.ndarray) -> str:
    if name == "cls":
        return f"{100 * np.mean(reference.argmax(1) == ours.argmax(1)):.1f}% agree"
    a, b = reference > 0.3, ours > 0.3
    return f"IoU {(a & b).sum() / max(1, (a | b).sum()):.3f}"


def pairing(user_file: Path, path: Path, calibration: np.ndarray) -> str:
    import deployq

    report = deployq.diff(str(user_file), str(path), [x[None] for x in calibration[:2]], mode="local")
    return f"{len(report.rows)}/{len(report.rows) + len(report.unmatched)}"


def measure(name: str, args: argparse.Namespace, work: Path) -> list[list[str]]:
    import deployq
    from benchmarks.bench_peers import import_peers, nncf_quantize

    user_file = model_file(name, work)
    calibration, _ = data(name, args.calib, seed=0)
    held_out, truth = data(name, args.held_out, seed=1)
    reference = outputs(user_file, held_out)
    batches = [x[None] for x in calibration]

    def deployq_export(folder: str, methods: tuple[str, ...]) -> tuple[Path, str]:
        result = deployq.export(str(user_file), calibration[:1], work / folder, calib=batches, ptq=methods,
                                ort_format=False)
        parity = deployq.check(str(result.files["checkpoint"]), result.files["int8"], batches[:2])
        return result.files["int8"], f"{parity.max_lsb} LSB"

    import_peers()
    contenders: list[tuple[str, Callable[[], tuple[Path, str]]]] = [
        ("deployq export --onnx (min/max)", lambda: deployq_export("plain", ())),
        ("deployq export --onnx --ptq bias", lambda: deployq_export("bias", ("bias",))),
        ("quantize_static MinMax", lambda: (common.quantize_static_qdq(user_file, work / "static.onnx", batches,
                                                                      "MinMax"), "")),
        ("NNCF default (fast bias correction)",
         lambda: (nncf_quantize(user_file, work / "nncf.onnx", batches, False), "")),
    ]
    rows = []
    for label, make in contenders:
        try:  # a tool that cannot quantize the file, or writes one onnxruntime refuses, is a row
            with common.quiet():
                (path, parity), seconds = common.timed(make)
                ours = outputs(path, held_out)
            sqnr = 10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - ours) ** 2), 1e-30))
            rows.append([label, f"{sqnr:.2f}", task_metric(name, reference, ours), f"{seconds:.1f}", parity or "-",
                         pairing(user_file, path, calibration)])
        except Exception as err:
            rows.append([label, f"cannot: {common.error_text(err)[:200]}", "", "", "", ""])
        print(f"{name}: {label}: {rows[-1][1:3]}", file=sys.stderr, flush=True)
    if name == "cls":
        accuracy = np.mean(reference.argmax(1) == truth)
        rows.append(["(float model: direction accuracy on the held-out lines)", "", f"{100 * accuracy:.1f}%",
                     "", "", ""])
    return rows


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    names = common.chosen_models(args.models, MODELS)
    body: list[str] = []
    with common.torch_threads(1):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"bench_onnx_in.{name}.") as tmp:
                rows = measure(name, args, Path(tmp))
            body += ["", f"**{TITLES[name]}**", ""]
            body += common.table(["quantization", "output SQNR dB", "task (vs float)", "seconds", "check",
                                  "diff: points paired"], rows)
    body += ["", f"{args.calib} calibration and {args.held_out} held-out inputs (disjoint draws); onnxruntime's CPU "
             "provider, 1 thread; NNCF 3.4.0 (`scripts/install-peers.sh`). Seconds: the tool's own quantization "
             "(deployq's export also writes the float graph, the checkpoint and qparams.json), one run. One seed. "
             "Machine: " + common.machine_text() + "."]
    return common.Section("onnx_in", "ONNX in: trained models shipped in a PyPI wheel, deployq vs quantize_static "
                          "and NNCF", common.command_line(SCRIPT, argv), body)


if __name__ == "__main__":
    sys.exit(common.main_for(run, sys.argv[1:]))
