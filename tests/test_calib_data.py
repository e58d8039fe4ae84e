"""load_inputs: raw files, images, .npy, .npz, folders, SID ratios, and every error."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.io
import torch

from deployq.calib.data import InputDataError, iterate_batches, load_inputs
from deployq.calib.raw import load_packed, unpack_bayer
from deployq.calib.dng import write_dng
from deployq.examples.lowlight.data import write_sid_folder

SHAPE = (1, 4, 8, 8)


def _raw_file(path, seed=0, height=32, width=40, high=4000):
    raw = np.random.default_rng(seed).integers(512, high, size=(height, width), dtype=np.uint16)
    return write_dng(path, raw)


def _png(path, image):
    skimage.io.imsave(path, image, check_contrast=False)
    return path


# ---------------------------------------------------------------------------------------------
# Raw files
# ---------------------------------------------------------------------------------------------


def test_raw_file_is_packed_and_centre_cropped(tmp_path):
    path = _raw_file(tmp_path / "frame.dng")
    (array,) = load_inputs(path, SHAPE)
    assert array.shape == SHAPE and array.dtype == np.float32
    packed = load_packed(path)  # (4, 16, 20): centre 8x8 starts at (4, 6)
    np.testing.assert_array_equal(array[0], packed[:, 4:12, 6:14])


def test_raw_ratio_amplifies_and_clips(tmp_path):
    path = _raw_file(tmp_path / "bright.dng")
    (array,) = load_inputs(path, SHAPE, ratio=50)
    np.testing.assert_allclose(array[0], load_packed(path, ratio=50)[:, 4:12, 6:14], rtol=1e-6)
    assert array.max() == 1.0


def test_raw_mosaic_for_one_channel_models_keeps_the_cfa_phase(tmp_path):
    path = _raw_file(tmp_path / "frame.dng", height=34, width=42)
    (array,) = load_inputs(path, (1, 1, 10, 10))
    bayer = unpack_bayer(load_packed(path))  # 34 x 42: centre offsets 12 and 16 are even
    np.testing.assert_array_equal(array[0, 0], bayer[12:22, 16:26])
    (odd,) = load_inputs(path, (1, 1, 12, 14))  # offsets 11 and 14 -> 10 and 14
    np.testing.assert_array_equal(odd[0, 0], bayer[10:22, 14:28])


def test_sid_folder_ratio_comes_from_the_file_names(tmp_path):
    scenes = write_sid_folder(tmp_path / "sid", n_scenes=2, size=32, ratios=(100, 300), seed=1)
    arrays = load_inputs(tmp_path / "sid" / "short", SHAPE)
    assert len(arrays) == 2
    for array, scene in zip(arrays, scenes):
        expected = load_packed(scene["short"], ratio=scene["ratio"])[:, 4:12, 4:12]
        np.testing.assert_allclose(array[0], expected, rtol=1e-5)
    explicit = load_inputs(tmp_path / "sid" / "short", SHAPE, ratio=1)
    np.testing.assert_array_equal(explicit[0][0], load_packed(scenes[0]["short"])[:, 4:12, 4:12])


def test_sid_short_file_without_long_folder_uses_ratio_one(tmp_path):
    (tmp_path / "short").mkdir()
    path = _raw_file(tmp_path / "short" / "00001_00_0.1s.dng")
    (array,) = load_inputs(path, SHAPE)
    np.testing.assert_array_equal(array[0], load_packed(path)[:, 4:12, 6:14])


def test_raw_too_small_or_wrong_channels(tmp_path):
    path = _raw_file(tmp_path / "small.dng", height=24, width=24)
    with pytest.raises(InputDataError, match=r"small\.dng.*\(4, 12, 12\).*\(4, 16, 16\)"):
        load_inputs(path, (1, 4, 16, 16))
    with pytest.raises(InputDataError, match=r"small\.dng.*\(3, 8, 8\)"):
        load_inputs(path, (1, 3, 8, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio probes its legacy plugins
@pytest.mark.parametrize("name", ["broken.ARW", "broken.png", "broken.tif"])
def test_corrupt_file_names_the_file(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"not a raw file" * 100)
    with pytest.raises(InputDataError, match=name.replace(".", r"\.")):
        load_inputs(bad, SHAPE if name.endswith("ARW") else (1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_random_crops_are_windows_of_the_frame_spread_and_seeded(tmp_path):
    """crops > 1: that many windows per raw file, each an exact window of the packed frame, at
    different places, the same for the same seed and different for another."""
    path = _raw_file(tmp_path / "frame.dng")
    packed = load_packed(path)  # (4, 16, 20)
    arrays = load_inputs(path, SHAPE, crops=5, seed=3)
    assert len(arrays) == 5
    windows = {(t, l) for t in range(16 - 8 + 1) for l in range(20 - 8 + 1)}
    places = [next(w for w in windows if np.array_equal(a[0], packed[:, w[0]:w[0] + 8, w[1]:w[1] + 8])) for a in arrays]
    assert len(set(places)) > 1
    again = load_inputs(path, SHAPE, crops=5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again))
    other = load_inputs(path, SHAPE, crops=5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(arrays, other))


def test_hessian_batches_draw_every_batch_from_a_few_frames(tmp_path):
    """Two frames and 6 batches: 3 random crops of each, 6 different batches, and a line that says so."""
    from deployq.qat.checkpoint import InputSpec
    from deployq.train.batches import data_batches

    for i in range(2):
        _raw_file(tmp_path / f"{i}.dng", seed=i)
    batches, what = data_batches(tmp_path, [InputSpec("x", SHAPE)], 4, 6, seed=0)
    assert len(batches) == 6 and len({b["input"][0].numpy().tobytes() for b in batches}) == 6
    assert what.endswith("(3 random crops of each of 2 files, seed 0)") and what.startswith("6 batches of (1, 4, 8, 8)")


def test_rgb_image_is_scaled_and_centre_cropped(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    (array,) = load_inputs(_png(tmp_path / "a.png", image), (1, 3, 10, 12))
    assert array.shape == (1, 3, 10, 12) and array.dtype == np.float32
    np.testing.assert_allclose(array[0], image[5:15, 9:21].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_small_image_is_resized_to_cover_the_input(tmp_path):
    image = np.full((6, 8, 3), 128, dtype=np.uint8)
    (array,) = load_inputs(_png(tmp_path / "small.png", image), (1, 3, 12, 12))
    assert array.shape == (1, 3, 12, 12)
    np.testing.assert_allclose(array, 128 / 255.0, rtol=1e-5)


def test_grayscale_image_for_one_channel_and_16_bit(tmp_path):
    gray = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200
    (array,) = load_inputs(_png(tmp_path / "g.png", gray), (1, 1, 16, 16))
    np.testing.assert_allclose(array[0, 0], gray / 65535.0, rtol=1e-6)


def test_image_channel_mismatch_names_file_and_shapes(tmp_path):
    rgb = _png(tmp_path / "rgb.png", np.zeros((16, 16, 3), np.uint8))
    gray = _png(tmp_path / "gray.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputDataError, match=r"rgb\.png.*3 channel.*\(16, 16, 3\).*1 \(1, 8, 8\)"):
        load_inputs(rgb, (1, 1, 8, 8))
    with pytest.raises(InputDataError, match=r"gray\.png.*1 channel.*3 \(3, 8, 8\)"):
        load_inputs(gray, (1, 3, 8, 8))
    with pytest.raises(InputDataError, match=r"4-D"):
        load_inputs(rgb, (3, 16))


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "count"),
    [((1, 4, 8, 8), 1), ((4, 8, 8), 1), ((5, 4, 8, 8), 5), ((3, 1, 4, 8, 8), 3)],
)
def test_npy_layouts(tmp_path, stored, count):
    data = np.random.default_rng(3).random(stored).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    arrays = load_inputs(tmp_path / "x.npy", SHAPE)
    assert len(arrays) == count
    assert all(a.shape == SHAPE for a in arrays)
    np.testing.assert_array_equal(np.concatenate(arrays).ravel(), data.ravel())


def test_npy_keeps_its_dtype(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(6, dtype=np.int64).reshape(2, 3))
    arrays = load_inputs(tmp_path / "ids.npy", (1, 3))
    assert [a.dtype for a in arrays] == [np.int64, np.int64]
    np.testing.assert_array_equal(arrays[1], [[3, 4, 5]])


def test_npz_arrays_in_sorted_key_order(tmp_path):
    np.savez(tmp_path / "set.npz", b=np.full((4, 8, 8), 2.0), a=np.full((2, 4, 8, 8), 1.0))
    arrays = load_inputs(tmp_path / "set.npz", SHAPE)
    assert [float(a.mean()) for a in arrays] == [1.0, 1.0, 2.0]


def test_array_shape_mismatch_names_file_and_both_shapes(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputDataError, match=r"bad\.npy.*\(2, 3, 8, 8\).*\(1, 4, 8, 8\)"):
        load_inputs(tmp_path / "bad.npy", SHAPE)
    np.savez(tmp_path / "bad.npz", good=np.zeros(SHAPE), wrong=np.zeros((7,)))
    with pytest.raises(InputDataError, match=r"bad\.npz\[wrong\].*\(7\).*\(1, 4, 8, 8\)"):
        load_inputs(tmp_path / "bad.npz", SHAPE)


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputDataError, match=r"obj\.npy"):
        load_inputs(tmp_path / "obj.npy", (1, 1))


# ---------------------------------------------------------------------------------------------
# Folders, limits, batches and errors
# ---------------------------------------------------------------------------------------------


def test_folder_is_read_in_sorted_order_with_limit(tmp_path):
    for name, value in (("c.npy", 2), ("a.npy", 0), ("b.npy", 1)):
        np.save(tmp_path / name, np.full(SHAPE, value))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    arrays = load_inputs(tmp_path, SHAPE)
    assert [int(a.flat[0]) for a in arrays] == [0, 1, 2]
    assert [int(a.flat[0]) for a in load_inputs(tmp_path, SHAPE, limit=2)] == [0, 1]


def test_mixed_folder_of_raw_image_and_array(tmp_path):
    _raw_file(tmp_path / "1.dng")
    _png(tmp_path / "2.png", np.zeros((8, 8, 4), np.uint8))
    np.save(tmp_path / "3.npy", np.zeros((2, 4, 8, 8), np.float32))
    arrays = load_inputs(tmp_path, SHAPE)
    assert len(arrays) == 4 and all(a.shape == SHAPE for a in arrays)


def test_batched_input_shape_groups_samples(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(5 * 4 * 8 * 8, dtype=np.float32).reshape(5, 4, 8, 8))
    with pytest.warns(UserWarning, match="1 sample"):
        arrays = load_inputs(tmp_path / "x.npy", (2, 4, 8, 8))
    assert [a.shape for a in arrays] == [(2, 4, 8, 8), (2, 4, 8, 8)]
    batches = list(iterate_batches(arrays, 3))
    assert len(batches) == 1 and batches[0].shape == (4, 4, 8, 8)
    assert isinstance(batches[0], torch.Tensor)


def test_iterate_batches_keeps_the_last_partial_batch():
    arrays = [np.full((1, 2), i, np.float32) for i in range(5)]
    batches = list(iterate_batches(arrays, 2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert batches[2].tolist() == [[4.0, 4.0]]


def test_path_errors(tmp_path):
    with pytest.raises(InputDataError, match=r"nowhere.*no such file"):
        load_inputs(tmp_path / "nowhere", SHAPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"empty.*folder is empty"):
        load_inputs(tmp_path / "empty", SHAPE)
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    (other / "weights.pt").write_bytes(b"x")
    (other / "long").mkdir()
    found = r"no supported files \(found long/, readme.txt, weights.pt\)"
    with pytest.raises(InputDataError, match=found):
        load_inputs(other, SHAPE)
    with pytest.raises(InputDataError, match=r"readme\.txt.*unsupported file type \.txt"):
        load_inputs(other / "readme.txt", SHAPE)
    np.save(tmp_path / "one.npy", np.zeros((4, 8, 8)))
    with pytest.raises(InputDataError, match="fewer than one model input of batch 2"):
        load_inputs(tmp_path / "one.npy", (2, 4, 8, 8))
