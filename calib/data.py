"""Model inputs from files, for calibration and for running a model: raw, images, .npy, .npz.

:func:`load_inputs` turns a file or a folder into a list of arrays, each exactly the model's
input shape ``(N, C, H, W)`` (``N`` samples per array, usually 1):

- raw camera files (via :func:`~deployq.calib.raw.read_raw`): packed RGGB ``(4, H/2, W/2)``
  for 4-channel models or the RGGB mosaic for 1-channel models, times the exposure ratio and
  clipped to [0, 1], centre-cropped (never resized: resampling would mix CFA sites);
- images: float [0, 1], CHW, centre-cropped, or first resized to cover the input if smaller;
- ``.npy`` / ``.npz``: arrays taken as they are (dtype kept), see :func:`load_inputs`.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
import numpy as np
import torch


from .raw import RawReadError, amplify, exposure_from_name, pack_bayer, read_raw, sid_ratio, unpack_bayer

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "RAW_SUFFIXES",
    "InputDataError",
    "exposure_ratio",
    "has_sid_ratio",
    "iterate_batches",
    "load_feeds",
    "files_in",
    "load_inputs",
]

RAW_SUFFIXES = (".arw", ".dng", ".nef", ".cr2", ".raf", ".orf", ".rw2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")
SUPPORTED_SUFFIXES = RAW_SUFFIXES + IMAGE_SUFFIXES + ARRAY_SUFFIXES


class InputDataError(ValueError):
    """Input data that does not exist, is not supported, or does not fit the model's input."""


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _files(path: Path) -> list[Path]:
    """The supported files of ``path`` (itself, or a folder's entries in sorted order)."""
    if not path.exists():
        raise InputDataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise InputDataError(
                f"{path}: unsupported file type {path.suffix or '(no suffix)'}; "
                f"supported: {' '.join(SUPPORTED_SUFFIXES)}"
            )
        return [path]
    entries = sorted(path.iterdir())
    if not entries:
        raise InputDataError(f"{path}: the folder is empty")
    files = [p for p in entries if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not files:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10])
        more = f" and {len(entries) - 10} more" if len(entries) > 10 else ""
        raise InputDataError(
            f"{path}: no supported files (found {found}{more}); "
            f"supported: {' '.join(SUPPORTED_SUFFIXES)}"
        )
    return files


def _centre_crop(array: np.ndarray, height: int, width: int, step: int = 1) -> np.ndarray:
    """Centre ``height x width`` window of the last two dims, offsets rounded down to ``step``."""
    top = (array.shape[-2] - height) // 2 // step * step
    left = (array.shape[-1] - width) // 2 // step * step
    return array[..., top : top + height, left : left + width]


