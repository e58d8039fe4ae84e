"""Low-light training and evaluation data, made offline from photographs that ship with Python
packages, and written as SID-style DNG folders.

Each item is a random crop of a photograph (with a random flip / rotation), taken back to linear
sensor RGB by a random :class:`~.camera.Camera` of its split (Brooks et al. 2019 unprocessing),
exposed as a short raw frame (Chen et al. 2018) and read the way :func:`deployq.calib.raw.load_packed`
reads a camera file: black level off, canonical RGGB, packed, times the exposure ratio and the
as-shot white balance, then the camera's colour matrix (camera RGB -> linear sRGB). The network
so sees every sensor's frames in one colour space, as a camera's ISP would hand them on.
Three splits, disjoint in photographs:

- ``train``: every photograph not named below, random training cameras;
- ``val`` (:data:`VAL_IMAGES`): other photographs, the same camera distribution (to pick checkpoints);
- ``test`` (:data:`TEST_IMAGES`): other photographs again, a sensor and a band of noise levels that
  no other split draws (to report on).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
import skimage.io
import skimage.util
import torch

from deployq.calib.dng import write_dng
from deployq.calib.raw import canonical_offset, amplify, pack_bayer
from deployq.core.files import atomic_path

from .camera import (
    SID_LONG_EXPOSURE,
    capture,
    draw_camera,
    normalize_raw,
)
from .isp import inverse_smoothstep, linear_to_srgb, smoothstep, srgb_to_linear

__all__ = [
    "SPLITS",
    "TEST_IMAGES",
    "VAL_IMAGES",
    "SyntheticLowLight",
    "sample_images",
    "write_sid_folder",
]

SPLITS = ("train", "val", "test")
VAL_IMAGES = ("rocket",)
TEST_IMAGES = ("chelsea", "coffee")
_MIN_DNG_SIDE = 22

# (name, file, loader). A loader is called only when its file is on disk, so nothing is ever
# fetched over the network (pooch-backed entries are skipped); scikit-learn's two photographs
# are used when scikit-learn is installed.
_PHOTOS = (
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
    ("china", "sklearn:china.jpg", None),
    ("flower", "sklearn:flower.jpg", None),
)


def _load(filename: str, loader) -> np.ndarray | None:
    if filename.startswith("sklearn:"):
        try:
            import sklearn.datasets  # optional: two more photographs when it is installed
        except ImportError:
            return None
        name = filename.split(":", 1)[1]
        return np.asarray(sklearn.datasets.load_sample_image(name))
    if not (Path(skimage.data.data_dir) / filename).is_file():
        return None
    return np.asarray(loader())


@functools.lru_cache(maxsize=1)
def _load_sample_images() -> tuple[tuple[str, np.ndarray], ...]:
    images = []
    for name, filename, loader in _PHOTOS:
        try:
            image = _load(filename, loader)
        except (AttributeError, ImportError, OSError, ValueError):
            continue
        if image is None or image.ndim != 3 or image.shape[-1] != 3:
            continue
        image = skimage.util.img_as_float32(image)
        image.setflags(write=False)
        images.append((name, image))
    return tuple(images)


def sample_images() -> dict[str, np.ndarray]:
    """The RGB photographs available offline, as float32 ``H x W x 3`` in [0, 1], read-only.

    In a fixed order: scikit-image's ``astronaut``, ``chelsea``, ``coffee``, ``rocket``,
    ``motorcycle_left``, ``motorcycle_right``, ``hubble_deep_field``, ``retina``,
    ``immunohistochemistry``, ``colorwheel``, then scikit-learn's ``china`` and ``flower``;
    entries whose package or file is missing are left out, nothing is downloaded.
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


def split_names(split: str | None, size: int, margin: int = 2) -> list[str]:
    """Photographs of a split (``train``, ``val``, ``test``; None for all) at least ``size`` square
    plus ``margin`` pixels (the crop that makes any CFA pattern RGGB)."""
    names = [name for name, _ in _load_sample_images()]
    held_out = set(VAL_IMAGES) | set(TEST_IMAGES)
    if split == "train":
        names = [name for name in names if name not in held_out]
    elif split == "val":
        names = [name for name in names if name in VAL_IMAGES]
    elif split == "test":
        names = [name for name in names if name in TEST_IMAGES]
    elif split is not None:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images = dict(_load_sample_images())
    names = [name for name in names if min(images[name].shape[:2]) >= size + margin]
    if not names:
        raise ValueError(f"no sample photograph of split {split!r} is at least {size}x{size} "
                         f"(plus {margin} pixels for the CFA shift)")
    return names


