"""Unprocessing, noise, SID pairs, DNG writing and the in-memory low-light dataset."""

from __future__ import annotations


import numpy as np
import pytest
import rawpy
import skimage.io
import torch

from deployq.calib.raw import bayer_pattern, load_packed, pack_bayer, read_raw, sid_ratio
from deployq.calib.dng import write_dng
from deployq.examples.lowlight.camera import (
    BLACK_LEVEL,
    WHITE_LEVEL,
    add_noise,
    random_ccm,
    sample_noise_levels,
    sid_pair,
    unprocess,
)
from deployq.examples.lowlight.data import TEST_IMAGES, VAL_IMAGES, SyntheticLowLight, sample_images, write_sid_folder
from deployq.examples.lowlight.isp import (
    demosaic,
    inverse_smoothstep,
    linear_to_srgb,
    mosaic,
    process,
    smoothstep,
    srgb_to_linear,
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


# ---------------------------------------------------------------------------------------------
# Pipeline pieces
# ---------------------------------------------------------------------------------------------


def test_tone_and_gamma_curves_invert():
    y = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(smoothstep(inverse_smoothstep(y)), y, atol=2e-6)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(y)), y, atol=2e-6)
    # exact sRGB curve: linear segment below 0.04045, 0.5 decodes to 0.214
    assert srgb_to_linear(np.float32(0.04))[()] == pytest.approx(0.04 / 12.92)
    assert srgb_to_linear(np.float32(0.5))[()] == pytest.approx(0.21404, abs=1e-5)


def test_random_ccm_rows_sum_to_one_and_are_deterministic():
    ccm = random_ccm(np.random.default_rng(0))
    assert ccm.shape == (3, 3) and ccm.dtype == np.float32
    np.testing.assert_allclose(ccm.sum(axis=1), 1.0, atol=1e-6)
    assert np.linalg.cond(ccm) < 10
    np.testing.assert_array_equal(ccm, random_ccm(np.random.default_rng(0)))
    assert not np.array_equal(ccm, random_ccm(np.random.default_rng(1)))


def test_mosaic_layouts_and_demosaic_of_flat_colour():
    image = np.random.default_rng(0).random((4, 6, 3), dtype=np.float32)
    assert mosaic(image)[0, 0] == image[0, 0, 0] and mosaic(image)[1, 1] == image[1, 1, 2]
    assert mosaic(image, "BGGR")[0, 0] == image[0, 0, 2]
    assert mosaic(image, "GRBG")[0, 1] == image[0, 1, 0]
    assert mosaic(image, "GBRG")[1, 0] == image[1, 0, 0]
    flat = np.broadcast_to(np.float32([0.2, 0.5, 0.7]), (8, 10, 3))
    np.testing.assert_allclose(demosaic(mosaic(flat)), flat, atol=1e-6)
    # Linear filters: planes with independent linear ramps are exact away from the border.
    y, x = np.mgrid[:16, :20].astype(np.float32)
    ramps = np.stack([0.01 * x + 0.1, 0.02 * y + 0.05, 0.3 + 0.005 * x + 0.01 * y], axis=-1)
    np.testing.assert_allclose(demosaic(mosaic(ramps))[2:-2, 2:-2], ramps[2:-2, 2:-2], atol=1e-6)
    with pytest.raises(ValueError, match="Bayer pattern"):
        mosaic(image, "RGBG")


def test_unprocess_then_process_recovers_the_photograph():
    image = sample_images()["chelsea"]
    bayer, meta = unprocess(image, np.random.default_rng(0))
    assert bayer.shape == (300, 450) and bayer.dtype == np.float32
    assert 0.0 <= bayer.min() and bayer.max() <= 1.0
    assert 1.9 <= meta["red_gain"] <= 2.4 and 1.5 <= meta["blue_gain"] <= 1.9
    assert meta["rgb_gain"] > 0
    np.testing.assert_allclose(meta["ccm"] @ meta["rgb_to_cam"], np.eye(3), atol=1e-5)
    target = image[:300, :450]
    assert psnr(process(bayer, meta), target) > 30.0
    # Packed input gives half resolution; its channels sit one pixel apart, hence the lower bar.
    half = process(pack_bayer(bayer), meta)
    assert half.shape == (150, 225, 3)
    assert psnr(half, target.reshape(150, 2, 225, 2, 3).mean(axis=(1, 3))) > 25.0


