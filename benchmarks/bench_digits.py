"""Accuracy retention on a task that ships its data: a small CNN on scikit-learn's digits.

    python benchmarks/bench_digits.py [--float-epochs 30 --qat-epochs 4]

``sklearn.datasets.load_digits`` (1797 8×8 images, values 0..16 scaled to [0, 1]) split 75/25,
stratified, ``random_state=0``. The float model (``benchmarks.models:digits_cnn``) is trained
here, then quantized five ways: deployq QAT with and without distillation from the float model
(``deployq.train.loop``, same epochs), deployq PTQ (calibration only), onnxruntime's quantize_static
(MinMax / Entropy / Percentile), and torch.ao FX QAT (``prepare_qat_fx`` / ``convert_fx``, x86
qconfig, the same epochs and learning rate), run in torch and, exported with torch.onnx, in
onnxruntime. QAT runs report the last epoch (no selection on the test set).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from benchmarks.models import digits_cnn
from deployq.deploy.export import ExportResult
from deployq.core.runtime import load_onnx, session
from deployq.train.loop import train

SCRIPT = "bench_digits.py"
FACTORY = "benchmarks.models:digits_cnn"
DISTILL_LAYER = "relu"  # the quant point after conv3 + bn3 + F.relu, the last feature map
BATCH = 64
# 8 bits leave this task nothing to recover; at 4 bits (8-bit input) post-training quantization loses
# accuracy and QAT has something to show
FOUR_BIT = {"weight": {"bits": 4}, "activation": {"bits": 4}, "input": 8}


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Row:
    method: str
    runtime: str
    accuracy: Optional[float]
    note: str = ""


def load_digits_split() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                                        stratify=digits.target)
    return Digits(torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test),
                  torch.from_numpy(y_test).long())


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=4, help="epochs of every QAT run (deployq and torch.ao)")
    parser.add_argument("--float-lr", type=float, default=3e-3)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--calib-items", type=int, default=64, help="calibration images (training split)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (1: on 8x8 images a second thread only adds contention)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds: each trains its own float model and every quantization of it")
    return parser.parse_args(argv)


def fit(model: nn.Module, data: Digits, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam on cross-entropy, batches of 64 in a seeded random order; returns the model in eval."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(data.x_train), generator=gen).split(BATCH):
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def torch_accuracy(model: nn.Module, data: Digits) -> float:
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def ort_accuracy(path: Path, data: Digits, threads: int) -> float:
    """Accuracy of an ONNX model in a fully optimized onnxruntime session (integer kernels)."""
    sess = session(load_onnx(path), optimize=True, threads=threads)
    logits = sess.run(None, {sess.get_inputs()[0].name: data.x_test.numpy()})[0]
    return float((logits.argmax(1) == data.y_test.numpy()).mean())


def deployq_qat(float_pt: Path, data: Digits, args: argparse.Namespace, work: Path, distill: bool,
                config: Optional[dict] = None) -> Path:
    """``deployq train`` from the float weights (8-bit config, or `config`); the last epoch's checkpoint."""
    recipe = {
        "model": {"factory": FACTORY, "weights": str(float_pt)},
        "data": {"kind": "tensors", "train": (data.x_train, data.y_train), "val": (data.x_test, data.y_test)},
        "loss": "cross_entropy", "metric": "accuracy", "epochs": args.qat_epochs, "batch_size": BATCH,
        "lr": args.qat_lr, "calibration_batches": max(1, args.calib_items // BATCH), "seed": args.seed,
        "output_dir": str(work),
    }
    if distill:
        recipe["distill"] = {"layers": {DISTILL_LAYER: 1.0}}
    if config is not None:
        recipe["quant_config"] = config
    with common.quiet():
        result = train(recipe, progress=False)
    return result.output_dir / "last.pt"


def deployq_rows(ptq: ExportResult, float_pt: Path, data: Digits, args: argparse.Namespace,
                 work: Path) -> list[Row]:
    """deployq QAT with and without distillation, and PTQ (`ptq`, already exported)."""
    rows = []
    for distill in (True, False):
        label = f"deployq QAT{' + distillation' if distill else ''} ({args.qat_epochs} ep.)"
        ckpt = deployq_qat(float_pt, data, args, work / f"qat{'_distill' if distill else ''}", distill)
        rows += exported_rows(label, common.export_checkpoint(ckpt, ckpt.parent / "export", factory=FACTORY), data, args)
    return rows + exported_rows("deployq PTQ (calibration only)", ptq, data, args)


def four_bit_rows(model: nn.Module, float_pt: Path, data: Digits, args: argparse.Namespace, work: Path) -> list[Row]:
    """deployq PTQ and QAT + distillation with 4-bit weights and activations (8-bit input)."""
    calibration = list(data.x_train[: args.calib_items].split(BATCH))
    ptq_ckpt = common.calibrated_checkpoint(work / "ptq4.pt", FACTORY, {}, (1, *data.x_train.shape[1:]), calibration,
                                            model=model, config=FOUR_BIT)
    rows = exported_rows("deployq PTQ, 4-bit (calibration only)",
                         common.export_checkpoint(ptq_ckpt, work / "ptq4", factory=FACTORY), data, args)
    qat = deployq_qat(float_pt, data, args, work / "qat4", distill=True, config=FOUR_BIT)
    return rows + exported_rows(f"deployq QAT + distillation, 4-bit ({args.qat_epochs} ep.)",
                                common.export_checkpoint(qat, qat.parent / "export", factory=FACTORY), data, args)


def exported_rows(label: str, result: ExportResult, data: Digits, args: argparse.Namespace) -> list[Row]:
    return [Row(label, "torch fake-quant", torch_accuracy(result.qmodel, data)),
            Row(label, "ORT int8", ort_accuracy(result.files["int8"], data, args.threads))]


def quantize_static_rows(float_onnx: Path, data: Digits, args: argparse.Namespace, work: Path) -> list[Row]:
    calibration = [b.numpy() for b in data.x_train[: args.calib_items].split(BATCH)]
    rows = []
    for method in common.CALIBRATION_METHODS:
        path = common.quantize_static_qdq(float_onnx, work / f"ort_{method}.onnx", calibration, method)
        rows.append(Row(f"ORT quantize_static {method}", "ORT int8", ort_accuracy(path, data, args.threads)))
    return rows


def torch_ao_rows(model: nn.Module, data: Digits, args: argparse.Namespace, work: Path) -> list[Row]:
    """torch.ao FX QAT, if this torch still has it: torch int8 kernels, then ONNX in onnxruntime."""
    label = f"torch.ao FX QAT, x86 qconfig ({args.qat_epochs} ep.)"
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        try:
            converted, note = torch_ao_qat(model, data, args)
        except Exception as err:  # whatever torch.ao raises on this torch version is the result
            return [Row(label, "torch int8 (x86)", None, common.error_text(err))]
        return [Row(label, "torch int8 (x86)", torch_accuracy(converted, data), note),
                torch_ao_onnx_row(converted, data, args, work, label)]
    finally:
        torch.backends.quantized.engine = engine


def torch_ao_qat(model: nn.Module, data: Digits, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """prepare_qat_fx -> the float model's training loop -> convert_fx; and what torch.ao warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"),
                                  (data.x_train[:1],))
        converted = convert_fx(fit(prepared, data, args.qat_epochs, args.qat_lr, args.seed))
    return converted, deprecation(caught)


def deprecation(caught: list[warnings.WarningMessage]) -> str:
    message = next((str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)), "")
    return f"warns: {message.strip().splitlines()[0]}" if message else ""


def torch_ao_onnx_row(converted: nn.Module, data: Digits, args: argparse.Namespace, work: Path, label: str) -> Row:
    """torch.onnx.export of the converted model: the dynamo exporter (torch's default), else the
    TorchScript one; the ONNX model then runs in onnxruntime."""
    path, notes = work / "torch_ao.onnx", []
    for dynamo in (True, False):
        try:
            with common.quiet():
                torch.onnx.export(converted, (data.x_test[:1],), str(path), dynamo=dynamo, input_names=["x"],
                                  output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
            notes.append(f"torch.onnx.export(dynamo={dynamo}) works")
            return Row(label, "ORT (torch.onnx export)", ort_accuracy(path, data, args.threads), "; ".join(notes))
        except Exception as err:  # the exporter's failure is the result
            notes.append(f"torch.onnx.export(dynamo={dynamo}): {common.error_text(err)}")
    return Row(label, "ORT (torch.onnx export)", None, "; ".join(notes))


def run_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    """Train the float model, then every quantization of it. The float ONNX model is the one
    deployq exports beside the PTQ model: calibration leaves the weights as they are."""
    torch.manual_seed(args.seed)
    data = load_digits_split()
    model = fit(digits_cnn(seed=args.seed), data, args.float_epochs, args.float_lr, args.seed)
    float_pt = work / "float.pt"
    torch.save(model.state_dict(), float_pt)
    calibration = list(data.x_train[: args.calib_items].split(BATCH))
    ptq_ckpt = common.calibrated_checkpoint(work / "ptq.pt", FACTORY, {}, (1, *data.x_train.shape[1:]), calibration,
                                            model=model)
    ptq = common.export_checkpoint(ptq_ckpt, work / "ptq", factory=FACTORY)
    float_onnx = ptq.files["float"]
    rows = [Row(f"float ({args.float_epochs} ep.)", "torch fp32", torch_accuracy(model, data)),
            Row(f"float ({args.float_epochs} ep.)", "ORT fp32", ort_accuracy(float_onnx, data, args.threads))]
    rows += deployq_rows(ptq, float_pt, data, args, work)
    rows += quantize_static_rows(float_onnx, data, args, work)
    rows += torch_ao_rows(model, data, args, work)
    return rows + four_bit_rows(model, float_pt, data, args, work)


def seed_runs(args: argparse.Namespace) -> tuple[list[int], list[list[Row]]]:
    """Every row, once per seed (float model, data order and QAT all seeded)."""
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    runs = []
    for seed in seeds:
        args.seed = seed
        with tempfile.TemporaryDirectory(prefix="bench_digits.") as tmp, common.torch_threads(args.torch_threads):
            runs.append(run_rows(args, Path(tmp)))
    return seeds, runs


def mean_sd(values: list[float]) -> str:
    """'mean ± sd' in percentage points (sample standard deviation; one value: just the value)."""
    points = 100 * np.asarray(values)
    if len(points) == 1:
        return f"{points[0]:+.2f}"
    return f"{points.mean():+.2f} ± {points.std(ddof=1):.2f}"


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    seeds, runs = seed_runs(args)

    def cells(i: int) -> tuple:
        r = runs[0][i]
        values = [rows[i].accuracy for rows in runs]
        if any(v is None for v in values):
            return r.method, r.runtime, "failed", "-", "-", r.note
        deltas = [v - rows[0].accuracy for v, rows in zip(values, runs)]
        per_seed = " / ".join(f"{100 * v:.2f}" for v in values)
        return (r.method, r.runtime, f"{100 * np.mean(values):.2f}% ± {100 * np.std(values, ddof=1) if len(values) > 1 else 0:.2f}",
                mean_sd(deltas), per_seed, r.note)

    body = common.table(["quantization", "runtime", "test accuracy (mean ± sd)", "Δ vs float (points, mean ± sd)",
                         f"per seed ({', '.join(map(str, seeds))})", "notes"],
                        [cells(i) for i in range(len(runs[0]))], "llrrll")
    notes = ["", "scikit-learn digits, 1347 training / 450 test images (stratified, random_state=0); every "
             "quantized model is 8-bit (u8 activations, s8 per-channel weights) except the two 4-bit rows "
             "(4-bit weights and activations, 8-bit input; at 8 bits this task leaves nothing to recover). "
             "deployq QAT distils the "
             f"`{DISTILL_LAYER}` feature map from the float model (weight 1); calibration uses "
             f"{args.calib_items} training images; QAT learning rate {args.qat_lr:g} for deployq and torch.ao alike. "
             f"Each of the {len(seeds)} seeds trains its own float model; Δ is taken within a seed, then averaged "
             "(sample standard deviation over seeds). QAT reports its last epoch: the test split picks nothing."]
    return common.Section("digits", "Accuracy: CNN on scikit-learn digits (8-bit, and 4-bit)", common.command_line(SCRIPT, argv),
                          body + notes)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
