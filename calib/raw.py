"""Raw camera files (ARW, DNG, NEF, ... anything LibRaw reads) as normalized RGGB Bayer arrays.

Reading goes through rawpy (LibRaw). What comes out of :func:`read_raw` is always the same thing,
whatever the camera: a float32 ``H x W`` mosaic of LibRaw's *visible* area with

    bayer = clip((raw - black[c]) / (white - black[c]), 0, 1)

where ``c`` is the colour of the pixel's CFA site, cropped by at most one row and one column so
that the top-left 2x2 block is R G / G B and cropped again to an even height and width. Networks
that take packed raw input (SID, Chen et al., CVPR 2018 "Learning to See in the Dark") then see
the same channel order for every camera: :func:`pack_bayer` = ``pixel_unshuffle(x, 2)``.
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
    has none.
    """

    bayer: np.ndarray = field(repr=False)
    pattern: str
    black_level: list[int]
    white_level: int
    exposure_time: float | None
    path: Path
    white_balance: tuple[float, float, float] | None = None


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
    return RawImage(bayer, pattern, black_level, white_level, exposure_time, path, white_balance)


def _as_shot_white_balance(raw: rawpy.RawPy) -> tuple[float, float, float] | None:
    """rawpy's ``camera_whitebalance`` (R, G, B, G2) as (R, G, B) multipliers with G = 1."""
    gains = [float(g) for g in raw.camera_whitebalance[:3]]
    if not all(np.isfinite(g) and g > 0 for g in gains):
        return None
    return (gains[0] / gains[1], 1.0, gains[2] / gains[1])


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


def amplify(
    packed: np.ndarray, ratio: float | None, white_balance: Sequence[float] | None = None
) -> np.ndarray:
    """Packed RGGB ``(..., 4, h, w)`` in [0, 1] -> what a low-light network sees:

    ``clip(packed * ratio * gains, 0, 1)`` with ``gains = (R, G, G, B)`` of ``white_balance``
    (multipliers, green 1) per channel; ``ratio=None`` and ``white_balance=None`` leave that
    factor out (and the values unclipped when both are out).
    """
    packed = np.asarray(packed, dtype=np.float32)
    if ratio is None and white_balance is None:
        return packed
    scale = np.ones(4, dtype=np.float32) * np.float32(1.0 if ratio is None else ratio)
    if white_balance is not None:
        red, green, blue = (float(g) for g in white_balance)
        scale *= np.array([red, green, green, blue], dtype=np.float32)
    return np.clip(packed * scale[:, None, None], 0.0, 1.0)


def load_packed(
    path: str | os.PathLike, ratio: float | None = None, white_balance: bool = True
) -> np.ndarray:
    """Read a raw file as packed RGGB ``(4, H/2, W/2)`` float32, amplified by ``ratio``.

    :func:`amplify` of ``pack_bayer(read_raw(path).bayer)`` with the file's as-shot white
    balance when ``white_balance`` is true and the file has one; with ``ratio=None`` and no
    white balance the data is only packed (its values are already in [0, 1]).
    """
    image = read_raw(path)
    gains = image.white_balance if white_balance else None
    return amplify(pack_bayer(image.bayer), ratio, gains)
