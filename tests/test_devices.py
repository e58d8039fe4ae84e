"""Device profiles: exact rewrites (ConvTranspose as Conv + DepthToSpace, fixed shapes, learned-weight
float model), refusals of configs a provider cannot run, the provider coverage onnxruntime's own
checker reports, and ORT-format files that run as their ONNX models do."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from deployq.deploy import devices
from deployq.cli import main
from deployq.cli.export import DEVICE_NAMES
from deployq.examples.lowlight import model as lowlight_model
from deployq.exporters.depth_to_space import convtranspose_to_depth_to_space, why_not
from deployq.exporters.graph import CONV_TRANSPOSE_BLOCKS, PassLog, to_blocks, to_model, undo_layout
from deployq.core.qparams import QuantPoint
from deployq.core.runtime import session

ZOO_UNET = "deployq.examples.zoo:unet"
ZOO_UPSAMPLER = "deployq.examples.zoo:upsampler"
CHECKPOINTS = Path(lowlight_model.__file__).with_name("checkpoints")


def _convtranspose_graph(kernel: int, stride: int, activation: str | None = "Relu", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 5, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[kernel, kernel],
                              strides=[stride, stride], name="up")]
    if activation:
        nodes.append(helper.make_node(activation, ["y"], ["z"]))
    out = "z" if activation else "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 7, 9])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    return session(model, optimize=optimize).run(None, {session(model, optimize=False).get_inputs()[0].name: x})[0]


def test_block_weight_is_a_permutation_and_its_inverse_restores_it():
    w = np.arange(6 * 5 * 3 * 3).reshape(6, 5, 3, 3)
    blocks = to_blocks(w)
    assert blocks.shape == (45, 6, 1, 1) and sorted(blocks.ravel()) == sorted(w.ravel())
    assert blocks[(1 * 3 + 2) * 5 + 4, 3, 0, 0] == w[3, 4, 1, 2]  # channel (i*s + j)*C + c holds W[ci, c, i, j]
    assert np.array_equal(undo_layout(blocks, {"layout": CONV_TRANSPOSE_BLOCKS}, w.shape), w)
    assert np.array_equal(undo_layout(blocks, {"layout": CONV_TRANSPOSE_BLOCKS, "blocksize": 3}), w)  # shape from the record


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", None])
def test_float_convtranspose_becomes_conv_and_depth_to_space_with_the_same_values(activation):
    model = _convtranspose_graph(2, 2, activation)
    graph = gs.import_onnx(model)
    log = PassLog()
    convtranspose_to_depth_to_space(graph, log)
    rewritten = to_model(graph.cleanup(), 21)
    assert [n.op_type for n in rewritten.graph.node].count("ConvTranspose") == 0
    assert log.counts["ConvTranspose -> Conv + DepthToSpace"] == 1
    x = np.random.default_rng(1).normal(size=(2, 6, 7, 9)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_overlapping_convtranspose_stays_with_a_note_saying_why():
    graph = gs.import_onnx(_convtranspose_graph(3, 2))
    assert "differs from its strides" in why_not(graph.nodes[0])
    log = PassLog()
    convtranspose_to_depth_to_space(graph, log)
    assert graph.nodes[0].op == "ConvTranspose" and "stays" in log.notes[0] and "'up'" in log.notes[0]


def _record(name: str, kind: str, bits: int, signed: bool = False, symmetric: bool = False) -> QuantPoint:
    return QuantPoint(name=name, kind=kind, bits=bits, signed=signed, symmetric=symmetric,
                      scale=(0.1,), zero_point=(0 if signed else 128,), axis=None)


def test_nnapi_refuses_ten_bit_points_signed_activations_and_affine_weights_and_says_what_to_change():
    records = [_record("head.act", "activation", 10), _record("body.act", "activation", 8, signed=True),
               _record("head.weight", "weight", 8, signed=True, symmetric=False), _record("ok", "activation", 8)]
    with pytest.raises(ValueError) as err:
        devices.check_config(devices.device("nnapi"), records)
    text = str(err.value)
    assert "--device nnapi" in text and "head.act" in text and "--device qnn" in text
    assert "body.act" in text and "--act-signed" in text and "head.weight" in text and "symmetric" in text
    assert "'ok'" not in text and " ok" not in text
    devices.check_config(devices.device("qnn"), [_record("head.act", "activation", 10)])  # QNN runs u16
    devices.check_config(devices.device("cpu"), records)  # the CPU runs anything
    devices.check_config(devices.device("xnnpack"), [_record("body.act", "activation", 8, signed=True)])  # s8 too
    with pytest.raises(ValueError, match="wider than 8 bits"):
        devices.check_config(devices.device("xnnpack"), [_record("head.act", "activation", 10)])


def test_the_cli_offers_every_profile():
    assert DEVICE_NAMES == tuple(devices.DEVICES)
    with pytest.raises(ValueError, match="--device must be one of"):
        devices.device("tpu")


@pytest.fixture(scope="module")
def unet_exports(tmp_path_factory):
    """The zoo UNet (one ConvTranspose) exported for every profile, post-training."""
    root = tmp_path_factory.mktemp("devices")
    torch.save(__import__("deployq.examples.zoo", fromlist=["unet"]).unet().state_dict(), root / "state.pt")
    np.save(root / "calib.npy", np.random.default_rng(0).uniform(0, 1, (4, 1, 3, 32, 32)).astype(np.float32))
    out = {}
    for name in DEVICE_NAMES:
        result = CliRunner().invoke(main, ["export", "--ckpt", str(root / "state.pt"), "--model", ZOO_UNET,
                                           "--input-shape", "1,3,32,32", "--calib", str(root / "calib.npy"),
                                           "--device", name, "--out", str(root / name), "--json", str(root / f"{name}.json")])
        assert result.exit_code == 0, result.output
        out[name] = (root / name, json.loads((root / f"{name}.json").read_text()))
    return out


def test_nnapi_profile_takes_the_whole_model_in_one_partition_and_cpu_does_not(unet_exports):
    coverage = {name: {c["provider"]: c for c in data["coverage"]} for name, (_, data) in unet_exports.items()}
    nnapi = coverage["nnapi"]["NNAPI"]
    assert nnapi["supported"] == nnapi["nodes"] and nnapi["partitions"] == 1
    assert coverage["cpu"]["NNAPI"]["share"] < 0.5  # dynamic batch: the checker refuses every node after it
    assert unet_exports["nnapi"][1]["rewriter"]["ConvTranspose -> Conv + DepthToSpace"] == 1
    model = onnx.load(unet_exports["nnapi"][0] / "model.int8.onnx")
    assert all(d.HasField("dim_value") for d in model.graph.input[0].type.tensor_type.shape.dim)


def test_nnapi_rewrite_keeps_every_integer_code_and_runs_as_integer_kernels(unet_exports, tmp_path):
    cpu = onnx.load(unet_exports["cpu"][0] / "model.int8.onnx")
    nnapi = onnx.load(unet_exports["nnapi"][0] / "model.int8.onnx")
    # the comparison needs an export without the rewrite: qnn's profile keeps the ConvTranspose (the
    # cpu profile rewrites it too, so cpu against nnapi would compare the rewrite with itself)
    plain = onnx.load(unet_exports["qnn"][0] / "model.int8.onnx")
    assert "ConvTranspose" in [n.op_type for n in plain.graph.node]
    assert "ConvTranspose" not in [n.op_type for n in nnapi.graph.node]
    x = np.random.default_rng(3).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(_run(plain, x), _run(nnapi, x))  # the QDQ reference view: identical
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(nnapi.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    assert ops.count("QLinearConv") == sum(n.op_type in ("Conv", "ConvTranspose") for n in cpu.graph.node)


def test_check_passes_on_the_profiled_exports_and_their_ort_files(unet_exports):
    for name in ("nnapi", "coreml"):
        folder = unet_exports[name][0]
        for path in (folder / "model.int8.onnx", folder / "model.int8.ort" if name != "coreml" else None):
            if path is None:
                continue
            result = CliRunner().invoke(main, ["check", "--ckpt", str(folder / "model.int8.pt"), "--model", ZOO_UNET,
                                               "--onnx", str(path), "--random", "2"])
            assert result.exit_code == 0 and "PASS" in result.output, result.output
            if path.suffix == ".ort":
                assert "model.int8.ort vs model.int8.onnx" in result.output and "max 0 LSB" in result.output


def test_coreml_profile_writes_the_float_graph_with_the_dequantized_weights(unet_exports):
    folder, data = unet_exports["coreml"]
    assert {"coreml", "ort", "operators"} <= set(data["files"]) and data["files"]["ort"]["path"].endswith("model.coreml.ort")
    model = onnx.load(folder / "model.coreml.onnx")
    assert not {"QuantizeLinear", "DequantizeLinear", "ConvTranspose"} & {n.op_type for n in model.graph.node}
    coreml = {c["provider"]: c for c in data["coverage"]}["CoreML MLProgram"]
    assert coreml["supported"] == coreml["nodes"] and coreml["partitions"] == 1
    quant = onnx.load(folder / "model.int8.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quant.graph.initializer}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for name, codes in inits.items():
        if not name.endswith(".weight_quantized"):
            continue
        base = name.removesuffix("_quantized")
        scale = inits[f"{base}_scale"].reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(weights[base], codes.astype(np.float32) * scale)  # symmetric: zero point 0
        checked += 1
    assert checked == 6
    float_model = onnx.load(folder / "model.float.onnx")
    x = np.random.default_rng(4).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    assert not np.array_equal(_run(model, x), _run(float_model, x))  # other weights than the float model's
    biases = [n for n in inits if n.endswith(".bias_quantized")]
    assert biases and all(np.array_equal(weights[n.removesuffix("_quantized")],
                                         inits[n].astype(np.float32) * inits[n.removesuffix("_quantized") + "_scale"])
                          for n in biases)


def test_fixed_shape_profiles_refuse_dynamic_hw(unet_exports, tmp_path):
    folder = unet_exports["cpu"][0]
    result = CliRunner().invoke(main, ["export", "--ckpt", str(folder / "model.int8.pt"), "--model", ZOO_UNET,
                                       "--device", "nnapi", "--dynamic-hw", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--device nnapi needs fixed input shapes" in result.output
    assert not (tmp_path / "x").exists()


def test_export_json_to_stdout_is_the_only_output(unet_exports, tmp_path):
    folder = unet_exports["cpu"][0]
    result = CliRunner().invoke(main, ["export", "--ckpt", str(folder / "model.int8.pt"), "--model",
                                                       ZOO_UNET, "--no-ort", "--out", str(tmp_path / "x"), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and "ort" not in data["files"] and len(data["coverage"]) == 3


def test_the_example_for_nnapi_checks_and_runs_from_its_ort_file(tmp_path):
    """The shipped all-8-bit low-light model for NNAPI: one partition; its .ort file computes what
    its .onnx computes optimized as the converter optimized it (NNAPI style: basic level, the QDQ
    graph kept for the provider), and `run` takes it."""
    from deployq.examples.lowlight.data import write_sid_folder

    out = tmp_path / "nnapi"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(CHECKPOINTS / "qat_all8.pt"), "--device", "nnapi",
                                       "--out", str(out), "--json", str(tmp_path / "export.json")])
    assert result.exit_code == 0, result.output
    nnapi = {c["provider"]: c for c in json.loads((tmp_path / "export.json").read_text())["coverage"]}["NNAPI"]
    assert nnapi["supported"] == nnapi["nodes"] and nnapi["partitions"] == 1
    assert "--device nnapi" in (out / "model.int8.required_operators.config").read_text().splitlines()[0]
    result = CliRunner().invoke(main, ["check", "--ckpt", str(CHECKPOINTS / "qat_all8.pt"), "--onnx",
                                       str(out / "model.int8.ort"), "--random", "1"])
    assert result.exit_code == 0 and "model.int8.ort vs model.int8.onnx" in result.output, result.output
    assert "max 0 LSB apart" in result.output.splitlines()[-1]
    write_sid_folder(tmp_path / "raw", 1, 128, seed=5, split="test")
    pngs = {}
    for suffix in ("onnx", "ort"):
        result = CliRunner().invoke(main, ["run", str(out / f"model.int8.{suffix}"), str(tmp_path / "raw" / "short"),
                                           "--out", str(tmp_path / suffix)])
        assert result.exit_code == 0, result.output
        pngs[suffix] = [imageio.v3.imread(p).astype(int) for p in sorted((tmp_path / suffix).glob("*.png"))]
    assert len(pngs["ort"]) == len(pngs["onnx"]) == 1
    # `run` optimizes the .onnx fully (integer kernels); the NNAPI-style .ort keeps the QDQ graph for
    # the provider, which the CPU computes in float: 1-LSB flips inside spread through 65 convolutions
    # into small differences of the picture (measured here: 43 dB PSNR between the two, at most 12 of
    # 255 levels; the pictures themselves are ~23 dB from the ground truth)
    differ = pngs["onnx"][0] - pngs["ort"][0]
    assert 10 * np.log10(255.0**2 / max(np.mean(differ.astype(float) ** 2), 1e-12)) >= 38
    assert np.abs(differ).max() <= 32


@pytest.fixture(scope="module")
def upsampler(tmp_path_factory):
    """The zoo model with a ConvTranspose before a LeakyReLU, one fused with a ReLU and one at the
    output, post-training quantized with `--device cpu` and `--device nnapi`."""
    from deployq.examples import zoo

    root = tmp_path_factory.mktemp("upsampler")
    torch.save(zoo.upsampler().state_dict(), root / "state.pt")
    np.save(root / "calib.npy", np.random.default_rng(0).uniform(0, 1, (4, 1, 3, 32, 32)).astype(np.float32))
    for name in ("cpu", "nnapi"):
        result = CliRunner().invoke(main, ["export", "--ckpt", str(root / "state.pt"), "--model", ZOO_UPSAMPLER,
                                           "--input-shape", "1,3,32,32", "--calib", str(root / "calib.npy"),
                                           "--device", name, "--no-ort", "--out", str(root / name)])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("mode", ["accumulated", "local", "kernel"])
def test_diff_pairs_the_rewritten_layers_under_their_own_names(upsampler, mode):
    from deployq.verify.diff import diff

    x = [{"x": np.random.default_rng(i).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)} for i in range(2)]
    reports = {name: diff(onnx.load(upsampler / name / "model.float.onnx"), onnx.load(upsampler / name / "model.int8.onnx"),
                          x, mode=mode, progress=False) for name in ("cpu", "nnapi")}
    rows = {name: {r.point.name: r for r in rep.rows} for name, rep in reports.items()}
    assert set(rows["nnapi"]) == set(rows["cpu"]) and {"up1", "act1", "act2", "head"} <= set(rows["nnapi"])
    assert not reports["nnapi"].unmatched
    for name in ("up1", "act1", "act2", "head"):  # the same arithmetic: the same error
        assert rows["nnapi"][name].stats.sqnr_db == pytest.approx(rows["cpu"][name].stats.sqnr_db, abs=0.01), name


def test_qnn_runs_ten_bit_activations_that_nnapi_refuses(upsampler, tmp_path):
    (tmp_path / "ten.yaml").write_text("layers:\n  up1: {activation: 10}\n")
    args = ["export", "--ckpt", str(upsampler / "state.pt"), "--model", ZOO_UPSAMPLER, "--input-shape", "1,3,32,32",
            "--calib", str(upsampler / "calib.npy"), "--config", str(tmp_path / "ten.yaml"), "--no-ort"]
    refused = CliRunner().invoke(main, [*args, "--device", "nnapi", "--out", str(tmp_path / "nnapi")])
    assert refused.exit_code == 1 and "1 activation quant points are wider than 8 bits (up1)" in refused.output
    assert "--device qnn" in refused.output and not (tmp_path / "nnapi").exists()
    result = CliRunner().invoke(main, [*args, "--device", "qnn", "--out", str(tmp_path / "qnn")])
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / "qnn" / "model.int8.onnx")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("up1"))
    zero_point = next(i for i in model.graph.initializer if i.name == q.input[2])
    assert zero_point.data_type == TensorProto.UINT16  # u16, the activation type QNN runs
    result = CliRunner().invoke(main, ["check", "--ckpt", str(tmp_path / "qnn" / "model.int8.pt"), "--model",
                                       ZOO_UPSAMPLER, "--onnx", str(tmp_path / "qnn" / "model.int8.onnx"), "--random", "2"])
    assert result.exit_code == 0 and "PASS" in result.output, result.output