def _crops(array: np.ndarray, height: int, width: int, step: int, rng: np.random.Generator | None,
           count: int) -> list[np.ndarray]:
    """``height x width`` windows of the last two dims: the centre one (`rng` None), or `count` at
    random offsets (multiples of ``step``) drawn from `rng`."""
    if rng is None:
        return [_centre_crop(array, height, width, step)]
    tops = rng.integers(0, (array.shape[-2] - height) // step + 1, count) * step
    lefts = rng.integers(0, (array.shape[-1] - width) // step + 1, count) * step
    return [array[..., t : t + height, l : l + width] for t, l in zip(tops, lefts)]


def _sid_long_file(short: Path) -> Path | None:
    """The long exposure of a SID short file ``.../short/{id}_00_{t}s.ext``, if it exists.

    Looks in the sibling ``long`` folder for ``{id}_*`` with the same suffix, as SID lays out.
    """
    if short.parent.name != "short" or exposure_from_name(short) is None:
        return None
    scene = short.stem.split("_", 1)[0]
    folder = short.parent.parent / "long"
    if not folder.is_dir():
        return None
    candidates = sorted(
        p
        for p in folder.glob(f"{scene}_*")
        if p.suffix.lower() == short.suffix.lower() and exposure_from_name(p) is not None
    )
    return candidates[0] if candidates else None


def exposure_ratio(short: Path) -> float:
    """SID's amplification for a short exposure: long / short exposure time from the file names,
    when the matching long exposure lies in the sibling ``long`` folder; else 1 (see
    :func:`has_sid_ratio`)."""
    long = _sid_long_file(Path(short))
    try:
        return sid_ratio(short, long) if long is not None else 1.0
    except ValueError as error:
        raise InputDataError(str(error)) from error


def has_sid_ratio(short: Path) -> bool:
    """Whether :func:`exposure_ratio` finds a ratio for `short`, rather than falling back to 1."""
    return _sid_long_file(Path(short)) is not None


def _raw_samples(path: Path, chw: Sequence[int], ratio: float | None, rng: np.random.Generator | None = None,
                 count: int = 1) -> list[np.ndarray]:
    """A raw file as ``(C, H, W)`` samples: packed (C = 4) or the mosaic (C = 1), amplified by the
    exposure ratio, the file's as-shot white balance and its colour matrix (:func:`~.raw.amplify`);
    the centre crop, or `count` random crops drawn from `rng`."""
    channels, height, width = chw
    if channels not in (1, 4):
        raise InputDataError(
            f"{path}: a raw file gives 4 packed channels or a 1-channel mosaic, "
            f"but the model input is {_shape_text(chw)}"
        )
    if ratio is None:
        ratio = exposure_ratio(path)
    try:
        image = read_raw(path)
    except RawReadError as error:
        raise InputDataError(str(error)) from error
    packed = amplify(pack_bayer(image.bayer), ratio, image.white_balance, image.colour_matrix)
    data = packed if channels == 4 else unpack_bayer(packed)[None]
    if data.shape[-2] < height or data.shape[-1] < width:
        raise InputDataError(
            f"{path}: the raw data {_shape_text(data.shape)} is smaller than the model input "
            f"{_shape_text(chw)}; raw data is cropped, never resized"
        )
    return [c.astype(np.float32) for c in _crops(data, height, width, 1 if channels == 4 else 2, rng, count)]


def _read_image(path: Path) -> np.ndarray:
    import skimage.io  # on first use: ~0.1 s that commands reading no image should not wait for

    try:
        return skimage.io.imread(path)
    except (OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputDataError(f"{path}: cannot read the image ({message})") from error


def _image_samples(path: Path, chw: Sequence[int], rng: np.random.Generator | None = None,
                   count: int = 1) -> list[np.ndarray]:
    """An image file as float32 ``(C, H, W)`` samples in [0, 1].

    The centre crop (or `count` random crops drawn from `rng`) if the image covers ``H x W``;
    otherwise it is first enlarged (bilinear, aspect kept) so that it does. Grayscale images have
    one channel; the channel count must match.
    """
    channels, height, width = chw
    import skimage.transform
    import skimage.util

    image = skimage.util.img_as_float32(_read_image(path))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != channels:
        found = image.shape[-1] if image.ndim == 3 else f"shape {image.shape}"
        raise InputDataError(
            f"{path}: the image has {found} channel(s) {_shape_text(image.shape)}, "
            f"the model input needs {channels} {_shape_text(chw)}"
        )
    scale = max(height / image.shape[0], width / image.shape[1])
    if scale > 1:
        size = (
            max(height, round(image.shape[0] * scale)),
            max(width, round(image.shape[1] * scale)),
        )
        image = skimage.transform.resize(image, size, anti_aliasing=False, preserve_range=True)
    chw_image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return [np.ascontiguousarray(c) for c in _crops(chw_image, height, width, 1, rng, count)]


def _array_samples(name: str, array: np.ndarray, input_shape: Sequence[int]) -> list[np.ndarray]:
    """Samples of shape ``input_shape[1:]`` from one array.

    The array is one sample ``input_shape[1:]``, ``N`` samples ``(N, *input_shape[1:])`` or ``N``
    whole inputs ``(N, *input_shape)``.
    """
    sample_shape = tuple(input_shape[1:])
    shape = array.shape
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise InputDataError(f"{name}: not a finite number at index {index} ({array[index]}); "
                             "inputs must be finite (NaN or Inf would poison every range and metric)")
    if array.dtype.kind not in "fiub":
        raise InputDataError(f"{name}: arrays of {array.dtype} are not model inputs (expected numbers)")
    if shape == sample_shape:
        return [array]
    if shape[1:] == sample_shape:
        return list(array)
    if shape[1:] == tuple(input_shape):
        return list(array.reshape(-1, *sample_shape))
    raise InputDataError(
        f"{name}: array shape {_shape_text(shape)} does not match the model input "
        f"{_shape_text(input_shape)} (accepted: {_shape_text(sample_shape)}, "
        f"(N, {_shape_text(sample_shape)[1:]} or (N, {_shape_text(input_shape)[1:]})"
    )


def _load_arrays(path: Path, input_shape: Sequence[int], key: str | None = None) -> list[np.ndarray]:
    """Samples of a ``.npy`` (one array) or ``.npz``: the array named `key` if it has one, else
    every array, sorted by key; no pickles."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return _array_samples(str(path), loaded, input_shape)
        with loaded:
            keys = [key] if key in loaded.files else sorted(loaded.files)
            samples = []
            for k in keys:
                samples += _array_samples(f"{path}[{k}]", loaded[k], input_shape)
            return samples
    except InputDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputDataError(f"{path}: cannot read the array file ({error})") from error


def _samples(path: Path, input_shape: Sequence[int], ratio: float | None, key: str | None = None,
             rng: np.random.Generator | None = None, count: int = 1) -> list[np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return _load_arrays(path, input_shape, key)
    if len(input_shape) != 4:
        raise InputDataError(
            f"{path}: raw and image files need a 4-D (N, C, H, W) model input, "
            f"got {_shape_text(input_shape)}"
        )
    if suffix in RAW_SUFFIXES:
        return _raw_samples(path, input_shape[1:], ratio, rng, count)
    return _image_samples(path, input_shape[1:], rng, count)


def load_inputs(
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    ratio: float | None = None,
    limit: int | None = None,
    name: str | None = None,
    crops: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Model inputs from a file or a folder (its files in sorted order), each of ``input_shape``.

    A raw or image file larger than the input gives its centre crop, or with ``crops`` > 1 that
    many crops at random positions (seeded by `seed`): many samples from a few large frames.

    Every file gives samples of shape ``input_shape[1:]``, which are grouped ``input_shape[0]``
    at a time (a trailing incomplete group is dropped with a warning); ``limit`` caps the number
    of arrays returned. Raw files are multiplied by ``ratio``; without it, a SID short file
    (``short/{id}_00_{t}s.ext`` next to ``long/{id}_00_{T}s.ext``) uses ``min(T / t, 300)`` and
    any other raw file 1. ``.npy`` holds one array, ``.npz`` several (read in sorted key order);
    an array is one sample ``input_shape[1:]``, ``N`` samples ``(N, *input_shape[1:])`` or
    ``N`` whole inputs ``(N, *input_shape)``; an ``.npz`` with an array called `name` (the model
    input's name) gives that array only. Raises :class:`InputDataError` naming the file.
    """
    input_shape = tuple(int(n) for n in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise InputDataError(f"invalid model input shape {_shape_text(input_shape)}")
    if limit is not None and limit < 1:
        raise InputDataError(f"limit must be at least 1, got {limit}")
    batch = input_shape[0]
    needed = None if limit is None else limit * batch
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(seed) if crops > 1 else None
    for file in _files(Path(path)):
        samples += _samples(file, input_shape, ratio, name, rng, crops)
        if needed is not None and len(samples) >= needed:
            break
    samples = samples[:needed]
    usable = len(samples) // batch * batch
    if usable == 0:
        raise InputDataError(
            f"{path}: found {len(samples)} sample(s), fewer than one model input of batch {batch}"
        )
    if usable < len(samples):
        warnings.warn(
            f"{path}: dropping {len(samples) - usable} sample(s) that do not fill a model "
            f"input of batch {batch}",
            stacklevel=2,
        )
    return [
        np.ascontiguousarray(np.stack(samples[start : start + batch]))
        for start in range(0, usable, batch)
    ]


def files_in(path: str | os.PathLike) -> list[Path]:
    """The input files :func:`load_inputs` reads from `path` (a file, or a folder's files in order)."""
    return _files(Path(path))


def load_feeds(
    path: str | os.PathLike,
    inputs: Sequence[tuple[str, Sequence[int]]],
    *,
    ratio: float | None = None,
    limit: int | None = None,
    crops: int = 1,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Model inputs for a model with named inputs ``[(name, shape), ...]``: one dict per call.

    One input: any file :func:`load_inputs` reads (`crops` and `seed` as it takes them). Several
    inputs: ``.npz`` files (or a folder of them) holding one array per input, keyed by the input's
    name, with the same number of samples.
    """
    if len(inputs) == 1:
        name, shape = inputs[0]
        return [{name: a} for a in load_inputs(path, shape, ratio=ratio, limit=limit, name=name, crops=crops,
                                               seed=seed)]
    names = [name for name, _ in inputs]
    files = [f for f in _files(Path(path)) if f.suffix.lower() == ".npz"]
    if not files:
        raise InputDataError(f"{path}: the model has {len(inputs)} inputs ({', '.join(names)}); give .npz "
                             "files holding one array per input, keyed by the input's name")
    feeds: list[dict[str, np.ndarray]] = []
    for file in files:
        with np.load(file, allow_pickle=False) as loaded:
            missing = [n for n in names if n not in loaded.files]
            if missing:
                raise InputDataError(f"{file}: no array for input(s) {', '.join(missing)} "
                                     f"(the file has {', '.join(sorted(loaded.files)) or 'no arrays'})")
            per_input = {}
            for name, shape in inputs:
                samples = _array_samples(f"{file}[{name}]", loaded[name], shape)
                per_input[name] = [np.stack(samples[i:i + shape[0]]) for i in range(0, len(samples) // shape[0] * shape[0], shape[0])]
        counts = {name: len(v) for name, v in per_input.items()}
        if len(set(counts.values())) != 1:
            raise InputDataError(f"{file}: the inputs have different numbers of samples: {counts}")
        feeds += [{name: np.ascontiguousarray(per_input[name][i]) for name in names}
                  for i in range(next(iter(counts.values())))]
        if limit is not None and len(feeds) >= limit:
            break
    if not feeds:
        raise InputDataError(f"{path}: no complete model input found")
    return feeds[:limit]


def iterate_batches(arrays: Iterable[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Concatenate consecutive arrays along dim 0, ``batch_size`` arrays at a time, as tensors.

    The last batch may hold fewer arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunk: list[np.ndarray] = []
    for array in arrays:
        chunk.append(array)
        if len(chunk) == batch_size:
            yield torch.from_numpy(np.concatenate(chunk))
            chunk = []
    if chunk:
        yield torch.from_numpy(np.concatenate(chunk))
