"""deployq run: tiling that reproduces a whole-frame run, raw DNG -> PNG, latency, errors."""

import imageio.v3
import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from deployq.calib.dng import write_dng
from deployq.examples.lowlight.camera import sid_pair
from deployq.examples.lowlight.data import sample_images
from deployq.cli import main
from deployq.infer.engine import RunError, infer, infer_tiled, load_engine, positions, window
from onnx_builders import make_model


def shuffle_model(path, tile=16, kernel=1, seed=0, dynamic=False, positive=False):
    """Conv (4 -> 12 channels) + DepthToSpace(2): a packed-raw -> RGB model in the example's shape.
    `dynamic`: height and width symbolic, and a stride-2 pooling pair that needs even sizes."""
    w = np.random.default_rng(seed).normal(0, 0.3, (12, 4, kernel, kernel)).astype(np.float32)
    w = np.abs(w) if positive else w
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[kernel // 2] * 4),
             helper.make_node("DepthToSpace", ["c"], ["rgb"], blocksize=2, mode="CRD")]
    side_in, side_out = ("h", "w"), ("H", "W")
    if dynamic:  # x + 0 * upsample(maxpool(x)) before the Conv: the same values, but only even sizes run
        nodes[0].input[0] = "x2"
        nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
                 helper.make_node("Mul", ["u", "zero"], ["z"]), helper.make_node("Add", ["x", "z"], ["x2"])] + nodes
    else:
        side_in, side_out = (tile, tile), (2 * tile, 2 * tile)
    consts = {"W": w, "scales": np.array([1, 1, 2, 2], np.float32), "zero": np.zeros((), np.float32)} if dynamic else {"W": w}
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, *side_in])],
                       [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["batch", 3, *side_out])], consts)
    path.write_bytes(model.SerializeToString())
    return path, w


def direct(w, packed):
    """What the pointwise model computes on a whole frame, in numpy."""
    c = np.einsum("oi,ihw->ohw", w[:, :, 0, 0], packed)
    h, wd = packed.shape[1:]
    return c.reshape(3, 2, 2, h, wd).transpose(0, 3, 1, 4, 2).reshape(3, 2 * h, 2 * wd)


def test_tiles_cover_the_frame_and_blend_to_the_whole_frame_result(tmp_path):
    assert positions(40, 16, 12) == [0, 12, 24] and positions(10, 16, 12) == [0]
    assert window(6, 6, 2).min() > 0 and window(6, 6, 2)[3, 3] == 1
    path, w = shuffle_model(tmp_path / "m.onnx")
    engine = load_engine(str(path))
    assert engine.tile == (16, 16) and engine.scale == 2 and engine.channels == 3
    packed = np.random.default_rng(1).uniform(0, 1, (4, 37, 53)).astype(np.float32)
    for overlap in (0, 4, 8):
        out = infer_tiled(engine, packed, engine.tile, overlap=overlap, batch=3)
        assert out.shape == (3, 74, 106)
        np.testing.assert_allclose(out, direct(w, packed), rtol=1e-5, atol=1e-5)
    small = packed[:, :9, :11]  # smaller than one tile: padded, then cropped back
    np.testing.assert_allclose(infer(engine, small), direct(w, small), rtol=1e-5, atol=1e-5)
    with pytest.raises(RunError, match="fixed at 16x16"):
        infer(engine, packed, tile=32)


def test_a_dynamic_size_model_runs_whole_frames_padded_to_its_multiple(tmp_path, monkeypatch):
    path, w = shuffle_model(tmp_path / "m.onnx", dynamic=True)
    engine = load_engine(str(path))
    assert engine.tile is None and engine.multiple == 2 and engine.scale == 2
    calls = []
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda batch: calls.append(batch.shape) or run(batch))
    packed = np.random.default_rng(2).uniform(0, 1, (4, 37, 53)).astype(np.float32)
    whole = infer(engine, packed)
    assert calls == [(1, 4, 38, 54)]  # one call, padded to even sides
    np.testing.assert_allclose(whole, direct(w, packed), rtol=1e-5, atol=1e-5)
    tiled = infer(engine, packed, tile=16, overlap=4)  # tiles when asked
    assert len(calls) > 2 and all(shape[2:] == (16, 16) for shape in calls[1:])
    np.testing.assert_allclose(tiled, direct(w, packed), rtol=1e-5, atol=1e-5)


def test_a_synthetic_dng_becomes_a_png_of_the_right_size(tmp_path):
    path, _ = shuffle_model(tmp_path / "m.onnx", kernel=3)
    image = next(iter(sample_images().values()))[:200, :310]
    pair = sid_pair(image, 250, np.random.default_rng(0))
    short = tmp_path / "short" / "00001_00_0.04s.dng"
    write_dng(short, pair["short"], exposure_time=0.04)
    result = CliRunner().invoke(main, ["run", str(path), str(short), "--ratio", "250", "--out", str(tmp_path / "out"),
                                       "--bench", "3", "--batch", "2"])
    assert result.exit_code == 0, result.output
    png = imageio.v3.imread(tmp_path / "out" / "00001_00_0.04s.png")
    assert png.shape == (200, 310, 3) and png.dtype == np.uint8
    assert "p50" in result.output and "p99" in result.output


