"""Raw camera files (ARW, DNG, NEF, ... anything LibRaw reads) as normalized RGGB Bayer arrays.

Reading goes through rawpy (LibRaw). What comes out of :func:`read_raw` is always the same thing,
whatever the camera: a float32 ``H x W`` mosaic of LibRaw's *visible* area with

    bayer = clip((raw - black[c]) / (white - black[c]), 0, 1)

where ``c`` is the colour of the pixel's CFA site, cropped by at most one row and one column so
that the top-left 2x2 block is R G / G B and cropped again to an even height and width. Networks
that take packed raw input (SID, Chen et al., CVPR 2018 "Learning to See in the Dark") then see
the same channel order for every camera: :func:`pack_bayer` = ``pixel_unshuffle(x, 2)``.

The file's metadata makes the data camera-agnostic too: :func:`amplify` applies the as-shot white
balance and the camera -> linear sRGB colour matrix LibRaw derives from the file (a DNG's
ColorMatrix, or LibRaw's table for a camera's own format), the two steps a camera's ISP takes, so
a network trained on some sensors sees another sensor's frames in the same colour space.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rawpy

__all__ = [
    "BAYER_PATTERNS",
    "RawImage",
    "RawReadError",
    "bayer_pattern",
    "canonical_offset",
    "exposure_from_name",
    "amplify",
    "load_packed",
    "packed_colour_matrix",
    "pack_bayer",
    "read_raw",
    "sid_ratio",
    "unpack_bayer",
]

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


class RawReadError(ValueError):
    """A raw file that cannot be used: missing, unreadable, corrupt, or not a Bayer sensor.

    The message always starts with the file's path.
    """


@dataclass(frozen=True, eq=False)
class RawImage:
    """One raw frame, black-subtracted, normalized to [0, 1] and shifted to canonical RGGB.

    ``pattern`` is the CFA layout of the top-left 2x2 of LibRaw's visible area *before* the
    shift (e.g. ``"BGGR"``); ``black_level`` is rawpy's ``black_level_per_channel`` (indexed by
    LibRaw colour index, the order of ``color_desc``); ``exposure_time`` is the EXIF exposure in
    seconds, or None when the file has none; ``white_balance`` is the camera's as-shot
    multipliers (R, G, B) with green 1 (a DNG's AsShotNeutral inverted), or None when the file
    has none; ``colour_matrix`` is LibRaw's camera RGB -> linear sRGB matrix (3 x 3, rows summing
    to 1: white-balanced neutral stays neutral), or None when the file gives none.
    """

    bayer: np.ndarray = field(repr=False)
    pattern: str
    black_level: list[int]
    white_level: int
    exposure_time: float | None
    path: Path
    white_balance: tuple[float, float, float] | None = None
    colour_matrix: np.ndarray | None = field(default=None, repr=False)


def bayer_pattern(raw_pattern: np.ndarray | None, color_desc: bytes | str) -> str:
    """Name a 2x2 Bayer CFA from LibRaw's colour indices and colour description.

    ``raw_pattern`` holds colour indices into ``color_desc`` (e.g. ``[[0, 1], [3, 2]]`` with
    ``b"RGBG"`` is ``"RGGB"``). Raises ValueError for anything that is not a Bayer mosaic: no
    pattern (Foveon, linear/demosaiced files), a repeat other than 2x2 (X-Trans is 6x6, Leaf
    16x16), colours other than R, G, B, or a 2x2 whose two greens are not on a diagonal.
    """
    if raw_pattern is None:
        raise ValueError("not a Bayer sensor: the file has no colour filter array pattern")
    pattern = np.asarray(raw_pattern)
    if pattern.shape != (2, 2):
        repeat = "x".join(str(n) for n in pattern.shape)
        raise ValueError(
            f"not a Bayer sensor: the colour filter array repeats every {repeat} pixels "
            f"(X-Trans is 6x6), a Bayer array every 2x2"
        )
    desc = color_desc.decode("ascii", "replace") if isinstance(color_desc, bytes) else color_desc
    if int(pattern.max()) >= len(desc):
        raise ValueError(
            f"colour index {int(pattern.max())} is outside colour description {desc!r}"
        )
    letters = "".join(desc[int(c)] for c in pattern.flat)
    if letters not in BAYER_PATTERNS:
        raise ValueError(
            f"not a Bayer sensor: the 2x2 colour filter pattern is {letters!r} "
            f"(colour description {desc!r}); expected one of RGGB, BGGR, GRBG, GBRG"
        )
    return letters


def canonical_offset(pattern: str) -> tuple[int, int]:
    """Row and column where R sits in a 2x2 Bayer ``pattern``: the crop that makes it RGGB."""
    index = pattern.index("R")
    return index // 2, index % 2


def _visible_pattern(raw: rawpy.RawPy) -> np.ndarray | None:
    """The CFA pattern whose top-left is the top-left of the *visible* area.

    rawpy's ``raw_pattern`` is indexed in full-sensor coordinates (margins included), so with an
    odd top or left margin it is not the pattern of ``raw_image_visible``; roll it by the margins.
    """
    try:
        pattern = raw.raw_pattern
    except NotImplementedError as error:
        message = f"not a Bayer sensor: LibRaw reports an unsupported CFA ({error})"
        raise ValueError(message) from None
    if pattern is None:
        return None
    sizes = raw.sizes
    return np.roll(pattern, (-sizes.top_margin, -sizes.left_margin), axis=(0, 1))


def _exposure_seconds(raw: rawpy.RawPy) -> float | None:
    """EXIF exposure time from LibRaw, rounded to 6 significant digits (LibRaw stores a float32)."""
    shutter = float(raw.other.shutter_speed)
    if not np.isfinite(shutter) or shutter <= 0:
        return None
    return float(f"{shutter:.6g}")


def read_raw(path: str | os.PathLike) -> RawImage:
    """Read a raw camera file with rawpy into a normalized, canonical-RGGB :class:`RawImage`.

    ``bayer = clip((raw_visible - black[raw_colors_visible]) / (white - black[...]), 0, 1)``,
    then ``bayer[r:, c:]`` where ``(r, c)`` is the red site of the visible 2x2 pattern, then
    cropped to even height and width. Raises :class:`RawReadError` naming the file when it is
    missing, corrupt or truncated (LibRaw errors, OSError) or not from a Bayer sensor.
    """
    path = Path(path)
    if not path.is_file():
        raise RawReadError(f"{path}: no such file")
    try:
        with rawpy.imread(os.fspath(path)) as raw:
            if raw.raw_type != rawpy.RawType.Flat:
                raise ValueError("not a Bayer sensor: LibRaw reports a non-mosaic (stacked) image")
            pattern = bayer_pattern(_visible_pattern(raw), raw.color_desc)
            black_level = [int(b) for b in raw.black_level_per_channel]
            white_level = int(raw.white_level)
            black = np.asarray(black_level, dtype=np.float32)[raw.raw_colors_visible]
            values = raw.raw_image_visible.astype(np.float32)
            exposure_time = _exposure_seconds(raw)
            white_balance = _as_shot_white_balance(raw)
            colour_matrix = _camera_to_srgb(raw)
    except (rawpy.LibRawError, OSError) as error:
        raise RawReadError(f"{path}: LibRaw cannot read it ({_describe(error)})") from error
    except ValueError as error:
        raise RawReadError(f"{path}: {error}") from error
    if white_level <= int(black.max()):
        raise RawReadError(
            f"{path}: white level {white_level} is not above black level {int(black.max())}"
        )
    bayer = np.clip((values - black) / (white_level - black), 0.0, 1.0)
    row, col = canonical_offset(pattern)
    height = (bayer.shape[0] - row) // 2 * 2
    width = (bayer.shape[1] - col) // 2 * 2
    if height == 0 or width == 0:
        raise RawReadError(f"{path}: visible area {bayer.shape} is too small for a 2x2 Bayer block")
    bayer = np.ascontiguousarray(bayer[row : row + height, col : col + width], dtype=np.float32)
    return RawImage(bayer, pattern, black_level, white_level, exposure_time, path, white_balance,
                    colour_matrix)


def _as_shot_white_balance(raw: rawpy.RawPy) -> tuple[float, float, float] | None:
    """rawpy's ``camera_whitebalance`` (R, G, B, G2) as (R, G, B) multipliers with G = 1."""
    gains = [float(g) for g in raw.camera_whitebalance[:3]]
    if not all(np.isfinite(g) and g > 0 for g in gains):
        return None
    return (gains[0] / gains[1], 1.0, gains[2] / gains[1])


