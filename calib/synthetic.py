"""Realistic raw Bayer data and SID-style low-light pairs made from photographs in scikit-image.

The camera model is the "unprocessing" pipeline of Brooks et al., CVPR 2019, "Unprocessing
Images for Learned Raw Denoising": an sRGB image is taken back through

    inverse tone map -> inverse sRGB gamma -> inverse colour correction -> inverse white balance
    and digital gain -> RGGB mosaic -> heteroscedastic shot/read noise

and :func:`process` runs the same steps forwards. Low-light pairs follow Chen et al., CVPR 2018,
"Learning to See in the Dark" (SID): the short exposure gets ``1/ratio`` of the light of the long
one (ratio 100, 250 or 300) on a Sony-like 14-bit sensor (black level 512, white level 16383).
DNG files are written with pidng and read back bit-exactly by rawpy. Everything is numpy float32
and every random choice comes from an explicit ``np.random.Generator``; nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import skimage.data
import skimage.io
import skimage.util
import torch
from pidng.core import RAW2DNG, DNGTags, Tag
from pidng.defs import CalibrationIlluminant, DNGVersion, Orientation, PhotometricInterpretation
from scipy.ndimage import convolve

from deployq.files import atomic_path

from .raw import BAYER_PATTERNS, pack_bayer, unpack_bayer

__all__ = [
    "BLACK_LEVEL",
    "BROOKS_SHOT_RANGE",
    "SID_SHOT_RANGE",
    "VAL_IMAGES",
    "WHITE_LEVEL",
    "XYZ_TO_CAMERA",
    "SyntheticLowLight",
    "add_noise",
    "apply_ccm",
    "demosaic",
    "inverse_smoothstep",
    "linear_to_srgb",
    "mosaic",
    "process",
    "random_ccm",
    "random_gains",
    "safe_invert_gains",
    "sample_images",
    "sample_noise_levels",
    "sid_pair",
    "smoothstep",
    "srgb_to_linear",
    "unprocess",
    "write_dng",
    "write_sid_folder",
]

BLACK_LEVEL = 512
WHITE_LEVEL = 16383

# XYZ (D65) -> camera matrices, the ColorMatrix of Adobe DNG Converter as tabulated in LibRaw's
# adobe_coeff (values / 10000). The first is the SID camera (Sony a7S II shares the a7S matrix).
XYZ_TO_CAMERA = {
    "Sony ILCE-7S": ((5838, -1430, -246), (-3497, 11477, 2297), (-748, 1885, 5778)),
    "Sony ILCE-7R": ((4913, -541, -202), (-6130, 13513, 2906), (-1564, 2151, 7183)),
    "Sony DSC-RX100M4": ((6596, -2079, -562), (-4782, 13016, 1933), (-970, 1581, 5181)),
    "Canon EOS 5D Mark II": ((4716, 603, -830), (-7798, 15474, 2480), (-1496, 1937, 6651)),
}
_XYZ_TO_CAMERA = np.array(list(XYZ_TO_CAMERA.values()), dtype=np.float64) / 10000.0

# Linear sRGB (D65) -> CIE XYZ, IEC 61966-2-1.
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)

# Brooks et al. sample shot noise log-uniformly over [0.0001, 0.012]. SID pairs use the low
# decade of that range: amplified by 300, the top of it would bury the signal (noise std ~0.85
# at a signal of 0.2), while real SID inputs are noisy but still carry the scene.
BROOKS_SHOT_RANGE = (0.0001, 0.012)
SID_SHOT_RANGE = (0.0001, 0.001)
SID_LONG_EXPOSURE = 10.0

# Held out from SyntheticLowLight(split="train"): two natural photographs.
VAL_IMAGES = ("chelsea", "coffee")

_MIN_DNG_SIDE = 22


# ---------------------------------------------------------------------------------------------
# Tone, gamma, colour and white balance (each with its inverse)
# ---------------------------------------------------------------------------------------------


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Global tone map of Brooks et al.: ``y = 3x^2 - 2x^3`` on [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return (3.0 * x**2 - 2.0 * x**3).astype(np.float32)


def inverse_smoothstep(y: np.ndarray) -> np.ndarray:
    """Inverse of :func:`smoothstep`: ``x = 1/2 - sin(asin(1 - 2y) / 3)``."""
    y = np.clip(y, 0.0, 1.0)
    return (0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)).astype(np.float32)


def srgb_to_linear(y: np.ndarray) -> np.ndarray:
    """Exact sRGB decoding (IEC 61966-2-1), not the 2.2 power of Brooks et al.:

    ``x = y / 12.92`` for ``y <= 0.04045``, else ``((y + 0.055) / 1.055) ** 2.4``.
    """
    y = np.clip(y, 0.0, 1.0)
    return np.where(y <= 0.04045, y / 12.92, ((y + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Exact sRGB encoding (IEC 61966-2-1):

    ``y = 12.92 x`` for ``x <= 0.0031308``, else ``1.055 x^(1/2.4) - 0.055``.
    """
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1.0 / 2.4) - 0.055).astype(np.float32)


