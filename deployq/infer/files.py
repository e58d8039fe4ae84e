"""Raw camera files (or packed .npy arrays) -> the engine -> sRGB PNGs, all written or none.

    deployq run build/model.int8.onnx short/00001_00_0.1s.ARW --ratio 250 --out out/ --bench 20
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import imageio.v3
import numpy as np

from deployq.calib.data import RAW_SUFFIXES, exposure_ratio, has_sid_ratio
from deployq.calib.raw import load_packed
from deployq.core.files import AtomicOutputs
from deployq.infer.engine import RunError, infer, load_engine


def read_input(path: Path, ratio: Optional[float]) -> np.ndarray:
    """A packed (4, H/2, W/2) frame from a raw file (times the exposure ratio) or a .npy array."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
        if array.ndim != 3 or array.shape[0] != 4:
            raise RunError(f"{path}: a .npy input must be packed raw (4, H, W), got {array.shape}")
        return array.astype(np.float32)
    if path.suffix.lower() not in RAW_SUFFIXES:
        raise RunError(f"{path}: not a raw file ({', '.join(RAW_SUFFIXES)}) or a .npy array")
    return load_packed(path, ratio if ratio is not None else exposure_ratio(path))


def write_png(path: str, image: np.ndarray) -> None:
    """CHW float in [0, 1] -> 8-bit sRGB PNG at `path`."""
    pixels = (np.clip(image, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    imageio.v3.imwrite(path, pixels, extension=".png")


def input_files(inputs: Sequence[str]) -> list[Path]:
    """The files named by `inputs`, folders expanded to the raw / .npy files in them."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in RAW_SUFFIXES + (".npy",))
            if not found:
                raise RunError(f"{item}: no raw files in this folder")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise RunError(f"{item}: no such file or folder")
    return files


def enhance(model_path: str, inputs: Sequence[str], out_dir: str, *, ratio: Optional[float] = None,
            threads: Optional[int] = None, tile: Optional[int] = None, overlap: Optional[int] = None,
            batch: int = 4, say: Callable[[str], None] = print) -> list[Path]:
    """Run `model_path` over raw files (or folders of them); one PNG per input in `out_dir`.

    All PNGs appear together when every input has been processed; if one input fails, none does.
    """
    if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
        raise RunError(f"--ratio must be a positive finite number, got {ratio}")
    engine = load_engine(model_path, threads)
    files = input_files(inputs)
    if ratio is None:
        unknown = [p for p in files if p.suffix.lower() in RAW_SUFFIXES and not has_sid_ratio(p)]
        if unknown:
            say(f"note: no exposure ratio for {len(unknown)} raw file(s) (first: {unknown[0]}): they are not SID "
                "short exposures with a long one in ../long; running them at ratio 1 (pass --ratio R to brighten)")
    written, lines = [], []
    with AtomicOutputs() as out:
        for path in files:
            start = time.perf_counter()
            image = infer(engine, read_input(path, ratio), tile=tile, overlap=overlap, batch=batch)
            target = out.write(Path(out_dir) / f"{path.stem}.png", lambda tmp: write_png(tmp, image))
            lines.append(f"{path.name} -> {target} ({image.shape[2]}x{image.shape[1]}, {time.perf_counter() - start:.2f} s)")
            written.append(target)
    for line in lines:  # once the PNGs exist
        say(line)
    return written
