"""How many calibration samples AdaRound and bias correction should learn from (``--refine-samples``).

    scripts/install-peers.sh    # facenet-pytorch (trained MTCNN weights inside its wheel) into .peers/
    python benchmarks/bench_budgets.py [--samples 8,32,64] [--calib 64] [--eval 256] [--seeds 3]

facenet-pytorch's wheel ships the trained weights of MTCNN's three face-detection networks (PNet,
RNet, ONet: PReLU, max pooling, several outputs); nothing is downloaded. Each is exported with
plain min/max calibration and with ``--ptq bias`` / ``--ptq adaround`` at each budget, on crops of
scikit-image's photographs (calibration: astronaut, coffee, chelsea; held out: three others),
scaled as MTCNN expects ((x·255 − 127.5) / 128). The score is the int8 model's output SQNR against
the float model in onnxruntime (fully optimized), all outputs of the held-out crops.
Not part of ``run_all.py``: facenet-pytorch pins old torch releases, so it is installed without
its dependencies, beside the venv. The results go to ``benchmarks/results/budgets.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_budgets.py"
NETWORKS = (("PNet", "pnet", 24), ("RNet", "rnet", 24), ("ONet", "onet", 48))
CALIB_PHOTOS, HELD_OUT_PHOTOS = ("astronaut", "coffee", "chelsea"), ("immunohistochemistry", "rocket", "cat")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="8,32,64", help="the budgets tried (comma-separated)")
    parser.add_argument("--calib", type=int, default=64, help="calibration crops (at least the largest budget)")
    parser.add_argument("--eval", type=int, default=256, help="held-out crops the SQNR is measured on")
    parser.add_argument("--seeds", type=int, default=3, help="calibration draws (seeds 0, 2, 4, ...)")
    return parser.parse_args(argv)


def crops(size: int, count: int, seed: int, photos: tuple[str, ...]) -> list[np.ndarray]:
    """`count` random square crops of the photos, resized to `size`, as MTCNN's (1, 3, size, size) input."""
    import skimage.data
    import skimage.transform

    rng = np.random.default_rng(seed)
    images = [skimage.img_as_float32(getattr(skimage.data, name)()) for name in photos]
    out = []
    for i in range(count):
        image = images[i % len(images)]
        side = int(rng.integers(size, min(image.shape[:2])))
        top, left = (int(rng.integers(0, n - side + 1)) for n in image.shape[:2])
        crop = skimage.transform.resize(image[top:top + side, left:left + side], (size, size), anti_aliasing=True)
        out.append(((crop * 255 - 127.5) / 128).transpose(2, 0, 1)[None].astype(np.float32))
    return out


def trained(class_name: str, weights: str):
    import torch

    from deployq.examples.torchvision_models import import_torchvision

    import_torchvision()  # facenet-pytorch imports torchvision: the CPU torch / CUDA torchvision fix first
    common.peers_importable()
    try:
        mtcnn = importlib.import_module("facenet_pytorch.models.mtcnn")
    except ImportError as err:
        raise common.BenchmarkError(f"{err}: run scripts/install-peers.sh first") from None
    model = getattr(mtcnn, class_name)(pretrained=False)
    path = Path(mtcnn.__file__).parents[1] / "data" / f"{weights}.pt"
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    import torch

    from deployq.ptq.pipeline import PTQOptions

    budgets = [int(n) for n in args.samples.split(",") if n]
    if max(budgets) > args.calib:
        raise common.BenchmarkError(f"--calib {args.calib} is fewer than the largest budget {max(budgets)}")
    settings = [("plain", PTQOptions())] + [(f"{m} @{n}", PTQOptions((m,), refine_samples=n))
                                            for m in ("bias", "adaround") for n in budgets]
    rows, deltas = [], {name: [] for name, _ in settings[1:]}
    for class_name, weights, size in NETWORKS:
        model = trained(class_name, weights)
        feeds = [{"input": x} for x in crops(size, args.eval, 1, HELD_OUT_PHOTOS)]
        scores: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in settings}
        for seed in range(args.seeds):
            calib = [torch.from_numpy(c) for c in crops(size, args.calib, 2 * seed, CALIB_PHOTOS)]
            for name, options in settings:
                scores[name].append(_score(model, calib, feeds, options, args.calib))
                if name != "plain":
                    deltas[name].append(scores[name][-1][0] - scores["plain"][-1][0])
            print(f"{class_name} seed {seed}: " + ", ".join(f"{n} {v[-1][0]:.2f}" for n, v in scores.items()),
                  file=sys.stderr, flush=True)
        rows.append([class_name, *(f"{np.mean([db for db, _ in v]):.2f} ({np.mean([t for _, t in v]):.0f} s)"
                                   for v in scores.values())])
    rows.append(["mean change from plain", "", *(f"{np.mean(d):+.2f} dB (worst {min(d):+.2f})"
                                                 for d in deltas.values())])
    body = common.table(["network", *(name for name, _ in settings)], rows, "l" + "r" * len(settings))
    notes = ["", f"Output SQNR (dB) of the int8 model on {args.eval} held-out crops, mean over {args.seeds} "
             f"calibration draws of {args.calib} crops (seeds 0, 2, ...), the whole export's seconds (mean) in "
             "brackets; the last row: the mean change from plain calibration over networks and draws, and the "
             "largest loss of one network on one draw. Machine: " + common.machine_text() + "."]
    return common.Section("budgets", "PTQ budgets: calibration samples for AdaRound and bias correction",
                          common.command_line(SCRIPT, argv), body + notes)


def _score(model, calib: list, feeds: list[dict], options, limit: int) -> tuple[float, float]:
    """(output SQNR dB on the held-out `feeds`, seconds) of one export of `model` calibrated on `calib`."""
    import deployq
    from benchmarks.bench_conformance import outputs, sqnr_db

    with tempfile.TemporaryDirectory(prefix="bench_budgets.") as tmp, common.quiet():
        start = time.perf_counter()
        result = deployq.export(model, calib[0], tmp, calib=calib, calib_limit=limit, ptq=options, ort_format=False)
        seconds = time.perf_counter() - start
        name_in = result.quant_model.graph.input[0].name
        named = [{name_in: f["input"]} for f in feeds]
        flat = [o for out in outputs(result.files["float"], named) for o in out]
        return sqnr_db(flat, [o for out in outputs(result.files["int8"], named) for o in out]), seconds


if __name__ == "__main__":
    sys.exit(common.main_for(run, sys.argv[1:]))