def random_ccm(rng: np.random.Generator) -> np.ndarray:
    """A random sRGB -> camera matrix, as Brooks et al. sample one.

    ``xyz2cam = sum_i w_i M_i`` with ``w ~ U(0, 1)`` normalized to sum 1 over the fixed camera
    matrices ``M_i`` of :data:`XYZ_TO_CAMERA`; ``rgb2cam = xyz2cam @ srgb2xyz`` with every row
    scaled to sum 1, so that white stays white and white balance is left to the gains.
    """
    weights = rng.uniform(1e-8, 1.0, size=len(_XYZ_TO_CAMERA))
    xyz_to_cam = np.tensordot(weights / weights.sum(), _XYZ_TO_CAMERA, axes=1)
    rgb_to_cam = xyz_to_cam @ _SRGB_TO_XYZ
    return (rgb_to_cam / rgb_to_cam.sum(axis=1, keepdims=True)).astype(np.float32)


def apply_ccm(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """Per-pixel colour matrix: ``out[..., i] = sum_j ccm[i, j] * image[..., j]``."""
    return (image @ np.asarray(ccm, dtype=np.float32).T).astype(np.float32, copy=False)


def random_gains(rng: np.random.Generator) -> dict[str, float]:
    """Random white balance and digital gain, as in Brooks et al.

    ``rgb_gain = 1 / N(0.8, 0.1)`` (the normal draw clipped to [0.5, 1.1]),
    ``red_gain ~ U(1.9, 2.4)``, ``blue_gain ~ U(1.5, 1.9)``.
    """
    return {
        "rgb_gain": float(1.0 / np.clip(rng.normal(0.8, 0.1), 0.5, 1.1)),
        "red_gain": float(rng.uniform(1.9, 2.4)),
        "blue_gain": float(rng.uniform(1.5, 1.9)),
    }


def _channel_gains(meta: dict) -> np.ndarray:
    """Forward gains ``rgb_gain * (red_gain, 1, blue_gain)``."""
    return np.float32(meta["rgb_gain"]) * np.array(
        [meta["red_gain"], 1.0, meta["blue_gain"]], dtype=np.float32
    )


def safe_invert_gains(image: np.ndarray, meta: dict) -> np.ndarray:
    """Divide out white balance and digital gain, keeping highlights (Brooks et al.).

    ``g = 1 / gains``; with ``m = (max(gray - 0.9, 0) / 0.1)^2`` and ``gray`` the pixel mean,
    ``out = image * max(m + (1 - m) g, g)``: bright pixels are not pushed below saturation, so
    they re-clip to white after the forward gains instead of turning magenta.
    """
    inverse = 1.0 / _channel_gains(meta)
    gray = image.mean(axis=-1, keepdims=True)
    mask = (np.maximum(gray - 0.9, 0.0) / 0.1) ** 2
    return (image * np.maximum(mask + (1.0 - mask) * inverse, inverse)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Mosaic and demosaic
# ---------------------------------------------------------------------------------------------

_CHANNEL = {"R": 0, "G": 1, "B": 2}


def _check_pattern(pattern: str) -> str:
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {BAYER_PATTERNS}")
    return pattern


def mosaic(image: np.ndarray, pattern: str = "RGGB") -> np.ndarray:
    """Sample an ``H x W x 3`` image through a Bayer colour filter array.

    ``out[y, x] = image[y, x, c(y % 2, x % 2)]`` where ``c`` is the colour of ``pattern``
    (row-major 2x2, e.g. ``"RGGB"``). H and W must be even.
    """
    _check_pattern(pattern)
    height, width, channels = image.shape
    if channels != 3 or height % 2 or width % 2:
        raise ValueError(f"mosaic needs an even-sized H x W x 3 image, got {image.shape}")
    out = np.empty((height, width), dtype=np.float32)
    for site, letter in enumerate(pattern):
        row, col = divmod(site, 2)
        out[row::2, col::2] = image[row::2, col::2, _CHANNEL[letter]]
    return out


def _kernel(rows: tuple[tuple[float, ...], ...]) -> np.ndarray:
    return np.array(rows, dtype=np.float32) / 8.0


# Malvar, He & Cutler, ICASSP 2004, "High-quality linear interpolation for demosaicing of
# Bayer-patterned color images": bilinear interpolation plus a Laplacian correction from the
# channel that was sampled at the pixel (gains alpha = 1/2, beta = 5/8, gamma = 3/4).
_GREEN_AT_RED_OR_BLUE = _kernel(
    ((0, 0, -1, 0, 0), (0, 0, 2, 0, 0), (-1, 2, 4, 2, -1), (0, 0, 2, 0, 0), (0, 0, -1, 0, 0))
)
_AT_GREEN_FROM_ROW = _kernel(
    ((0, 0, 0.5, 0, 0), (0, -1, 0, -1, 0), (-1, 4, 5, 4, -1), (0, -1, 0, -1, 0), (0, 0, 0.5, 0, 0))
)
_AT_GREEN_FROM_COLUMN = _AT_GREEN_FROM_ROW.T.copy()
_RED_AT_BLUE = _kernel(
    (
        (0, 0, -1.5, 0, 0),
        (0, 2, 0, 2, 0),
        (-1.5, 0, 6, 0, -1.5),
        (0, 2, 0, 2, 0),
        (0, 0, -1.5, 0, 0),
    )
)


def demosaic(bayer: np.ndarray) -> np.ndarray:
    """Demosaic an RGGB mosaic ``H x W`` -> ``H x W x 3`` with the Malvar-He-Cutler filters.

    Linear 5x5 filters (Malvar et al., ICASSP 2004): each missing value is the bilinear estimate
    corrected by the Laplacian of the colour measured at that pixel, about 5 dB better than plain
    bilinear. Borders are mirrored, which keeps the CFA phase.
    """
    bayer = np.asarray(bayer, dtype=np.float32)
    height, width = bayer.shape
    if height % 2 or width % 2:
        raise ValueError(f"a Bayer mosaic needs even height and width, got {height}x{width}")
    green = convolve(bayer, _GREEN_AT_RED_OR_BLUE, mode="mirror")
    from_row = convolve(bayer, _AT_GREEN_FROM_ROW, mode="mirror")
    from_column = convolve(bayer, _AT_GREEN_FROM_COLUMN, mode="mirror")
    diagonal = convolve(bayer, _RED_AT_BLUE, mode="mirror")
    out = np.empty((height, width, 3), dtype=np.float32)
    red, grn, blue = out[..., 0], out[..., 1], out[..., 2]
    # R sites (even, even): R measured, G and B interpolated.
    red[0::2, 0::2] = bayer[0::2, 0::2]
    grn[0::2, 0::2] = green[0::2, 0::2]
    blue[0::2, 0::2] = diagonal[0::2, 0::2]
    # G sites in R rows (even, odd): R left/right, B above/below.
    red[0::2, 1::2] = from_row[0::2, 1::2]
    grn[0::2, 1::2] = bayer[0::2, 1::2]
    blue[0::2, 1::2] = from_column[0::2, 1::2]
    # G sites in B rows (odd, even): B left/right, R above/below.
    red[1::2, 0::2] = from_column[1::2, 0::2]
    grn[1::2, 0::2] = bayer[1::2, 0::2]
    blue[1::2, 0::2] = from_row[1::2, 0::2]
    # B sites (odd, odd).
    red[1::2, 1::2] = diagonal[1::2, 1::2]
    grn[1::2, 1::2] = green[1::2, 1::2]
    blue[1::2, 1::2] = bayer[1::2, 1::2]
    return out


# ---------------------------------------------------------------------------------------------
# Unprocess / process
# ---------------------------------------------------------------------------------------------


def _even_crop(image: np.ndarray) -> np.ndarray:
    return image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ValueError(f"expected an H x W x 3 sRGB image in [0, 1], got shape {rgb.shape}")
    return _even_crop(rgb)


def _linear_to_camera(linear_srgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Linear sRGB -> linear camera RGB in [0, 1]: inverse CCM, then inverse gains."""
    rgb_to_cam = random_ccm(rng)
    meta = {"ccm": np.linalg.inv(rgb_to_cam).astype(np.float32), "rgb_to_cam": rgb_to_cam}
    meta.update(random_gains(rng))
    camera = safe_invert_gains(apply_ccm(linear_srgb, rgb_to_cam), meta)
    return np.clip(camera, 0.0, 1.0), meta


def unprocess(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """sRGB ``H x W x 3`` in [0, 1] -> noise-free linear RGGB mosaic and its camera metadata.

    Brooks et al., CVPR 2019:
    ``clip(mosaic(invgains(rgb2cam @ srgb_to_linear(inverse_smoothstep(rgb)))), 0, 1)``
    with a random colour matrix (:func:`random_ccm`) and random gains (:func:`random_gains`),
    the inverse gains highlight-preserving (:func:`safe_invert_gains`). Odd sizes are cropped
    to even. ``meta`` holds ``ccm`` (camera -> sRGB, what :func:`process` applies),
    ``rgb_to_cam`` (its inverse), ``rgb_gain``, ``red_gain`` and ``blue_gain``.
    """
    linear = srgb_to_linear(inverse_smoothstep(_check_rgb(rgb)))
    camera, meta = _linear_to_camera(linear, rng)
    return mosaic(camera), meta


def process(raw: np.ndarray, meta: dict) -> np.ndarray:
    """Camera pipeline, the forward of :func:`unprocess`: linear raw -> sRGB ``H x W x 3``.

    ``smoothstep(linear_to_srgb(clip(ccm @ clip(demosaic(clip(gains * raw))))))``: white balance
    and digital gain on the mosaic, as a camera does before demosaicing. An ``H x W`` RGGB mosaic
    is demosaiced at full resolution (:func:`demosaic`); a packed ``4 x h x w`` input uses its
    channels directly (R, mean of the greens, B) and gives an ``h x w`` image.
    """
    raw = np.asarray(raw, dtype=np.float32)
    red, green, blue = _channel_gains(meta)
    site_gains = np.array([red, green, green, blue], dtype=np.float32)[:, None, None]
    if raw.ndim == 2:
        camera = demosaic(unpack_bayer(np.clip(pack_bayer(raw) * site_gains, 0.0, 1.0)))
    elif raw.ndim == 3 and raw.shape[0] == 4:
        packed = np.clip(raw * site_gains, 0.0, 1.0)
        camera = np.stack([packed[0], 0.5 * (packed[1] + packed[2]), packed[3]], axis=-1)
    else:
        raise ValueError(f"expected an H x W mosaic or a 4 x h x w packed raw, got {raw.shape}")
    linear = np.clip(apply_ccm(np.clip(camera, 0.0, 1.0), meta["ccm"]), 0.0, 1.0)
    return smoothstep(linear_to_srgb(linear))


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def sample_noise_levels(
    rng: np.random.Generator, shot_range: tuple[float, float] = BROOKS_SHOT_RANGE
) -> tuple[float, float]:
    """Random shot and read noise levels, sampled as Brooks et al. do.

    ``log(shot) ~ U(log lo, log hi)`` over ``shot_range`` (default [0.0001, 0.012]) and
    ``log(read) ~ N(2.18 log(shot) + 1.20, 0.26)``. Both are variances in units of the
    normalized signal (see :func:`add_noise`).
    """
    low, high = shot_range
    log_shot = rng.uniform(np.log(low), np.log(high))
    log_read = 2.18 * log_shot + 1.20 + rng.normal(0.0, 0.26)
    return float(np.exp(log_shot)), float(np.exp(log_read))


def add_noise(
    linear: np.ndarray, shot: float, read: float, rng: np.random.Generator
) -> np.ndarray:
    """Heteroscedastic Gaussian sensor noise (Brooks et al.): ``y ~ N(x, shot * x + read)``.

    ``x`` is the normalized linear signal (negative values count as 0 in the variance). The
    result is not clipped: a real sensor reads values below the black level too.
    """
    linear = np.asarray(linear, dtype=np.float32)
    std = np.sqrt(np.float32(shot) * np.maximum(linear, 0.0) + np.float32(read))
    return linear + std * rng.standard_normal(linear.shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# SID-style low-light pairs
# ---------------------------------------------------------------------------------------------


def _to_raw(signal: np.ndarray) -> np.ndarray:
    """Normalized signal -> 14-bit raw: ``clip(rint(512 + x * (16383 - 512)), 0, 16383)``."""
    raw = np.rint(BLACK_LEVEL + signal * np.float32(WHITE_LEVEL - BLACK_LEVEL))
    return np.clip(raw, 0, WHITE_LEVEL).astype(np.uint16)


def _normalize_raw(raw: np.ndarray) -> np.ndarray:
    """14-bit raw -> ``clip((raw - 512) / (16383 - 512), 0, 1)``, the same as :func:`read_raw`."""
    signal = (raw.astype(np.float32) - BLACK_LEVEL) / np.float32(WHITE_LEVEL - BLACK_LEVEL)
    return np.clip(signal, 0.0, 1.0)


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"the exposure ratio must be a number >= 1, got {ratio}")
    return ratio


def _short_exposure(
    bayer: np.ndarray, ratio: float, shot: float, read: float, rng: np.random.Generator
) -> np.ndarray:
    """Raw of the same scene with ``1/ratio`` of the light: ``to_raw(add_noise(x / ratio))``."""
    return _to_raw(add_noise(bayer / np.float32(ratio), shot, read, rng))


def sid_pair(
    rgb: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    *,
    shot_range: tuple[float, float] = SID_SHOT_RANGE,
) -> dict:
    """A SID-style pair (Chen et al., CVPR 2018) from one sRGB image, Sony-like 14-bit raw.

    With ``x = unprocess(rgb)`` (linear RGGB in [0, 1]) and one sensor's noise levels
    ``(shot, read) = sample_noise_levels(rng, shot_range)``:

    - ``long``  = ``clip(rint(512 + 15871 * (x + n)), 0, 16383)``, ``n ~ N(0, shot x + read)``
    - ``short`` = the same with ``x / ratio``: the noise is that of the low signal level
    - ``target`` = ``rgb`` cropped to even size (float32 H x W x 3)
    - ``mono`` = mean of the noise-free linear camera R, G, B (what a sensor without colour
      filters would see), float32 H x W in [0, 1]

    plus ``ratio``, ``shot_noise``, ``read_noise`` and the camera ``meta`` of :func:`unprocess`.
    """
    ratio = _check_ratio(ratio)
    target = _check_rgb(rgb)
    linear = srgb_to_linear(inverse_smoothstep(target))
    camera, meta = _linear_to_camera(linear, rng)
    bayer = mosaic(camera)
    shot, read = sample_noise_levels(rng, shot_range)
    return {
        "long": _to_raw(add_noise(bayer, shot, read, rng)),
        "short": _short_exposure(bayer, ratio, shot, read, rng),
        "target": np.ascontiguousarray(target),
        "mono": camera.mean(axis=-1).astype(np.float32),
        "ratio": ratio,
        "shot_noise": shot,
        "read_noise": read,
        "meta": meta,
    }


# ---------------------------------------------------------------------------------------------
# DNG writing
# ---------------------------------------------------------------------------------------------


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
    black_level: int | Sequence[int] = BLACK_LEVEL,
    white_level: int = WHITE_LEVEL,
    exposure_time: float | None = None,
) -> Path:
    """Write a Bayer mosaic as an uncompressed 16-bit DNG with pidng, atomically.

    ``pattern`` is the CFA of the top-left 2x2 (RGGB, BGGR, GRBG or GBRG); ``black_level`` is
    one level or four, one per 2x2 site in row-major order; ``exposure_time`` (seconds) goes to
    the EXIF ExposureTime tag. rawpy reads the values back bit-exactly (``raw_image_visible``).
    The colour matrix is the Sony a7S one. LibRaw refuses images under 22 x 22 pixels, so
    those are rejected here.
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
    _check_pattern(pattern)
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
    tags.set(Tag.ColorMatrix1, [[int(v), 10000] for v in np.ravel(XYZ_TO_CAMERA["Sony ILCE-7S"])])
    tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    tags.set(Tag.Make, "deployq")
    tags.set(Tag.Model, "synthetic")
    tags.set(Tag.UniqueCameraModel, "deployq synthetic")
    tags.set(Tag.DNGVersion, DNGVersion.V1_4)
    if exposure_time is not None:
        if not exposure_time > 0:
            raise ValueError(f"{path}: exposure_time must be positive seconds, got {exposure_time}")
        tags.set(Tag.ExposureTime, [_rational(exposure_time)])
    converter = RAW2DNG()
    converter.options(tags, path="", compress=False)
    data = bytes(converter.convert(np.ascontiguousarray(raw, dtype="<u2")))

    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Photographs shipped inside scikit-image
# ---------------------------------------------------------------------------------------------

# (name, file inside skimage.data.data_dir, loader). A loader is called only when its file is
# on disk, so nothing is ever fetched over the network (pooch-backed entries are skipped).
_SKIMAGE_PHOTOS = (
    ("astronaut", "astronaut.png", lambda: skimage.data.astronaut()),
    ("chelsea", "chelsea.png", lambda: skimage.data.chelsea()),
    ("coffee", "coffee.png", lambda: skimage.data.coffee()),
    ("rocket", "rocket.jpg", lambda: skimage.data.rocket()),
    ("motorcycle_left", "motorcycle_left.png", lambda: skimage.data.stereo_motorcycle()[0]),
    ("motorcycle_right", "motorcycle_right.png", lambda: skimage.data.stereo_motorcycle()[1]),
    ("hubble_deep_field", "hubble_deep_field.jpg", lambda: skimage.data.hubble_deep_field()),
    ("retina", "retina.jpg", lambda: skimage.data.retina()),
    ("immunohistochemistry", "ihc.png", lambda: skimage.data.immunohistochemistry()),
    ("colorwheel", "color.png", lambda: skimage.data.colorwheel()),
)


@functools.lru_cache(maxsize=1)
def _load_sample_images() -> tuple[tuple[str, np.ndarray], ...]:
    data_dir = Path(skimage.data.data_dir)
    images = []
    for name, filename, load in _SKIMAGE_PHOTOS:
        if not (data_dir / filename).is_file():
            continue
        try:
            image = np.asarray(load())
        except (AttributeError, ImportError, OSError, ValueError):
            continue
        if image.ndim != 3 or image.shape[-1] != 3:
            continue
        image = skimage.util.img_as_float32(image)
        image.setflags(write=False)
        images.append((name, image))
    return tuple(images)


def sample_images() -> dict[str, np.ndarray]:
    """The RGB photographs that ship inside scikit-image, as float32 ``H x W x 3`` in [0, 1].

    Keys are names (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``motorcycle_left``,
    ``motorcycle_right``, ``hubble_deep_field``, ``retina``, ``immunohistochemistry``,
    ``colorwheel``) in that fixed order; entries missing from the installed scikit-image are
    left out, nothing is downloaded. Arrays are cached and read-only.
    """
    return dict(_load_sample_images())


@functools.lru_cache(maxsize=1)
def _linear_sample_images() -> dict[str, np.ndarray]:
    """Linear sRGB (inverse tone map and gamma done once) of every sample image, read-only."""
    linear = {}
    for name, image in _load_sample_images():
        array = srgb_to_linear(inverse_smoothstep(image))
        array.setflags(write=False)
        linear[name] = array
    return linear


def _split_names(split: str | None, size: int) -> list[str]:
    """Sample images of a split (``train``, ``val`` or None for all) at least ``size`` square."""
    names = [name for name, _ in _load_sample_images()]
    if split == "train":
        names = [name for name in names if name not in VAL_IMAGES]
    elif split == "val":
        names = [name for name in names if name in VAL_IMAGES]
    elif split is not None:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images = dict(_load_sample_images())
    names = [name for name in names if min(images[name].shape[:2]) >= size]
    if not names:
        raise ValueError(
            f"no scikit-image sample photograph of split {split!r} is at least {size}x{size}"
        )
    return names


def _check_size(size: int) -> int:
    if size < 2 or size % 2:
        raise ValueError(f"the crop size must be an even number of pixels, got {size}")
    return int(size)


def _random_crop(
    height: int, width: int, size: int, rng: np.random.Generator
) -> tuple[slice, slice]:
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return slice(top, top + size), slice(left, left + size)


def _write_png(path: Path, image: np.ndarray) -> None:
    """Save an image, atomically."""
    with atomic_path(path) as temporary:
        skimage.io.imsave(temporary, image, check_contrast=False)


def _exposure_name(seconds: float) -> str:
    return f"{seconds:g}s"


def write_sid_folder(
    out_dir: str | os.PathLike,
    n_scenes: int,
    size: int,
    ratios: Sequence[float] = (100, 250, 300),
    seed: int = 0,
    *,
    split: str | None = None,
) -> list[dict]:
    """Write a small SID-like folder of DNG pairs and ground truth, deterministic for ``seed``.

    Scene ``k`` (id ``f"{k + 1:05d}"``) is a random ``size x size`` crop of sample image
    ``k mod n`` (of ``split``, default all), exposure ratio ``ratios[k mod len(ratios)]``::

        short/{id}_00_{10/ratio}s.dng   long/{id}_00_10s.dng   gt/{id}.png (8-bit sRGB)

    with the exposure times also in the DNGs' EXIF. Returns one dict per scene with ``id``,
    ``short``, ``long``, ``gt`` (paths) and ``ratio``.
    """
    size = _check_size(size)
    if size < _MIN_DNG_SIDE:
        raise ValueError(f"DNG scenes must be at least {_MIN_DNG_SIDE} pixels, got {size}")
    if n_scenes < 0 or not ratios:
        raise ValueError("need n_scenes >= 0 and at least one ratio")
    out_dir = Path(out_dir)
    folders = {kind: out_dir / kind for kind in ("short", "long", "gt")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    names = _split_names(split, size)
    images = sample_images()
    scenes = []
    for k in range(n_scenes):
        rng = np.random.default_rng((seed, k))
        image = images[names[k % len(names)]]
        rows, cols = _random_crop(*image.shape[:2], size, rng)
        ratio = _check_ratio(ratios[k % len(ratios)])
        pair = sid_pair(image[rows, cols], ratio, rng)
        scene_id = f"{k + 1:05d}"
        short_time = SID_LONG_EXPOSURE / ratio
        short = folders["short"] / f"{scene_id}_00_{_exposure_name(short_time)}.dng"
        long = folders["long"] / f"{scene_id}_00_{_exposure_name(SID_LONG_EXPOSURE)}.dng"
        gt = folders["gt"] / f"{scene_id}.png"
        write_dng(short, pair["short"], exposure_time=short_time)
        write_dng(long, pair["long"], exposure_time=SID_LONG_EXPOSURE)
        _write_png(gt, skimage.util.img_as_ubyte(pair["target"]))
        scenes.append({"id": scene_id, "short": short, "long": long, "gt": gt, "ratio": ratio})
    return scenes


# ---------------------------------------------------------------------------------------------
# In-memory training data
# ---------------------------------------------------------------------------------------------

_SPLIT_STREAM = {"train": 0, "val": 1}


class SyntheticLowLight(torch.utils.data.Dataset):
    """SID-style low-light training pairs made on the fly from scikit-image photographs.

    Item ``i`` is a deterministic function of ``(seed, split, i)``: a random ``size x size`` crop
    of a random sample image, unprocessed with a random camera (:func:`unprocess`), exposed
    ``1/ratio`` with ``ratio`` drawn from ``ratios`` and noised as :func:`sid_pair` does.
    The ``val`` split uses only the photographs in :data:`VAL_IMAGES` and ``train`` only the
    others, so validation scenes are never seen in training. Items are dicts of float32 tensors:

    - ``input``  ``(4, size/2, size/2)``: packed short exposure,
      ``clip((raw - 512) / 15871 * ratio, 0, 1)``
    - ``mono``   ``(1, size, size)``: linear intensity without colour filters (:func:`sid_pair`)
    - ``target`` ``(3, size, size)``: the sRGB crop in [0, 1]
    - ``ratio``  ``()``: the exposure ratio

    The inverse tone map and gamma of every photograph are computed once and cached.
    """

    def __init__(
        self,
        size: int = 128,
        length: int = 1000,
        split: str = "train",
        ratios: Sequence[float] = (100, 250, 300),
        seed: int = 0,
    ) -> None:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if length < 0 or not ratios:
            raise ValueError("need length >= 0 and at least one ratio")
        self.size = _check_size(size)
        self.length = int(length)
        self.split = split
        self.ratios = tuple(_check_ratio(r) for r in ratios)
        self.seed = int(seed)
        self.names = _split_names(split, self.size)
        _linear_sample_images()  # fill the per-process cache now (DataLoader workers inherit it)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng((self.seed, _SPLIT_STREAM[self.split], int(index)))
        name = self.names[int(rng.integers(len(self.names)))]
        image, linear = sample_images()[name], _linear_sample_images()[name]
        rows, cols = _random_crop(*image.shape[:2], self.size, rng)
        camera, _ = _linear_to_camera(linear[rows, cols], rng)
        ratio = self.ratios[int(rng.integers(len(self.ratios)))]
        shot, read = sample_noise_levels(rng, SID_SHOT_RANGE)
        short = _short_exposure(mosaic(camera), ratio, shot, read, rng)
        packed = np.clip(pack_bayer(_normalize_raw(short)) * np.float32(ratio), 0.0, 1.0)
        target = np.ascontiguousarray(image[rows, cols].transpose(2, 0, 1))
        return {
            "input": torch.from_numpy(packed),
            "mono": torch.from_numpy(camera.mean(axis=-1, dtype=np.float32)[None]),
            "target": torch.from_numpy(target),
            "ratio": torch.tensor(ratio, dtype=torch.float32),
        }
