"""The camera pipeline in numpy, both ways: tone curve, sRGB gamma, colour matrix, white balance,
Bayer mosaic and demosaic.

These are the deterministic pieces of the "unprocessing" of Brooks et al., CVPR 2019 ("Unprocessing
Images for Learned Raw Denoising"); :mod:`.camera` draws the random camera parameters they are
used with. Everything is float32 and pure: no randomness here.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import convolve

from deployq.calib.raw import BAYER_PATTERNS, pack_bayer, unpack_bayer

__all__ = [
    "apply_ccm",
    "channel_gains",
    "check_rgb",
    "demosaic",
    "even_crop",
    "inverse_smoothstep",
    "linear_to_srgb",
    "mosaic",
    "process",
    "safe_invert_gains",
    "smoothstep",
    "srgb_to_linear",
]

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


def apply_ccm(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """Per-pixel colour matrix: ``out[..., i] = sum_j ccm[i, j] * image[..., j]``."""
    return (image @ np.asarray(ccm, dtype=np.float32).T).astype(np.float32, copy=False)


def channel_gains(meta: dict) -> np.ndarray:
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
    inverse = 1.0 / channel_gains(meta)
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
# Forward camera pipeline
# ---------------------------------------------------------------------------------------------


def even_crop(image: np.ndarray) -> np.ndarray:
    return image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ValueError(f"expected an H x W x 3 sRGB image in [0, 1], got shape {rgb.shape}")
    return even_crop(rgb)


def process(raw: np.ndarray, meta: dict) -> np.ndarray:
    """Camera pipeline, the forward of :func:`unprocess`: linear raw -> sRGB ``H x W x 3``.

    ``smoothstep(linear_to_srgb(clip(ccm @ clip(demosaic(clip(gains * raw))))))``: white balance
    and digital gain on the mosaic, as a camera does before demosaicing. An ``H x W`` RGGB mosaic
    is demosaiced at full resolution (:func:`demosaic`); a packed ``4 x h x w`` input uses its
    channels directly (R, mean of the greens, B) and gives an ``h x w`` image.
    """
    raw = np.asarray(raw, dtype=np.float32)
    red, green, blue = channel_gains(meta)
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
