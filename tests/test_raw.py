"""Raw reading with rawpy: normalization, CFA canonicalization, packing, errors, SID names."""

from __future__ import annotations

import numpy as np
import pytest
import rawpy
import torch
from pidng.core import RAW2DNG, DNGTags, Tag
from pidng.defs import PhotometricInterpretation

from deployq.calib.raw import (
    RawReadError,
    bayer_pattern,
    exposure_from_name,
    load_packed,
    pack_bayer,
    read_raw,
    sid_ratio,
    unpack_bayer,
)
from deployq.calib.dng import write_dng
from deployq.examples.lowlight.isp import mosaic

SIDE = 32


def _write_pidng(path, raw, cfa_dim, cfa, *, black=512, active_area=None):
    """A DNG written with pidng directly, for layouts write_dng does not offer."""
    height, width = raw.shape
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    tags.set(Tag.SamplesPerPixel, 1)
    tags.set(Tag.BitsPerSample, 16)
    tags.set(Tag.CFARepeatPatternDim, cfa_dim)
    tags.set(Tag.CFAPattern, cfa)
    tags.set(Tag.BlackLevel, [black])
    tags.set(Tag.WhiteLevel, 16383)
    if active_area is not None:
        tags.set(Tag.ActiveArea, active_area)
    converter = RAW2DNG()
    converter.options(tags, path="", compress=False)
    path.write_bytes(bytes(converter.convert(raw)))
    return path


