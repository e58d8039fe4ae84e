"""Writing raw camera files: uncompressed 16-bit DNGs (pidng) that rawpy reads back bit-exactly.

Test data and the low-light example's synthetic scenes are written through :func:`write_dng`, so
every reader in deployq sees them exactly as it sees a camera's files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from pidng.core import RAW2DNG, DNGTags, Tag
from pidng.defs import CalibrationIlluminant, DNGVersion, Orientation, PhotometricInterpretation

from deployq.core.files import atomic_path

from .raw import BAYER_PATTERNS

__all__ = ["SONY_A7S_COLOR_MATRIX", "write_dng"]

# XYZ (D65) -> camera of the Sony a7S (x 10000, Adobe DNG Converter's ColorMatrix): the SID camera.
SONY_A7S_COLOR_MATRIX = ((5838, -1430, -246), (-3497, 11477, 2297), (-748, 1885, 5778))
_CHANNEL = {"R": 0, "G": 1, "B": 2}
_BLACK_LEVEL, _WHITE_LEVEL = 512, 16383  # a Sony-like 14-bit sensor
_MIN_DNG_SIDE = 22  # LibRaw refuses smaller images


def _rational(value: float) -> list[int]:
    fraction = Fraction(value).limit_denominator(1_000_000)
    return [fraction.numerator, fraction.denominator]


def _black_levels(black_level: int | Sequence[int]) -> list[int]:
    levels = [int(black_level)] * 4 if np.isscalar(black_level) else [int(b) for b in black_level]
    if len(levels) != 4 or min(levels) < 0:
        raise ValueError(
            f"black_level must be one level or 4 (one per 2x2 site, row-major), got {black_level}"
        )
    return levels


def write_dng(
    path: str | os.PathLike,
    raw_uint16: np.ndarray,
    pattern: str = "RGGB",
    black_level: int | Sequence[int] = _BLACK_LEVEL,
    white_level: int = _WHITE_LEVEL,
    exposure_time: float | None = None,
    white_balance: Sequence[float] | None = None,
    colour_matrix: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write a Bayer mosaic as an uncompressed 16-bit DNG with pidng, atomically.

    ``pattern`` is the CFA of the top-left 2x2 (RGGB, BGGR, GRBG or GBRG); ``black_level`` is
    one level or four, one per 2x2 site in row-major order; ``exposure_time`` (seconds) goes to
    the EXIF ExposureTime tag; ``white_balance`` (as-shot multipliers R, G, B) goes to
    AsShotNeutral as their inverse; ``colour_matrix`` (XYZ D65 -> camera, 3 x 3, as DNG's
    ColorMatrix1) defaults to the Sony a7S one (:data:`SONY_A7S_COLOR_MATRIX` / 10000). rawpy reads
    the values back bit-exactly (``raw_image_visible``). LibRaw refuses images under 22 x 22
    pixels, so those are rejected here.
    """
    path = Path(path)
    raw = np.asarray(raw_uint16)
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise ValueError(f"{path}: expected a 2-D uint16 mosaic, got {raw.dtype} {raw.shape}")
    height, width = raw.shape
    if height < _MIN_DNG_SIDE or width < _MIN_DNG_SIDE:
        raise ValueError(
            f"{path}: LibRaw does not read DNGs smaller than {_MIN_DNG_SIDE}x{_MIN_DNG_SIDE}, "
            f"got {height}x{width}"
        )
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"{path}: unknown Bayer pattern {pattern!r}; expected one of {BAYER_PATTERNS}")
    blacks = _black_levels(black_level)
    if not max(blacks) < white_level <= 65535:
        raise ValueError(f"{path}: need black levels {blacks} < white level {white_level} <= 65535")
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.Orientation, Orientation.Horizontal)
    tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    tags.set(Tag.SamplesPerPixel, 1)
    tags.set(Tag.BitsPerSample, 16)
    tags.set(Tag.CFARepeatPatternDim, [2, 2])
    tags.set(Tag.CFAPattern, [_CHANNEL[letter] for letter in pattern])
    tags.set(Tag.BlackLevelRepeatDim, [2, 2])
    tags.set(Tag.BlackLevel, blacks)
    tags.set(Tag.WhiteLevel, int(white_level))
    if colour_matrix is None:
        matrix = np.asarray(SONY_A7S_COLOR_MATRIX, dtype=np.float64) / 10000.0
    else:
        matrix = np.asarray(colour_matrix, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-9:
            raise ValueError(f"{path}: colour_matrix must be an invertible, finite 3 x 3 matrix")
    tags.set(Tag.ColorMatrix1, [[int(round(v * 10000)), 10000] for v in matrix.ravel()])
    tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    tags.set(Tag.Make, "deployq")
    tags.set(Tag.Model, "synthetic")
    tags.set(Tag.UniqueCameraModel, "deployq synthetic")
    tags.set(Tag.DNGVersion, DNGVersion.V1_4)
    if exposure_time is not None:
        if not exposure_time > 0:
            raise ValueError(f"{path}: exposure_time must be positive seconds, got {exposure_time}")
        tags.set(Tag.ExposureTime, [_rational(exposure_time)])
    if white_balance is not None:
        gains = [float(g) for g in white_balance]
        if len(gains) != 3 or not all(np.isfinite(g) and g > 0 for g in gains):
            raise ValueError(f"{path}: white_balance must be 3 positive gains, got {white_balance}")
        tags.set(Tag.AsShotNeutral, [_rational(gains[1] / g) for g in gains])
    converter = RAW2DNG()
    converter.options(tags, path="", compress=False)
    data = bytes(converter.convert(np.ascontiguousarray(raw, dtype="<u2")))

    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(data)
    return path