def test_bad_inputs_are_named(tmp_path):
    path, _ = shuffle_model(tmp_path / "m.onnx")
    runner = CliRunner()
    out = runner.invoke(main, ["run", str(path), str(tmp_path / "nope.dng")])
    assert out.exit_code == 1 and "nope.dng: no such file" in out.output
    (tmp_path / "fake.dng").write_bytes(b"\0" * 64)
    out = runner.invoke(main, ["run", str(path), str(tmp_path / "fake.dng"), "--ratio", "1"])
    assert out.exit_code == 1 and "fake.dng" in out.output
    out = runner.invoke(main, ["run", str(path), str(tmp_path / "fake.dng"), "--overlap", "16", "--ratio", "1"])
    assert out.exit_code == 1
    gray = make_model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], {})
    (tmp_path / "rgb.onnx").write_bytes(gray.SerializeToString())
    with pytest.raises(RunError, match="packed raw"):
        load_engine(str(tmp_path / "rgb.onnx"))
    np.save(tmp_path / "frame.npy", np.zeros((4, 20, 20), np.float32))
    out = runner.invoke(main, ["run", str(path), str(tmp_path / "frame.npy"), "--overlap", "99", "--out", str(tmp_path / "o")])
    assert out.exit_code == 1 and "--overlap" in out.output


def test_one_bad_input_leaves_no_png_at_all(tmp_path):
    """PNGs appear together once every input is done: a corrupt file after a good one writes nothing."""
    path, _ = shuffle_model(tmp_path / "m.onnx")
    good, bad = tmp_path / "in" / "a_good.npy", tmp_path / "in" / "b_bad.dng"
    good.parent.mkdir()
    np.save(good, np.random.default_rng(0).uniform(0, 1, (4, 20, 20)).astype(np.float32))
    bad.write_bytes(b"II*\0" + b"\0" * 60)
    out = CliRunner().invoke(main, ["run", str(path), str(good.parent), "--ratio", "1", "--out", str(tmp_path / "o")])
    assert out.exit_code == 1 and "b_bad.dng" in out.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    out = CliRunner().invoke(main, ["run", str(path), str(good), "--out", str(tmp_path / "o")])
    assert out.exit_code == 0 and [p.name for p in (tmp_path / "o").iterdir()] == ["a_good.png"]


def test_ratio_must_be_positive_and_a_missing_one_is_said(tmp_path):
    path, _ = shuffle_model(tmp_path / "m.onnx")
    runner = CliRunner()
    for ratio in ("0", "-5"):
        out = runner.invoke(main, ["run", str(path), str(tmp_path), "--ratio", ratio])
        assert out.exit_code == 2 and "--ratio" in out.output
    pair = sid_pair(next(iter(sample_images().values()))[:64, :64], 100, np.random.default_rng(0))
    short = tmp_path / "alone" / "00001_00_0.1s.dng"  # a SID name, but no ../long folder to take the ratio from
    write_dng(short, pair["short"], exposure_time=0.1)
    out = runner.invoke(main, ["run", str(path), str(short), "--out", str(tmp_path / "o")])
    assert out.exit_code == 0 and "no exposure ratio" in out.output and "--ratio" in out.output
    out = runner.invoke(main, ["run", str(path), str(short), "--ratio", "100", "--out", str(tmp_path / "o")])
    assert out.exit_code == 0 and "no exposure ratio" not in out.output


def test_the_ratio_brightens_what_the_model_sees(tmp_path):
    """Pixel values through a known (pointwise) model: the PNG is the model applied to the packed
    raw times --ratio, clipped to [0, 1], then through the file's colour matrix (clipped), in 8 bits."""
    from deployq.calib.raw import pack_bayer, packed_colour_matrix, read_raw

    path, w = shuffle_model(tmp_path / "m.onnx", positive=True)  # keeps light positive: brightening shows
    raw = np.random.default_rng(3).integers(512, 900, size=(48, 64)).astype(np.uint16)  # dark: 0..2.4% of white
    dng = write_dng(tmp_path / "dark.dng", raw)
    image = read_raw(dng)
    packed, colour = pack_bayer(image.bayer), packed_colour_matrix(image.colour_matrix)
    means = {}
    for ratio in (1, 20):
        out = tmp_path / f"r{ratio}"
        result = CliRunner().invoke(main, ["run", str(path), str(dng), "--ratio", str(ratio), "--out", str(out)])
        assert result.exit_code == 0, result.output
        png = imageio.v3.imread(out / "dark.png").astype(np.int64)
        seen = np.clip(np.einsum("ij,jhw->ihw", colour, np.clip(packed * ratio, 0, 1)), 0, 1)
        expected = np.clip(direct(w, seen), 0, 1).transpose(1, 2, 0) * 255
        assert np.abs(png - np.floor(expected + 0.5)).max() <= 1, ratio
        means[ratio] = png.mean()
    assert means[20] > 5 * means[1]
