"""Held-out evaluation of the low-light example: PSNR and SSIM of the sRGB output.

The held-out set is :class:`deployq.calib.synthetic.SyntheticLowLight` with ``split="val"``:
SID-style pairs made from photographs the training split never sees. Torch models, ONNX files and
onnxruntime sessions are all evaluated by the same loop, on the same inputs.

    python -m deployq.examples.lowlight.evaluate build/model.float.onnx build/model.int8.onnx
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from skimage.metrics import structural_similarity

from deployq.calib.synthetic import SyntheticLowLight
from deployq.sim import load_onnx, session

VAL_SIZE, VAL_LENGTH, VAL_SEED = 128, 48, 2024


def validation_set(size: int = VAL_SIZE, length: int = VAL_LENGTH, seed: int = VAL_SEED) -> SyntheticLowLight:
    return SyntheticLowLight(size=size, length=length, split="val", seed=seed)


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """10·log10(1 / MSE) of images in [0, 1] (the prediction is clipped to [0, 1] first)."""
    mse = float(np.mean((np.clip(pred, 0, 1) - target) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of CHW images in [0, 1], channels averaged."""
    return float(structural_similarity(np.clip(pred, 0, 1), target, channel_axis=0, data_range=1.0))


Predictor = Callable[[np.ndarray], np.ndarray]  # (N, 4, h, w) packed raw -> (N, 3, H, W) sRGB


def torch_predictor(model: torch.nn.Module) -> Predictor:
    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return predict


def onnx_predictor(model: str | onnx.ModelProto, optimize: bool = True, threads: int = 2) -> Predictor:
    """onnxruntime on the CPU; `optimize=True` runs the integer kernels (what a device computes)."""
    proto = load_onnx(model) if isinstance(model, str) else model
    sess = session(proto, optimize=optimize, threads=threads)
    name = sess.get_inputs()[0].name
    output = sess.get_outputs()[0].name
    return lambda x: sess.run([output], {name: x})[0]


def evaluate(predict: Predictor, dataset: Sequence | None = None, batch: int = 8) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of `predict` over `dataset` (default: the held-out set)."""
    dataset = dataset if dataset is not None else validation_set()
    psnrs, ssims = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        x = np.stack([it["input"].numpy() for it in items])
        out = predict(x)
        for o, it in zip(out, items):
            target = it["target"].numpy()
            psnrs.append(psnr(o, target))
            ssims.append(ssim(o, target))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "images": len(psnrs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ONNX files to evaluate")
    parser.add_argument("--reference-view", action="store_true", help="run with graph optimizations disabled")
    args = parser.parse_args(argv)
    results = {m: evaluate(onnx_predictor(m, optimize=not args.reference_view)) for m in args.models}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
