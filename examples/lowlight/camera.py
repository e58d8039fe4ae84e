"""Random cameras for synthetic raw data: sensor colour, white balance, noise, levels, CFA, exposure.

A :class:`Camera` is one draw of everything that differs between real cameras and shots:

- the sensor's colour response: a random convex mix of real sensors' XYZ -> camera matrices
  (Brooks et al., CVPR 2019), or, for the ``test`` split, a sensor no other split uses;
- as-shot white balance gains (written to DNGs as AsShotNeutral, applied by the raw loader);
- shot and read noise (variances in units of the normalized signal, Brooks et al.'s relation
  between the two), the ``test`` split in a band of shot noise the other splits never draw;
- black and white levels of a 12- or 14-bit sensor, the 2x2 CFA pattern, the exposure ratio.

:func:`capture` then takes a linear camera-RGB scene to a short and a long raw exposure (Chen et
al., CVPR 2018, "Learning to See in the Dark"). Every random choice comes from an explicit
``np.random.Generator``; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deployq.calib.dng import SONY_A7S_COLOR_MATRIX
from deployq.calib.raw import BAYER_PATTERNS

from .isp import apply_ccm, check_rgb, inverse_smoothstep, mosaic, safe_invert_gains, srgb_to_linear

__all__ = [
    "BLACK_LEVEL",
    "BROOKS_SHOT_RANGE",
    "CAMERA_SPLITS",
    "HELD_OUT_XYZ_TO_CAMERA",
    "SID_LONG_EXPOSURE",
    "SID_SHOT_RANGE",
    "TEST_SHOT_BAND",
    "TRAIN_SHOT_RANGE",
    "WHITE_LEVEL",
    "XYZ_TO_CAMERA",
    "Camera",
    "add_noise",
    "capture",
    "draw_camera",
    "normalize_raw",
    "random_ccm",
    "random_gains",
    "rgb_to_camera",
    "sample_noise_levels",
    "sid_pair",
    "to_raw",
    "unprocess",
]

BLACK_LEVEL = 512
WHITE_LEVEL = 16383

# XYZ (D65) -> camera matrices (x 10000), the ColorMatrix of Adobe DNG Converter as tabulated in
# LibRaw's adobe_coeff. The first is the SID camera (Sony a7S II shares the a7S matrix).
XYZ_TO_CAMERA = {
    "Sony ILCE-7S": SONY_A7S_COLOR_MATRIX,
    "Sony ILCE-7R": ((4913, -541, -202), (-6130, 13513, 2906), (-1564, 2151, 7183)),
    "Sony DSC-RX100M4": ((6596, -2079, -562), (-4782, 13016, 1933), (-970, 1581, 5181)),
    "Canon EOS 5D Mark II": ((4716, 603, -830), (-7798, 15474, 2480), (-1496, 1937, 6651)),
    "Sony ILCE-7M3": ((7374, -2389, -551), (-5435, 13162, 2519), (-1006, 1795, 6552)),
    "Sony ILCE-9": ((6389, -1703, -378), (-4562, 12265, 2587), (-670, 1489, 6550)),
    "Sony ILCE-6400": ((6446, -1358, -815), (-4126, 12026, 2352), (-543, 1146, 7398)),
    "Sony ILCE-7RM5": ((8200, -2976, -719), (-4296, 12053, 2532), (-429, 1282, 5774)),
    "Nikon D6": ((9028, -3423, -1035), (-6321, 14265, 2217), (-1013, 1683, 6928)),
}
# The test split's sensor, never mixed into the others: the SID paper's second camera.
HELD_OUT_XYZ_TO_CAMERA = {
    "Fujifilm X-T2": ((11434, -4948, -1210), (-3746, 12042, 1903), (-666, 1479, 5235)),
}
_TRAIN_MATRICES = np.array(list(XYZ_TO_CAMERA.values()), dtype=np.float64) / 10000.0
_TEST_MATRIX = np.array(next(iter(HELD_OUT_XYZ_TO_CAMERA.values())), dtype=np.float64) / 10000.0

# Linear sRGB (D65) -> CIE XYZ, IEC 61966-2-1.
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)

# Brooks et al. sample shot noise log-uniformly over [0.0001, 0.012]; amplified by 300 the top
# of that range buries the signal, so SID-style pairs use lower levels. The varying camera draws
# shot noise over TRAIN_SHOT_RANGE except TEST_SHOT_BAND, which only the test split uses.
BROOKS_SHOT_RANGE = (0.0001, 0.012)
SID_SHOT_RANGE = (0.0001, 0.001)
TRAIN_SHOT_RANGE = (0.00005, 0.0012)
TEST_SHOT_BAND = (0.0002, 0.00035)
SID_LONG_EXPOSURE = 10.0

CAMERA_SPLITS = ("train", "val", "test")
_LEVELS = {12: (64, 128, 256), 14: (512, 1024, 2048)}  # black levels a sensor of each depth uses
_RATIO_RANGE = (100.0, 300.0)


def rgb_to_camera(xyz_to_cam: np.ndarray) -> np.ndarray:
    """``xyz2cam @ srgb2xyz`` with every row scaled to sum 1, so that white stays white and the
    colour of white is left to the white balance gains (Brooks et al.)."""
    rgb_to_cam = np.asarray(xyz_to_cam, dtype=np.float64) @ _SRGB_TO_XYZ
    return (rgb_to_cam / rgb_to_cam.sum(axis=1, keepdims=True)).astype(np.float32)


def random_ccm(rng: np.random.Generator) -> np.ndarray:
    """A random sRGB -> camera matrix, as Brooks et al. sample one: :func:`rgb_to_camera` of
    ``sum_i w_i M_i`` with ``w ~ U(0, 1)`` normalized to sum 1 over :data:`XYZ_TO_CAMERA`."""
    weights = rng.uniform(1e-8, 1.0, size=len(_TRAIN_MATRICES))
    return rgb_to_camera(np.tensordot(weights / weights.sum(), _TRAIN_MATRICES, axes=1))


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


def to_raw(signal: np.ndarray, black: int = BLACK_LEVEL, white: int = WHITE_LEVEL) -> np.ndarray:
    """Normalized signal -> raw counts: ``clip(rint(black + x * (white - black)), 0, white)``."""
    raw = np.rint(black + signal * np.float32(white - black))
    return np.clip(raw, 0, white).astype(np.uint16)


def normalize_raw(raw: np.ndarray, black: int = BLACK_LEVEL, white: int = WHITE_LEVEL) -> np.ndarray:
    """Raw counts -> ``clip((raw - black) / (white - black), 0, 1)``, what :func:`read_raw` does."""
    signal = (raw.astype(np.float32) - black) / np.float32(white - black)
    return np.clip(signal, 0.0, 1.0)


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"the exposure ratio must be a number >= 1, got {ratio}")
    return ratio


@dataclass(frozen=True, eq=False)
class Camera:
    """One random camera and shot. ``rgb_to_cam`` maps linear sRGB to the sensor's RGB (rows sum
    to 1); the as-shot white balance multiplies R by ``red_gain`` and B by ``blue_gain``."""

    rgb_to_cam: np.ndarray = field(repr=False)
    red_gain: float
    blue_gain: float
    shot: float
    read: float
    black_level: int
    white_level: int
    pattern: str
    ratio: float

    @property
    def meta(self) -> dict:
        """What :func:`~.isp.process` needs: ``ccm`` (camera -> sRGB) and the gains."""
        return {
            "ccm": self.colour_matrix,
            "rgb_to_cam": self.rgb_to_cam,
            "rgb_gain": 1.0,
            "red_gain": self.red_gain,
            "blue_gain": self.blue_gain,
        }

    @property
    def colour_matrix(self) -> np.ndarray:
        """Camera RGB -> linear sRGB (the inverse of ``rgb_to_cam``): what a raw reader takes from
        the file (LibRaw's ``rgb_cam``) to undo this sensor's colours."""
        return np.linalg.inv(self.rgb_to_cam).astype(np.float32)

    @property
    def xyz_to_cam(self) -> np.ndarray:
        """An XYZ (D65) -> camera matrix of this sensor, as a DNG's ColorMatrix1 holds one: from it
        LibRaw computes :attr:`colour_matrix` again (rows of ``xyz_to_cam @ srgb_to_xyz`` sum to 1)."""
        return self.rgb_to_cam.astype(np.float64) @ np.linalg.inv(_SRGB_TO_XYZ)

    @property
    def white_balance(self) -> tuple[float, float, float]:
        """As-shot multipliers (R, G, B), green 1: what rawpy reports as ``camera_whitebalance``."""
        return (self.red_gain, 1.0, self.blue_gain)

    def to_camera(self, linear_srgb: np.ndarray) -> np.ndarray:
        """Linear sRGB -> linear sensor RGB in [0, 1]: colour matrix, then the inverse gains."""
        camera = safe_invert_gains(apply_ccm(linear_srgb, self.rgb_to_cam), self.meta)
        return np.clip(camera, 0.0, 1.0)


def _draw_shot(rng: np.random.Generator, split: str) -> float:
    """Shot noise, log-uniform: the test band for ``test``, the rest of the range otherwise."""
    if split == "test":
        return float(np.exp(rng.uniform(*np.log(TEST_SHOT_BAND))))
    low, high = np.log(TRAIN_SHOT_RANGE)
    band_low, band_high = np.log(TEST_SHOT_BAND)
    value = rng.uniform(low, high - (band_high - band_low))  # the range with the band cut out
    return float(np.exp(value if value < band_low else value + (band_high - band_low)))


def draw_camera(rng: np.random.Generator, split: str = "train", ratio: float | None = None) -> Camera:
    """A random :class:`Camera` of ``split`` (``train`` and ``val`` alike, ``test`` held out).

    - sensor: ``train``/``val`` a random mix of :data:`XYZ_TO_CAMERA` (:func:`random_ccm`),
      ``test`` the held-out :data:`HELD_OUT_XYZ_TO_CAMERA`;
    - white balance: ``red_gain ~ U(1.6, 2.6)``, ``blue_gain ~ U(1.3, 2.1)``;
    - noise: ``log(shot)`` uniform over :data:`TRAIN_SHOT_RANGE` without
      :data:`TEST_SHOT_BAND` (``test``: over the band), read noise from it as Brooks et al.;
    - a 12- or 14-bit sensor with one of its usual black levels; any of the four CFA patterns;
    - ``ratio`` (when not given) log-uniform over [100, 300].
    """
    if split not in CAMERA_SPLITS:
        raise ValueError(f"split must be one of {CAMERA_SPLITS}, got {split!r}")
    rgb_to_cam = rgb_to_camera(_TEST_MATRIX) if split == "test" else random_ccm(rng)
    red, blue = float(rng.uniform(1.6, 2.6)), float(rng.uniform(1.3, 2.1))
    shot = _draw_shot(rng, split)
    read = float(np.exp(2.18 * np.log(shot) + 1.20 + rng.normal(0.0, 0.26)))
    bits = int(rng.choice(sorted(_LEVELS)))
    black = int(rng.choice(_LEVELS[bits]))
    pattern = BAYER_PATTERNS[int(rng.integers(len(BAYER_PATTERNS)))]
    if ratio is None:
        ratio = float(np.exp(rng.uniform(*np.log(_RATIO_RANGE))))
    return Camera(rgb_to_cam, red, blue, shot, read, black, 2**bits - 1, pattern, _check_ratio(ratio))


def capture(camera_rgb: np.ndarray, camera: Camera, rng: np.random.Generator) -> dict:
    """Expose a linear sensor-RGB scene (``H x W x 3``, even sizes) through ``camera``'s CFA.

    ``long = to_raw(x + n)`` and ``short = to_raw(x / ratio + n')`` with ``x`` the mosaic in
    ``camera.pattern``, ``n ~ N(0, shot x + read)`` (the noise of each exposure's own level) and
    the camera's black and white levels. Returns ``short`` and ``long`` (uint16 mosaics).
    """
    bayer = mosaic(camera_rgb, camera.pattern)
    levels = (camera.black_level, camera.white_level)
    long = to_raw(add_noise(bayer, camera.shot, camera.read, rng), *levels)
    short = to_raw(add_noise(bayer / np.float32(camera.ratio), camera.shot, camera.read, rng), *levels)
    return {"short": short, "long": long}


# ---------------------------------------------------------------------------------------------
# The fixed Sony-like camera of the first synthetic data (kept for the tests that pin it)
# ---------------------------------------------------------------------------------------------


def _linear_to_camera(linear_srgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Linear sRGB -> linear camera RGB in [0, 1]: inverse CCM, then inverse gains (Brooks)."""
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
    the inverse gains highlight-preserving (:func:`~.isp.safe_invert_gains`). Odd sizes are
    cropped to even. ``meta`` holds ``ccm`` (camera -> sRGB, what :func:`~.isp.process`
    applies), ``rgb_to_cam`` (its inverse), ``rgb_gain``, ``red_gain`` and ``blue_gain``.
    """
    linear = srgb_to_linear(inverse_smoothstep(check_rgb(rgb)))
    camera, meta = _linear_to_camera(linear, rng)
    return mosaic(camera), meta


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
    - ``mono`` = mean of the noise-free linear camera R, G, B, float32 H x W in [0, 1]

    plus ``ratio``, ``shot_noise``, ``read_noise`` and the camera ``meta`` of :func:`unprocess`.
    """
    ratio = _check_ratio(ratio)
    target = check_rgb(rgb)
    linear = srgb_to_linear(inverse_smoothstep(target))
    camera, meta = _linear_to_camera(linear, rng)
    bayer = mosaic(camera)
    shot, read = sample_noise_levels(rng, shot_range)
    return {
        "long": to_raw(add_noise(bayer, shot, read, rng)),
        "short": to_raw(add_noise(bayer / np.float32(ratio), shot, read, rng)),
        "target": np.ascontiguousarray(target),
        "mono": camera.mean(axis=-1).astype(np.float32),
        "ratio": ratio,
        "shot_noise": shot,
        "read_noise": read,
        "meta": meta,
    }
