"""Held-out evaluation of the low-light example: PSNR and SSIM of the sRGB output.

Two held-out sets of :class:`~deployq.examples.lowlight.data.SyntheticLowLight`: ``validation_set()``
(``split="val"``: photographs training never sees, training's camera distribution) picks
checkpoints; ``test_set()`` (``split="test"``: other photographs, a sensor and noise levels no
other split draws) is what results are reported on. Torch models, ONNX files and
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

from deployq.core.decibels import psnr_db
from deployq.examples.lowlight.data import SyntheticLowLight
from deployq.core.runtime import load_onnx, session

VAL_SIZE, VAL_LENGTH, VAL_SEED = 128, 48, 2024
TEST_SIZE, TEST_LENGTH, TEST_SEED = 128, 96, 2025


def validation_set(size: int = VAL_SIZE, length: int = VAL_LENGTH, seed: int = VAL_SEED) -> SyntheticLowLight:
    """The split that picks checkpoints."""
    return SyntheticLowLight(size=size, length=length, split="val", seed=seed)


def test_set(size: int = TEST_SIZE, length: int = TEST_LENGTH, seed: int = TEST_SEED) -> SyntheticLowLight:
    """The split results are reported on: unseen photographs, sensor and noise levels."""
    return SyntheticLowLight(size=size, length=length, split="test", seed=seed)


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """10·log10(1 / MSE) of images in [0, 1] (the prediction is clipped to [0, 1] first)."""
    return psnr_db(float(np.mean((np.clip(pred, 0, 1) - target) ** 2)))


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
    """Mean PSNR (dB) and SSIM of `predict` over `dataset` (default: the test set)."""
    dataset = dataset if dataset is not None else test_set()
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
    parser.add_argument("--split", choices=("val", "test"), default="test", help="which held-out set (default test)")
    args = parser.parse_args(argv)
    dataset = test_set() if args.split == "test" else validation_set()
    results = {m: evaluate(onnx_predictor(m, optimize=not args.reference_view), dataset) for m in args.models}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