def _random_raw(rng, height=SIDE, width=SIDE, low=0, high=16384):
    return rng.integers(low, high, size=(height, width), dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------


def test_pack_bayer_equals_pixel_unshuffle():
    bayer = np.random.default_rng(0).random((6, 10), dtype=np.float32)
    packed = pack_bayer(bayer)
    expected = torch.nn.functional.pixel_unshuffle(torch.from_numpy(bayer)[None, None], 2)[0]
    assert packed.shape == (4, 3, 5)
    np.testing.assert_array_equal(packed, expected.numpy())
    np.testing.assert_array_equal(packed[0], bayer[0::2, 0::2])  # R
    np.testing.assert_array_equal(packed[1], bayer[0::2, 1::2])  # G1
    np.testing.assert_array_equal(packed[2], bayer[1::2, 0::2])  # G2
    np.testing.assert_array_equal(packed[3], bayer[1::2, 1::2])  # B


def test_pack_unpack_round_trip_with_batch_dim():
    batch = np.random.default_rng(1).random((3, 8, 12), dtype=np.float32)
    packed = pack_bayer(batch)
    assert packed.shape == (3, 4, 4, 6)
    expected = torch.nn.functional.pixel_unshuffle(torch.from_numpy(batch)[:, None], 2)
    np.testing.assert_array_equal(packed, expected.numpy())
    np.testing.assert_array_equal(unpack_bayer(packed), batch)
    shuffled = torch.nn.functional.pixel_shuffle(torch.from_numpy(packed), 2)[:, 0]
    np.testing.assert_array_equal(unpack_bayer(packed), shuffled.numpy())


def test_pack_rejects_odd_sizes_and_unpack_wrong_channels():
    with pytest.raises(ValueError, match="even"):
        pack_bayer(np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match="4 channels"):
        unpack_bayer(np.zeros((3, 2, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# read_raw: levels, patterns, margins, metadata
# ---------------------------------------------------------------------------------------------


def test_read_raw_subtracts_per_site_black_and_scales_to_white(tmp_path):
    raw = _random_raw(np.random.default_rng(2), high=17000)  # some values above white (16383)
    raw[0, :4] = [0, 499, 500, 16383]
    blacks = [500, 510, 520, 530]  # R, G1, G2, B sites
    path = write_dng(tmp_path / "levels.dng", raw, "RGGB", blacks, 16383, exposure_time=1 / 30)
    image = read_raw(path)
    black_map = np.tile(np.array(blacks, np.float32).reshape(2, 2), (SIDE // 2, SIDE // 2))
    expected = np.clip((raw.astype(np.float32) - black_map) / (16383 - black_map), 0, 1)
    np.testing.assert_allclose(image.bayer, expected, rtol=0, atol=1e-7)
    assert image.bayer.dtype == np.float32 and image.bayer.shape == (SIDE, SIDE)
    assert image.bayer.min() == 0.0 and image.bayer.max() == 1.0
    assert image.pattern == "RGGB"
    # rawpy indexes black levels by colour (R, G, B, G2 for colour description "RGBG").
    assert image.black_level == [500, 510, 530, 520]
    assert image.white_level == 16383
    assert image.exposure_time == pytest.approx(1 / 30, rel=1e-5)
    assert image.path == path


def test_a_12_bit_raw_scales_to_its_own_white_level(tmp_path):
    """A 12-bit camera (white 4095) with its own black level per site: nothing assumes 14 bits."""
    raw = np.random.default_rng(5).integers(0, 4300, size=(SIDE, SIDE)).astype(np.uint16)
    blacks = [256, 240, 250, 262]
    image = read_raw(write_dng(tmp_path / "twelve.dng", raw, "RGGB", blacks, 4095))
    black_map = np.tile(np.array(blacks, np.float32).reshape(2, 2), (SIDE // 2, SIDE // 2))
    expected = np.clip((raw.astype(np.float32) - black_map) / (4095 - black_map), 0, 1)
    np.testing.assert_allclose(image.bayer, expected, rtol=0, atol=1e-7)
    assert image.white_level == 4095 and 0.4 < image.bayer.mean() < 0.6


def test_read_raw_without_exposure_time(tmp_path):
    path = write_dng(tmp_path / "noexif.dng", _random_raw(np.random.default_rng(3)))
    assert read_raw(path).exposure_time is None


BLACK_BY_COLOUR = {"R": 500, "G": 510, "B": 530}


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_every_cfa_pattern_becomes_the_same_rggb(tmp_path, pattern):
    """The same scene written as each CFA reads back as one canonical RGGB mosaic.

    A file of pattern P with R at (r, c) shows scene[1 - r + y, 1 - c + x]; read_raw drops r rows
    and c columns, so every file yields the RGGB mosaic of scene[1:1 + S, 1:1 + S]. Files are
    (S + 1) square, so the even crop is also exercised.
    """
    rng = np.random.default_rng(4)
    scene = rng.integers(600, 16000, size=(SIDE + 4, SIDE + 4, 3)).astype(np.float32)
    red = pattern.index("R")
    row, col = divmod(red, 2)
    window = scene[1 - row : 1 - row + SIDE + 2, 1 - col : 1 - col + SIDE + 2]
    raw = mosaic(window, pattern)[: SIDE + 1, : SIDE + 1].astype(np.uint16)
    blacks = [BLACK_BY_COLOUR[letter] for letter in pattern]
    image = read_raw(write_dng(tmp_path / f"{pattern}.dng", raw, pattern, blacks))

    expected_raw = mosaic(scene[1 : 1 + SIDE, 1 : 1 + SIDE], "RGGB")
    black_map = mosaic(np.broadcast_to(np.float32([500, 510, 530]), (SIDE, SIDE, 3)), "RGGB")
    expected = (expected_raw - black_map) / (16383 - black_map)
    assert image.pattern == pattern
    assert image.bayer.shape == (SIDE, SIDE)
    np.testing.assert_allclose(image.bayer, expected, rtol=0, atol=1e-7)


def test_pattern_is_taken_relative_to_the_visible_area(tmp_path):
    """A DNG whose ActiveArea starts on an odd row: colours must follow the visible origin.

    The DNG CFA pattern starts at the ActiveArea corner (row 1 here), so raw row 1 is R G R G.
    LibRaw moves the visible origin (to an even row) and reports the pattern there; whatever it
    picks, red sites must land at (0, 0) of the canonical mosaic.
    """
    level = {"R": 12000, "G": 6000, "B": 2000}
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[: SIDE + 2, : SIDE + 4]
    letters = np.array([["R", "G"], ["G", "B"]])[(rows - 1) % 2, cols % 2]
    raw = np.vectorize(level.get)(letters) + rng.integers(0, 100, size=letters.shape)
    area = [1, 0, SIDE + 1, SIDE + 4]
    path = _write_pidng(
        tmp_path / "margins.dng", raw.astype(np.uint16), [2, 2], [0, 1, 1, 2], active_area=area
    )
    with rawpy.imread(str(path)) as handle:
        visible_colours = handle.raw_colors_visible[:2, :2].copy()
        top = handle.sizes.top_margin
    image = read_raw(path)
    assert image.pattern == "".join("RGBG"[c] for c in visible_colours.flat)
    assert image.pattern == ("RGGB" if top % 2 else "GBRG")
    packed = pack_bayer(image.bayer) * (16383 - 512) + 512
    for channel, letter in enumerate("RGGB"):
        assert level[letter] <= packed[channel].min()
        assert packed[channel].max() < level[letter] + 100


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_truncated_dng_names_the_file(tmp_path):
    path = write_dng(tmp_path / "cut.dng", _random_raw(np.random.default_rng(6)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RawReadError, match="cut.dng"):
        read_raw(path)


def test_random_bytes_arw_names_the_file(tmp_path):
    path = tmp_path / "noise.ARW"
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(RawReadError, match=r"noise\.ARW.*LibRaw"):
        read_raw(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(RawReadError, match="absent.ARW"):
        read_raw(tmp_path / "absent.ARW")


def test_xtrans_dng_is_rejected(tmp_path):
    """A real 6x6 X-Trans-layout DNG: LibRaw reads it, read_raw refuses it as non-Bayer."""
    xtrans = [
        [1, 1, 0, 1, 1, 2],
        [1, 1, 2, 1, 1, 0],
        [2, 0, 1, 0, 2, 1],
        [1, 1, 2, 1, 1, 0],
        [1, 1, 0, 1, 1, 2],
        [0, 2, 1, 2, 0, 1],
    ]
    raw = _random_raw(np.random.default_rng(8), 36, 36)
    path = _write_pidng(tmp_path / "xtrans.dng", raw, [6, 6], sum(xtrans, []))
    with rawpy.imread(str(path)) as handle:
        assert handle.raw_pattern.shape == (6, 6)
    with pytest.raises(RawReadError, match=r"xtrans\.dng.*not a Bayer sensor.*6x6"):
        read_raw(path)


def test_bayer_pattern_names_and_rejections():
    assert bayer_pattern(np.array([[0, 1], [3, 2]]), b"RGBG") == "RGGB"
    assert bayer_pattern(np.array([[2, 3], [1, 0]]), b"RGBG") == "BGGR"
    assert bayer_pattern(np.array([[1, 0], [2, 3]]), "RGBG") == "GRBG"
    assert bayer_pattern(np.array([[3, 2], [0, 1]]), b"RGBG") == "GBRG"
    # pidng cannot write a CMYG sensor that LibRaw keeps as such, so the check is tested directly.
    with pytest.raises(ValueError, match="not a Bayer sensor.*GMCY"):
        bayer_pattern(np.array([[0, 1], [2, 3]]), b"GMCY")
    with pytest.raises(ValueError, match="RBGG"):  # greens not on a diagonal
        bayer_pattern(np.array([[0, 2], [1, 3]]), b"RGBG")
    with pytest.raises(ValueError, match="6x6"):
        bayer_pattern(np.zeros((6, 6), np.uint8), b"RGBG")
    with pytest.raises(ValueError, match="no colour filter array"):
        bayer_pattern(None, b"RGBG")


# ---------------------------------------------------------------------------------------------
# SID names and load_packed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "seconds"),
    [
        ("00001_00_0.1s.ARW", 0.1),
        ("10003_00_10s.ARW", 10.0),
        ("short/20208_00_0.033s.ARW", 0.033),
        ("00001_00_0.0333333s.dng", 0.0333333),
        ("00001_00_.5s.ARW", 0.5),
        ("photo.ARW", None),
        ("00001_00_s.ARW", None),
    ],
)
def test_exposure_from_name(name, seconds):
    assert exposure_from_name(name) == seconds


def test_sid_ratio_is_capped_and_names_bad_files():
    assert sid_ratio("00001_00_0.1s.ARW", "00001_00_10s.ARW") == pytest.approx(100)
    assert sid_ratio("00001_00_0.04s.ARW", "00001_00_10s.ARW") == pytest.approx(250)
    assert sid_ratio("00001_00_0.033s.ARW", "00001_00_10s.ARW") == 300
    uncapped = sid_ratio("00001_00_0.033s.ARW", "00001_00_10s.ARW", cap=1000)
    assert uncapped == pytest.approx(303.03, rel=1e-4)
    with pytest.raises(ValueError, match="IMG_0001.ARW"):
        sid_ratio("IMG_0001.ARW", "00001_00_10s.ARW")


def test_load_packed_amplifies_and_clips(tmp_path):
    raw = _random_raw(np.random.default_rng(9), low=512, high=1200)
    path = write_dng(tmp_path / "00001_00_0.1s.dng", raw)
    bayer = read_raw(path).bayer
    plain = load_packed(path, colour=False)
    np.testing.assert_array_equal(plain, pack_bayer(bayer))
    amplified = load_packed(path, ratio=100, colour=False)
    assert amplified.dtype == np.float32 and amplified.shape == (4, SIDE // 2, SIDE // 2)
    np.testing.assert_allclose(amplified, np.clip(pack_bayer(bayer) * 100, 0, 1), rtol=1e-6)
    assert amplified.max() == 1.0


def test_as_shot_white_balance_is_read_and_applied_per_cfa_site(tmp_path):
    """AsShotNeutral (written as the inverse of the multipliers) comes back as (R, 1, B); the
    loader multiplies R sites by R, both green sites by 1, B sites by B, then clips."""
    raw = _random_raw(np.random.default_rng(4), low=512, high=900)
    path = write_dng(tmp_path / "00001_00_0.1s.dng", raw, pattern="GBRG", white_balance=(2.0, 1.0, 1.6))
    image = read_raw(path)
    assert image.white_balance == pytest.approx((2.0, 1.0, 1.6), rel=1e-4)
    packed = pack_bayer(image.bayer)  # canonical RGGB after the reader's crop
    expected = np.clip(packed * 100 * np.array([2.0, 1.0, 1.0, 1.6], np.float32)[:, None, None], 0, 1)
    np.testing.assert_allclose(load_packed(path, ratio=100, colour=False), expected, rtol=1e-5)
    np.testing.assert_allclose(load_packed(path, ratio=100, white_balance=False, colour=False),
                               np.clip(packed * 100, 0, 1), rtol=1e-6)
    bare = write_dng(tmp_path / "00002_00_0.1s.dng", raw)  # no AsShotNeutral: nothing to apply
    assert read_raw(bare).white_balance is None
    np.testing.assert_array_equal(load_packed(bare, ratio=1, colour=False), np.clip(pack_bayer(read_raw(bare).bayer), 0, 1))
    with pytest.raises(ValueError, match="white_balance"):
        write_dng(tmp_path / "bad.dng", raw, white_balance=(2.0, 0.0, 1.0))


# linear sRGB (D65) -> XYZ as LibRaw tabulates it (its xyz_rgb, transposed): an independent copy
_LIBRAW_SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                                [0.212671, 0.715160, 0.072169],
                                [0.019334, 0.119193, 0.950227]])


def test_colour_matrix_is_read_from_the_file_and_applied_per_2x2_block(tmp_path):
    """A DNG's ColorMatrix1 (XYZ -> camera) comes back as camera -> sRGB, ``inv(rownorm(M @
    srgb_to_xyz))``; the loader applies it to each 2x2 block after the white balance (R and B
    take the two greens' mean, each green site keeps its own) and clips to [0, 1]."""
    xyz_to_cam = np.array([[1.1434, -0.4948, -0.1210], [-0.3746, 1.2042, 0.1903], [-0.0666, 0.1479, 0.5235]])
    raw = _random_raw(np.random.default_rng(5), low=512, high=700)
    path = write_dng(tmp_path / "00001_00_0.1s.dng", raw, pattern="BGGR", white_balance=(2.0, 1.0, 1.5),
                     colour_matrix=xyz_to_cam)
    image = read_raw(path)
    cam_rgb = xyz_to_cam @ _LIBRAW_SRGB_TO_XYZ
    expected_matrix = np.linalg.inv(cam_rgb / cam_rgb.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(image.colour_matrix, expected_matrix, atol=2e-4)
    np.testing.assert_allclose(image.colour_matrix.sum(axis=1), 1.0, atol=1e-4)  # grey stays grey

    balanced = np.clip(pack_bayer(image.bayer) * 100 * np.array([2.0, 1.0, 1.0, 1.5], np.float32)[:, None, None], 0, 1)
    r, g1, g2, b = balanced
    c = image.colour_matrix
    green = (g1 + g2) / 2
    expected = np.stack([c[0, 0] * r + c[0, 1] * green + c[0, 2] * b,
                         c[1, 0] * r + c[1, 1] * g1 + c[1, 2] * b,
                         c[1, 0] * r + c[1, 1] * g2 + c[1, 2] * b,
                         c[2, 0] * r + c[2, 1] * green + c[2, 2] * b])
    loaded = load_packed(path, ratio=100)
    np.testing.assert_allclose(loaded, np.clip(expected, 0, 1), atol=1e-6)
    assert not np.allclose(loaded, balanced, atol=1e-3)  # the matrix did something
    np.testing.assert_allclose(load_packed(path, ratio=100, colour=False), balanced, rtol=1e-6)
    with pytest.raises(ValueError, match="colour_matrix"):
        write_dng(tmp_path / "bad.dng", raw, colour_matrix=np.zeros((3, 3)))