def _check_size(size: int) -> int:
    if size < 2 or size % 2:
        raise ValueError(f"the crop size must be an even number of pixels, got {size}")
    return int(size)


def _random_crop(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[slice, slice]:
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return slice(top, top + size), slice(left, left + size)


def _dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips / right-angle rotations of an ``H x W x C`` square crop."""
    image = np.rot90(image, k % 4, axes=(0, 1))
    return np.ascontiguousarray(image[:, ::-1] if k >= 4 else image)


def recolour(linear: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training scene in other colours and light: (sRGB, linear sRGB) of the linear photograph
    with per-channel gains ``U(0.75, 1.33)`` (geometric), saturation ``U(0.6, 1.3)`` (mixed with
    its luminance) and exposure ``U(0.5, 1.2)``, clipped to [0, 1]. Nine training photographs would
    otherwise teach the network their colours, not the camera's."""
    gains = np.exp(rng.uniform(np.log(0.75), np.log(1.33), size=3)).astype(np.float32)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    saturation = np.float32(rng.uniform(0.6, 1.3))
    mixed = luminance[..., None] + saturation * (linear * gains - luminance[..., None])
    out = np.clip(mixed * np.float32(rng.uniform(0.5, 1.2)), 0.0, 1.0).astype(np.float32)
    return smoothstep(linear_to_srgb(out)), out


def _scene(name: str, size: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flipped / rotated ``size`` crop of photograph ``name``: (sRGB, linear sRGB); with
    ``size=None`` the whole photograph, cropped to even sides."""
    image, linear = sample_images()[name], _linear_sample_images()[name]
    if size is None:
        frame = (slice(0, image.shape[0] // 2 * 2), slice(0, image.shape[1] // 2 * 2))
        return np.ascontiguousarray(image[frame]), np.ascontiguousarray(linear[frame])
    rows, cols = _random_crop(*image.shape[:2], size, rng)
    k = int(rng.integers(8))
    return _dihedral(image[rows, cols], k), _dihedral(linear[rows, cols], k)


def synthetic_item(rgb: np.ndarray, linear: np.ndarray, split: str, rng: np.random.Generator,
                   ratio: float | None = None) -> dict:
    """One low-light sample of an ``(h + 2) x (w + 2)`` scene, as the network and a file reader see it.

    The scene goes through a random camera of ``split`` (:func:`~.camera.draw_camera`) and its
    CFA; the short exposure is then cropped to canonical RGGB (``size`` square, as
    :func:`~deployq.calib.raw.read_raw` crops a BGGR file) and amplified by
    :func:`~deployq.calib.raw.amplify` with the ratio, the as-shot white balance and the
    camera's colour matrix. Returns numpy
    ``input`` (4, h/2, w/2), ``mono`` (h, w) (the channel mean of the noise-free linear sRGB scene:
    what the colour-corrected input shows without noise),
    ``target`` (h, w, 3) sRGB, ``camera`` and the raw ``short`` / ``long`` mosaics (h + 2, w + 2).
    """
    camera = draw_camera(rng, split, ratio)
    sensor = camera.to_camera(linear)
    raw = capture(sensor, camera, rng)
    row, col = canonical_offset(camera.pattern)
    height, width = rgb.shape[0] - 2, rgb.shape[1] - 2
    window = (slice(row, row + height), slice(col, col + width))
    short = normalize_raw(raw["short"], camera.black_level, camera.white_level)[window]
    return {
        "input": amplify(pack_bayer(short), camera.ratio, camera.white_balance, camera.colour_matrix),
        "mono": np.clip(linear[window], 0.0, 1.0).mean(axis=-1, dtype=np.float32),
        "target": np.ascontiguousarray(rgb[window]),
        "camera": camera,
        "short": raw["short"],
        "long": raw["long"],
    }


_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


class SyntheticLowLight(torch.utils.data.Dataset):
    """Low-light pairs made on the fly, item ``i`` a deterministic function of ``(seed, split, i)``.

    A random photograph of the split, a random ``size x size`` crop with a random flip /
    rotation (``train``: also new colours and exposure, :func:`recolour`), a random camera and
    exposure ratio of the split (:func:`synthetic_item`). Items are
    dicts of float32 tensors: ``input`` ``(4, size/2, size/2)``, ``mono`` ``(1, size, size)``,
    ``target`` ``(3, size, size)`` (sRGB in [0, 1]) and ``ratio`` ``()``. ``ratios`` fixes the
    exposure ratios to draw from; by default they are log-uniform over [100, 300].
    """

    def __init__(
        self,
        size: int = 128,
        length: int = 1000,
        split: str = "train",
        ratios: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if length < 0 or (ratios is not None and not ratios):
            raise ValueError("need length >= 0 and at least one ratio")
        self.size = _check_size(size)
        self.length = int(length)
        self.split = split
        self.ratios = None if ratios is None else tuple(float(r) for r in ratios)
        self.seed = int(seed)
        self.names = split_names(split, self.size)
        _linear_sample_images()  # fill the per-process cache now (DataLoader workers inherit it)

    def __len__(self) -> int:
        return self.length

    def source(self, index: int) -> str:
        """The photograph item ``index`` is cut from."""
        return self.names[int(self._rng(index).integers(len(self.names)))]

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return np.random.default_rng((self.seed, _SPLIT_STREAM[self.split], int(index)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        name = self.names[int(rng.integers(len(self.names)))]
        rgb, linear = _scene(name, self.size + 2, rng)
        if self.split == "train":
            rgb, linear = recolour(linear, rng)
        ratio = None if self.ratios is None else self.ratios[int(rng.integers(len(self.ratios)))]
        item = synthetic_item(rgb, linear, self.split, rng, ratio)
        return {
            "input": torch.from_numpy(item["input"]),
            "mono": torch.from_numpy(item["mono"][None]),
            "target": torch.from_numpy(item["target"].transpose(2, 0, 1).copy()),
            "ratio": torch.tensor(item["camera"].ratio, dtype=torch.float32),
        }


def _write_png(path: Path, image: np.ndarray) -> None:
    """Save an image, atomically."""
    with atomic_path(path) as temporary:
        skimage.io.imsave(temporary, image, check_contrast=False)


def write_sid_folder(
    out_dir: str | os.PathLike,
    n_scenes: int,
    size: int | None,
    ratios: Sequence[float] = (100, 250, 300),
    seed: int = 0,
    *,
    split: str = "test",
) -> list[dict]:
    """Write a small SID-like folder of DNG pairs and ground truth, deterministic for ``seed``.

    Scene ``k`` (id ``f"{k + 1:05d}"``) is a random crop of photograph ``k mod n`` of ``split``
    (``size=None``: the whole photograph, less two rows and columns) through a random camera of
    that split (its CFA, levels and as-shot white balance in the DNG), exposure ratio
    ``ratios[k mod len(ratios)]``; files read back ``size x size`` after the reader's crop to
    canonical RGGB::

        short/{id}_00_{10/ratio}s.dng   long/{id}_00_10s.dng   gt/{id}.png (8-bit sRGB)

    with the exposure times also in the DNGs' EXIF. Returns one dict per scene with ``id``,
    ``short``, ``long``, ``gt`` (paths), ``ratio`` and ``camera``.
    """
    size = None if size is None else _check_size(size)
    if size is not None and size < _MIN_DNG_SIDE:
        raise ValueError(f"DNG scenes must be at least {_MIN_DNG_SIDE} pixels, got {size}")
    if n_scenes < 0 or not ratios:
        raise ValueError("need n_scenes >= 0 and at least one ratio")
    out_dir = Path(out_dir)
    folders = {kind: out_dir / kind for kind in ("short", "long", "gt")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    names = split_names(split, size or _MIN_DNG_SIDE)
    scenes = []
    for k in range(n_scenes):
        rng = np.random.default_rng((seed, k))
        rgb, linear = _scene(names[k % len(names)], None if size is None else size + 2, rng)
        item = synthetic_item(rgb, linear, split, rng, ratios[k % len(ratios)])
        camera = item["camera"]
        scene_id = f"{k + 1:05d}"
        short_time = SID_LONG_EXPOSURE / camera.ratio
        short = folders["short"] / f"{scene_id}_00_{short_time:g}s.dng"
        long = folders["long"] / f"{scene_id}_00_{SID_LONG_EXPOSURE:g}s.dng"
        gt = folders["gt"] / f"{scene_id}.png"
        file_args = {"pattern": camera.pattern, "black_level": camera.black_level,
                     "white_level": camera.white_level, "white_balance": camera.white_balance,
                     "colour_matrix": camera.xyz_to_cam}
        # the mosaic as a file of this CFA holds it: read back (cropped to canonical RGGB) it is size x size
        row, col = canonical_offset(camera.pattern)
        frame = (slice(0, rgb.shape[0] - 2 + row), slice(0, rgb.shape[1] - 2 + col))
        write_dng(short, item["short"][frame], exposure_time=short_time, **file_args)
        write_dng(long, item["long"][frame], exposure_time=SID_LONG_EXPOSURE, **file_args)
        _write_png(gt, skimage.util.img_as_ubyte(item["target"]))
        scenes.append({"id": scene_id, "short": short, "long": long, "gt": gt,
                       "ratio": camera.ratio, "camera": camera})
    return scenes