def _camera_to_srgb(raw: rawpy.RawPy) -> np.ndarray | None:
    """LibRaw's ``rgb_cam`` (rawpy's ``color_matrix``, camera RGB -> linear sRGB) as 3 x 3
    float32, or None when it is missing, not finite, or not invertible.

    LibRaw computes it from the file's XYZ -> camera matrix ``M`` as
    ``inv(rownorm(M @ srgb_to_xyz))``: white-balanced white stays white.
    """
    matrix = np.asarray(raw.color_matrix, dtype=np.float64)
    if matrix.shape != (3, 4) or not np.all(np.isfinite(matrix)):
        return None
    matrix = matrix[:, :3]
    if abs(np.linalg.det(matrix)) < 1e-6:
        return None
    return matrix.astype(np.float32)


def _describe(error: BaseException) -> str:
    """LibRaw's message as text (rawpy passes C strings through as bytes)."""
    message = error.args[0] if error.args else error
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{type(error).__name__}: {message}"


def pack_bayer(bayer: np.ndarray) -> np.ndarray:
    """RGGB mosaic ``(..., H, W)`` -> packed ``(..., 4, H/2, W/2)``, channels R, G1, G2, B.

    ``packed[2*i + j, y, x] = bayer[2*y + i, 2*x + j]`` for ``i, j`` in {0, 1}: the same as
    ``torch.nn.functional.pixel_unshuffle(x, 2)`` on a one-channel image. Leading dims are kept.
    """
    bayer = np.asarray(bayer)
    *lead, height, width = bayer.shape
    if height % 2 or width % 2:
        raise ValueError(f"a Bayer mosaic needs even height and width, got {height}x{width}")
    blocks = bayer.reshape(*lead, height // 2, 2, width // 2, 2)
    order = (*range(len(lead)), len(lead) + 1, len(lead) + 3, len(lead), len(lead) + 2)
    return np.ascontiguousarray(blocks.transpose(order)).reshape(*lead, 4, height // 2, width // 2)


def unpack_bayer(packed: np.ndarray) -> np.ndarray:
    """Packed ``(..., 4, h, w)`` -> RGGB mosaic ``(..., 2h, 2w)``: the inverse of :func:`pack_bayer`

    (``pixel_shuffle(x, 2)``).
    """
    packed = np.asarray(packed)
    *lead, channels, height, width = packed.shape
    if channels != 4:
        raise ValueError(f"packed Bayer data needs 4 channels, got shape {packed.shape}")
    blocks = packed.reshape(*lead, 2, 2, height, width)
    n = len(lead)
    order = (*range(n), n + 2, n, n + 3, n + 1)
    return np.ascontiguousarray(blocks.transpose(order)).reshape(*lead, 2 * height, 2 * width)


_SID_NAME = re.compile(r"_(\d+(?:\.\d*)?|\.\d+)s$")


def exposure_from_name(path: str | os.PathLike) -> float | None:
    """Exposure time in seconds from a SID-style file name, or None if the name has none.

    ``00001_00_0.1s.ARW`` -> 0.1, ``10003_00_10s.ARW`` -> 10.0 (Chen et al., CVPR 2018).
    """
    match = _SID_NAME.search(Path(path).stem)
    return float(match.group(1)) if match else None


def sid_ratio(
    short_path: str | os.PathLike, long_path: str | os.PathLike, cap: float = 300.0
) -> float:
    """Amplification ratio of a SID pair: ``min(t_long / t_short, cap)`` from the file names.

    SID caps the ratio at 300 (its 1/30 s frames are named 0.033s, giving 303).
    """
    times = []
    for path in (short_path, long_path):
        exposure = exposure_from_name(path)
        if exposure is None or exposure <= 0:
            raise ValueError(
                f"{path}: the file name has no exposure time "
                f"(expected SID style such as 00001_00_0.1s.ARW)"
            )
        times.append(exposure)
    return min(times[1] / times[0], cap)


def packed_colour_matrix(colour_matrix: np.ndarray) -> np.ndarray:
    """The 4 x 4 map a 3 x 3 camera -> sRGB matrix ``C`` makes on packed RGGB ``(R, G1, G2, B)``.

    Each 2x2 block is one colour sample: red and blue mix in ``C``'s green column with the mean of
    the two greens, and each green site keeps its own green, so that the two green sites still
    differ where the scene does::

        R'  = c00 R + c01 (G1 + G2) / 2 + c02 B
        G1' = c10 R + c11 G1            + c12 B
        G2' = c10 R + c11 G2            + c12 B
        B'  = c20 R + c21 (G1 + G2) / 2 + c22 B
    """
    c = np.asarray(colour_matrix, dtype=np.float64)
    if c.shape != (3, 3) or not np.all(np.isfinite(c)):
        raise ValueError(f"a colour matrix is 3 x 3 and finite, got {c.shape}")
    return np.array(
        [
            [c[0, 0], c[0, 1] / 2, c[0, 1] / 2, c[0, 2]],
            [c[1, 0], c[1, 1], 0.0, c[1, 2]],
            [c[1, 0], 0.0, c[1, 1], c[1, 2]],
            [c[2, 0], c[2, 1] / 2, c[2, 1] / 2, c[2, 2]],
        ],
        dtype=np.float32,
    )


def amplify(
    packed: np.ndarray,
    ratio: float | None,
    white_balance: Sequence[float] | None = None,
    colour_matrix: np.ndarray | None = None,
) -> np.ndarray:
    """Packed RGGB ``(..., 4, h, w)`` in [0, 1] -> what a low-light network sees:

    ``clip(packed * ratio * gains, 0, 1)`` with ``gains = (R, G, G, B)`` of ``white_balance``
    (multipliers, green 1) per channel, then, with a ``colour_matrix`` (camera RGB -> linear
    sRGB), ``clip(P @ that, 0, 1)`` with ``P`` its :func:`packed_colour_matrix`. ``None`` leaves
    a step out (and the values unclipped when all three are out).
    """
    packed = np.asarray(packed, dtype=np.float32)
    if ratio is None and white_balance is None and colour_matrix is None:
        return packed
    scale = np.ones(4, dtype=np.float32) * np.float32(1.0 if ratio is None else ratio)
    if white_balance is not None:
        red, green, blue = (float(g) for g in white_balance)
        scale *= np.array([red, green, green, blue], dtype=np.float32)
    out = np.clip(packed * scale[:, None, None], 0.0, 1.0)
    if colour_matrix is not None:
        mixed = np.tensordot(packed_colour_matrix(colour_matrix), out, axes=([1], [-3]))
        out = np.clip(np.moveaxis(mixed, 0, -3), 0.0, 1.0).astype(np.float32)
    return out


def load_packed(
    path: str | os.PathLike, ratio: float | None = None, white_balance: bool = True,
    colour: bool = True,
) -> np.ndarray:
    """Read a raw file as packed RGGB ``(4, H/2, W/2)`` float32, amplified by ``ratio``.

    :func:`amplify` of ``pack_bayer(read_raw(path).bayer)`` with the file's as-shot white
    balance when ``white_balance`` is true and the file has one, and its camera -> sRGB colour
    matrix when ``colour`` is true and the file has one; with ``ratio=None`` and neither, the
    data is only packed (its values are already in [0, 1]).
    """
    image = read_raw(path)
    gains = image.white_balance if white_balance else None
    matrix = image.colour_matrix if colour else None
    return amplify(pack_bayer(image.bayer), ratio, gains, matrix)