def test_unprocess_is_deterministic_for_a_generator_seed():
    image = sample_images()["astronaut"][:64, :64]
    first, meta = unprocess(image, np.random.default_rng(3))
    second, _ = unprocess(image, np.random.default_rng(3))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, unprocess(image, np.random.default_rng(4))[0])


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.0, 0.05, 0.6])
def test_add_noise_variance_is_shot_times_signal_plus_read(level):
    shot, read = 0.01, 2e-4
    clean = np.full(400_000, level, dtype=np.float32)
    noisy = add_noise(clean, shot, read, np.random.default_rng(1))
    assert noisy.dtype == np.float32
    assert abs(noisy.mean() - level) < 1e-3
    assert noisy.var() == pytest.approx(shot * level + read, rel=0.02)


def test_sample_noise_levels_follow_brooks():
    rng = np.random.default_rng(2)
    shot, read = np.array([sample_noise_levels(rng) for _ in range(4000)]).T
    assert shot.min() >= 1e-4 and shot.max() <= 0.012
    assert np.log(shot).mean() == pytest.approx(np.log(np.sqrt(1e-4 * 0.012)), abs=0.1)
    residual = np.log(read) - (2.18 * np.log(shot) + 1.20)
    assert abs(residual.mean()) < 0.02
    assert residual.std() == pytest.approx(0.26, rel=0.05)


# ---------------------------------------------------------------------------------------------
# SID pairs and DNG files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [100, 250, 300])
def test_sid_pair_ranges_and_exposure_ratio(ratio):
    image = sample_images()["coffee"][:101, :130]  # odd height: cropped to even
    pair = sid_pair(image, ratio, np.random.default_rng(ratio))
    for key in ("long", "short"):
        assert pair[key].dtype == np.uint16 and pair[key].shape == (100, 130)
        assert pair[key].max() <= WHITE_LEVEL
    assert pair["target"].dtype == np.float32 and pair["target"].shape == (100, 130, 3)
    np.testing.assert_array_equal(pair["target"], image[:100])
    assert pair["mono"].dtype == np.float32 and pair["mono"].shape == (100, 130)
    assert 0.0 <= pair["mono"].min() and pair["mono"].max() <= 1.0
    assert pair["ratio"] == ratio
    long_signal = pair["long"].astype(np.float64).mean() - BLACK_LEVEL
    short_signal = pair["short"].astype(np.float64).mean() - BLACK_LEVEL
    assert long_signal / short_signal == pytest.approx(ratio, rel=0.05)
    # the short frame sits just above black: a few tens of DN of signal at most on average
    assert short_signal < (WHITE_LEVEL - BLACK_LEVEL) / ratio


def test_write_dng_reads_back_bit_exactly(tmp_path):
    raw = np.random.default_rng(0).integers(0, WHITE_LEVEL + 1, size=(30, 44), dtype=np.uint16)
    path = write_dng(tmp_path / "exact.dng", raw, exposure_time=0.1)
    with rawpy.imread(str(path)) as handle:
        np.testing.assert_array_equal(handle.raw_image_visible, raw)
        assert handle.black_level_per_channel == [BLACK_LEVEL] * 4
        assert handle.white_level == WHITE_LEVEL
    image = read_raw(path)
    expected = np.clip((raw.astype(np.float32) - 512) / (16383 - 512), 0, 1)
    np.testing.assert_allclose(image.bayer, expected, rtol=0, atol=1e-7)
    assert image.exposure_time == pytest.approx(0.1)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_write_dng_cfa_pattern_comes_back(tmp_path, pattern):
    raw = np.full((24, 24), 1000, dtype=np.uint16)
    path = write_dng(tmp_path / "p.dng", raw, pattern)
    with rawpy.imread(str(path)) as handle:
        assert bayer_pattern(handle.raw_pattern, handle.color_desc) == pattern


def test_write_dng_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_dng(tmp_path / "a.dng", np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="22x22"):
        write_dng(tmp_path / "b.dng", np.zeros((16, 32), np.uint16))
    with pytest.raises(ValueError, match="Bayer pattern"):
        write_dng(tmp_path / "c.dng", np.zeros((32, 32), np.uint16), "RGBG")
    with pytest.raises(ValueError, match="white level"):
        write_dng(tmp_path / "d.dng", np.zeros((32, 32), np.uint16), black_level=600, white_level=9)
    assert list(tmp_path.iterdir()) == []


def test_write_dng_replaces_an_existing_file(tmp_path):
    path = tmp_path / "same.dng"
    write_dng(path, np.full((24, 24), 700, np.uint16))
    write_dng(path, np.full((24, 24), 900, np.uint16))
    with rawpy.imread(str(path)) as handle:
        assert (handle.raw_image_visible == 900).all()


