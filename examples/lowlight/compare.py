"""One PNG with the float model's, the int8 model's and the ground truth's pictures side by side.

    python -m deployq.examples.lowlight.compare build/lowlight/raw --float build/lowlight/png-float \
        --int8 build/lowlight/png --out build/lowlight/compare.png

Each scene of a SID folder (``gt/{id}.png``, and ``short/{id}_00_{t}s.dng`` enhanced by
``deployq run`` into ``{id}_00_{t}s.png``) is one row: float | int8 | ground truth, each labelled
with its PSNR against the ground truth. The file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import skimage.io
from PIL import Image, ImageDraw

from deployq.core.decibels import psnr_db
from deployq.core.files import atomic_path

GAP = 8  # pixels between pictures
LABEL = 18  # height of the label strip above each picture


def psnr(picture: np.ndarray, truth: np.ndarray) -> float:
    """10·log10(1 / MSE) of two 8-bit pictures, in [0, 1] units."""
    return psnr_db(float(np.mean((picture.astype(np.float64) - truth.astype(np.float64)) ** 2)), peak=255.0)


def _labelled(picture: np.ndarray, text: str) -> np.ndarray:
    strip = Image.new("RGB", (picture.shape[1], LABEL), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 3), text, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), picture[..., :3]], axis=0)


def scene_row(gt: Path, pictures: dict[str, Path]) -> tuple[np.ndarray, dict[str, float]]:
    """One row: every picture labelled with its PSNR, then the ground truth."""
    truth = skimage.io.imread(gt)[..., :3]
    tiles, scores = [], {}
    for label, path in pictures.items():
        picture = skimage.io.imread(path)[..., :3]
        if picture.shape != truth.shape:
            raise ValueError(f"{path}: {picture.shape[:2]} pixels, the ground truth {gt} has {truth.shape[:2]}")
        scores[label] = psnr(picture, truth)
        tiles.append(_labelled(picture, f"{label}  {scores[label]:.2f} dB"))
    tiles.append(_labelled(truth, "ground truth"))
    gap = np.full((tiles[0].shape[0], GAP, 3), 255, np.uint8)
    row = tiles[0]
    for tile in tiles[1:]:
        row = np.concatenate([row, gap, tile], axis=1)
    return row, scores


def compare(sid_folder: Path, outputs: dict[str, Path], out: Path) -> dict[str, list[float]]:
    """Write the side-by-side PNG of every scene of `sid_folder`; returns each model's PSNRs."""
    rows, scores = [], {label: [] for label in outputs}
    for short in sorted((sid_folder / "short").glob("*.dng")):
        scene_id = short.stem.split("_")[0]
        pictures = {label: folder / f"{short.stem}.png" for label, folder in outputs.items()}
        missing = [str(p) for p in pictures.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no enhanced picture for {short}: {', '.join(missing)} (run deployq run first)")
        row, row_scores = scene_row(sid_folder / "gt" / f"{scene_id}.png", pictures)
        rows.append(row)
        for label, value in row_scores.items():
            scores[label].append(value)
    if not rows:
        raise FileNotFoundError(f"{sid_folder / 'short'}: no .dng files")
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    with atomic_path(out) as tmp:
        skimage.io.imsave(tmp, np.concatenate(padded, axis=0), check_contrast=False)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sid_folder", type=Path, help="a folder with short/ and gt/ (make_raw writes one)")
    parser.add_argument("--float", dest="float_dir", type=Path, required=True, help="deployq run's output, float model")
    parser.add_argument("--int8", dest="int8_dir", type=Path, required=True, help="deployq run's output, int8 model")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    scores = compare(args.sid_folder, {"float": args.float_dir, "int8": args.int8_dir}, args.out)
    means = ", ".join(f"{label} {np.mean(values):.2f} dB" for label, values in scores.items())
    print(f"{args.out}: {len(scores['float'])} scenes; mean PSNR against the ground truth: {means}")


if __name__ == "__main__":
    main()
