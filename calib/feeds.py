"""Inputs for an ONNX model read from files: the sizes a symbolic dimension takes from the first
file (a ``--dynamic-hw`` export), and feeds in the model's own dtypes (``diff``, ``check``)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from deployq.core.runtime import InputInfo

from .data import (ARRAY_SUFFIXES, RAW_SUFFIXES, InputDataError, _read_image, _shape_text, files_in, load_feeds)
from .raw import RawReadError, read_raw

__all__ = ["file_feeds", "shape_from_files"]


def _sample_shape(path: Path, input_shape: Sequence[int], key: str | None) -> tuple[int, ...]:
    """The shape one sample of `path` has at its own size: an array's (after the batch, if it has
    one), a raw file's packed ``(4, H/2, W/2)`` or mosaic ``(1, H, W)``, an image's ``(C, H, W)``."""
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        try:
            loaded = np.load(path, allow_pickle=False, mmap_mode="r")
            if not isinstance(loaded, np.ndarray):
                with loaded:
                    loaded = loaded[key if key in loaded.files else sorted(loaded.files)[0]]
        except (OSError, ValueError, EOFError, IndexError, zipfile.BadZipFile) as error:
            raise InputDataError(f"{path}: cannot read the array file ({error})") from error
        return tuple(loaded.shape[1:] if loaded.ndim == len(input_shape) else loaded.shape)
    if suffix in RAW_SUFFIXES:
        try:
            height, width = read_raw(path).bayer.shape
        except RawReadError as error:
            raise InputDataError(str(error)) from error
        return (4, height // 2, width // 2) if input_shape[1] == 4 else (1, height, width)
    image = _read_image(path)
    return (1 if image.ndim == 2 else image.shape[-1], *image.shape[:2])


def shape_from_files(path: str | os.PathLike, info: InputInfo) -> tuple[int, ...]:
    """`info`'s shape with its symbolic dimensions (a ``--dynamic-hw`` export's H and W) taken from
    the first file of `path` at its own size, and a batch of 1 (every file is then read at that
    shape: raw files centre-cropped, images resized to cover it). The fixed dimensions must agree."""
    first = files_in(path)[0]
    sample = _sample_shape(first, info.shape, info.name)
    wanted = tuple("?" if k == 0 or k in info.free else d for k, d in enumerate(info.shape))
    if len(sample) != len(info.shape) - 1 or any(sample[k - 1] != d for k, d in enumerate(wanted) if k and d != "?"):
        raise InputDataError(f"{first}: a sample of shape {_shape_text(sample)} does not fit input {info.name!r} "
                             f"of shape {_shape_text(wanted)}")
    return (1, *(sample[k - 1] if k in info.free else info.shape[k] for k in range(1, len(info.shape))))


def file_feeds(path: str, inputs: list[InputInfo], ratio: Optional[float] = None,
               limit: Optional[int] = None) -> list[dict[str, np.ndarray]]:
    """Inputs read from files: raw, images, .npy/.npz for a one-input model; .npz files keyed by
    input name for a model with several inputs (:func:`deployq.calib.data.load_feeds`)."""
    feeds = load_feeds(path, [(i.name, i.shape) for i in inputs], ratio=ratio, limit=limit)
    dtypes = {i.name: i.dtype for i in inputs}
    return [{name: a.astype(dtypes[name]) for name, a in f.items()} for f in feeds]