def test_short_dng_matches_the_in_memory_normalization(tmp_path):
    pair = sid_pair(sample_images()["rocket"][:64, :64], 250, np.random.default_rng(5))
    path = write_dng(tmp_path / "00001_00_0.04s.dng", pair["short"], exposure_time=0.04)
    expected = np.clip((pair["short"].astype(np.float32) - 512) / 15871 * 250, 0, 1)
    np.testing.assert_allclose(load_packed(path, ratio=250, colour=False), pack_bayer(expected), rtol=1e-6)


def test_sample_images_are_stable_rgb_floats():
    images = sample_images()
    names = list(images)
    assert names == list(sample_images())
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names)
    assert set(VAL_IMAGES) <= set(names)
    for image in images.values():
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[-1] == 3
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert not image.flags.writeable


def test_write_sid_folder_layout_and_determinism(tmp_path):
    scenes = write_sid_folder(tmp_path / "a", n_scenes=3, size=32, ratios=(100, 250, 300), seed=7)
    again = write_sid_folder(tmp_path / "b", n_scenes=3, size=32, ratios=(100, 250, 300), seed=7)
    assert [s["short"].name for s in scenes] == [
        "00001_00_0.1s.dng",
        "00002_00_0.04s.dng",
        "00003_00_0.0333333s.dng",
    ]
    for scene, twin in zip(scenes, again):
        assert scene["long"].name == f"{scene['id']}_00_10s.dng"
        assert sid_ratio(scene["short"], scene["long"]) == pytest.approx(scene["ratio"], rel=1e-5)
        short, long = read_raw(scene["short"]), read_raw(scene["long"])
        assert short.exposure_time * scene["ratio"] == pytest.approx(10.0, rel=1e-5)
        assert long.exposure_time == 10.0 and short.bayer.shape == (32, 32)
        gt = skimage.io.imread(scene["gt"])
        assert gt.shape == (32, 32, 3) and gt.dtype == np.uint8
        for key in ("short", "long", "gt"):
            assert scene[key].read_bytes() == twin[key].read_bytes()
    leftovers = [p for p in (tmp_path / "a").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# SyntheticLowLight
# ---------------------------------------------------------------------------------------------


def test_dataset_items_have_the_documented_shapes():
    dataset = SyntheticLowLight(size=64, length=5, split="train", seed=0)
    assert len(dataset) == 5
    item = dataset[0]
    assert item["input"].shape == (4, 32, 32)
    assert item["mono"].shape == (1, 64, 64)
    assert item["target"].shape == (3, 64, 64)
    assert item["ratio"].shape == ()
    for tensor in item.values():
        assert tensor.dtype == torch.float32
    for key in ("input", "mono", "target"):
        assert 0.0 <= item[key].min() and item[key].max() <= 1.0
    assert 100.0 <= float(item["ratio"]) <= 300.0  # log-uniform over [100, 300] by default
    fixed = SyntheticLowLight(size=64, length=3, split="train", ratios=(100, 250), seed=0)
    assert {float(fixed[i]["ratio"]) for i in range(3)} <= {100.0, 250.0}
    with pytest.raises(IndexError):
        dataset[5]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["input"].shape == (4, 4, 32, 32)


def test_dataset_is_deterministic_per_seed_and_index():
    first = SyntheticLowLight(size=32, length=4, seed=3)
    second = SyntheticLowLight(size=32, length=4, seed=3)
    other = SyntheticLowLight(size=32, length=4, seed=4)
    for key in ("input", "mono", "target"):
        torch.testing.assert_close(first[2][key], second[2][key], rtol=0, atol=0)
        torch.testing.assert_close(first[2][key], first[2][key], rtol=0, atol=0)
    assert not torch.equal(first[2]["input"], other[2]["input"])
    assert not torch.equal(first[1]["input"], first[2]["input"])


def _found_in(crop: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``crop`` (H x W x 3), flipped or rotated any of the 8 ways, is a window of ``image``."""
    size = crop.shape[0]
    for k in range(8):
        view = np.rot90(crop, -(k % 4), axes=(0, 1)) if k < 4 else np.rot90(crop[:, ::-1], -(k % 4), axes=(0, 1))
        for top, left in zip(*np.nonzero((image == view[0, 0]).all(axis=-1))):
            window = image[top : top + size, left : left + size]
            if window.shape == view.shape and np.array_equal(window, view):
                return True
    return False


def test_the_three_splits_use_disjoint_photographs():
    splits = {name: SyntheticLowLight(size=32, length=9, split=name, seed=0) for name in ("train", "val", "test")}
    assert set(splits["val"].names) == set(VAL_IMAGES) and set(splits["test"].names) == set(TEST_IMAGES)
    assert not set(splits["train"].names) & (set(VAL_IMAGES) | set(TEST_IMAGES))
    images = sample_images()
    for split, dataset in splits.items():
        for index in range(0, len(dataset), 2):
            name = dataset.source(index)
            assert name in dataset.names
            if split != "train":  # training scenes are recoloured (recolour): not a crop of the photograph
                crop = dataset[index]["target"].numpy().transpose(1, 2, 0)
                assert _found_in(crop, images[name])


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticLowLight(split="holdout")
    with pytest.raises(ValueError, match="even"):
        SyntheticLowLight(size=63)
    with pytest.raises(ValueError, match="at least 5000x5000"):
        SyntheticLowLight(size=5000)


def test_whole_frames_come_back_at_the_photographs_size_with_their_camera(tmp_path):
    """size=None writes each photograph whole (less the two rows and columns of the CFA shift);
    the DNG carries the drawn camera's pattern, levels and white balance, and the short frame read
    back is the generator's short exposure."""
    scenes = write_sid_folder(tmp_path, 2, None, ratios=(200,), seed=3, split="test")
    for scene in scenes:
        camera = scene["camera"]
        gt = skimage.io.imread(scene["gt"])
        short = read_raw(scene["short"])
        assert short.bayer.shape == gt.shape[:2] and short.pattern == camera.pattern
        assert short.white_level == camera.white_level and set(short.black_level) == {camera.black_level}
        assert short.white_balance == pytest.approx(camera.white_balance, rel=1e-4)
        np.testing.assert_allclose(short.colour_matrix, camera.colour_matrix, atol=5e-4)
        assert sid_ratio(scene["short"], scene["long"]) == pytest.approx(200, rel=1e-5)
    names = {min(p.shape[:2]) for p in sample_images().values()}
    assert max(skimage.io.imread(s["gt"]).shape[0] for s in scenes) + 2 in names | {n + 1 for n in names}


def test_the_test_camera_is_held_out():
    """The test split draws the held-out sensor and only the held-out noise band; training never does."""
    from deployq.examples.lowlight.camera import TEST_SHOT_BAND, draw_camera, rgb_to_camera, _TEST_MATRIX

    held_out = rgb_to_camera(_TEST_MATRIX)
    for k in range(200):
        test = draw_camera(np.random.default_rng((1, k)), "test")
        train = draw_camera(np.random.default_rng((2, k)), "train")
        np.testing.assert_array_equal(test.rgb_to_cam, held_out)
        assert TEST_SHOT_BAND[0] <= test.shot <= TEST_SHOT_BAND[1]
        assert not TEST_SHOT_BAND[0] < train.shot < TEST_SHOT_BAND[1]
        assert np.abs(train.rgb_to_cam - held_out).max() > 1e-3
        assert 100 <= train.ratio <= 300 and train.white_level in (4095, 16383)


def test_compare_puts_float_int8_and_the_ground_truth_side_by_side(tmp_path):
    from deployq.examples.lowlight.compare import compare

    scenes = write_sid_folder(tmp_path / "sid", 2, 32, seed=1, split="val")
    outputs = {"float": tmp_path / "f", "int8": tmp_path / "q"}
    for folder in outputs.values():
        folder.mkdir()
        for scene in scenes:
            skimage.io.imsave(folder / f"{scene['short'].stem}.png", skimage.io.imread(scene["gt"]), check_contrast=False)
    scores = compare(tmp_path / "sid", outputs, tmp_path / "cmp.png")
    picture = skimage.io.imread(tmp_path / "cmp.png")
    assert picture.shape[1] == 3 * 32 + 2 * 8 and picture.shape[0] == 2 * (32 + 18 + 8)
    assert scores["float"] == [float("inf"), float("inf")]
    (outputs["int8"] / f"{scenes[0]['short'].stem}.png").unlink()
    with pytest.raises(FileNotFoundError, match="deployq run"):
        compare(tmp_path / "sid", outputs, tmp_path / "cmp.png")


def test_recolouring_changes_colour_and_light_and_the_target_follows():
    """The training scene is the recoloured linear image taken through the same tone curve and
    gamma the camera pipeline inverts: target == smoothstep(linear_to_srgb(linear))."""
    from deployq.examples.lowlight.data import recolour

    linear = srgb_to_linear(inverse_smoothstep(sample_images()["astronaut"][:64, :64]))
    rgb, out = recolour(linear, np.random.default_rng(0))
    np.testing.assert_allclose(rgb, smoothstep(linear_to_srgb(out)), atol=1e-6)
    assert not np.allclose(out, linear, atol=0.02) and 0.0 <= out.min() and out.max() <= 1.0
    again, _ = recolour(linear, np.random.default_rng(0))
    np.testing.assert_array_equal(rgb, again)
