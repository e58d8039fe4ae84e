"""ONNX in (deployq.qat.onnx_import): a float ONNX file someone else wrote -> deployq's QAT model,
its export named after the file's tensors, parity with onnxruntime on the original file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import deployq
from deployq.cli import main
from deployq.qat.onnx_import import OnnxImportError, convert, load

RNG = np.random.default_rng(0)


def _const(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values), name))


def paddle_style(path: Path) -> Path:
    """The way Paddle2ONNX writes a small classifier: weights as Constant nodes, a Conv's bias as an
    Add after it, BatchNorm, hard-swish spelled x * clip(x + 3, 0, 6) / 6, a squeeze-excite gate
    with HardSigmoid(0.2), a reshape through Shape / Slice / Concat, MatMul + Add, Softmax."""
    c = 8
    nodes = [
        _const("w1", RNG.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)),
        _const("b1", RNG.normal(0, 0.1, (1, c, 1, 1)).astype(np.float32)),
        helper.make_node("Conv", ["x", "w1"], ["conv1.tmp_0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["conv1.tmp_0", "b1"], ["conv1.tmp_1"]),
        _const("bn_s", RNG.uniform(0.5, 1.5, c).astype(np.float32)), _const("bn_b", RNG.normal(0, .1, c).astype(np.float32)),
        _const("bn_m", RNG.normal(0, .1, c).astype(np.float32)), _const("bn_v", RNG.uniform(.5, 2, c).astype(np.float32)),
        helper.make_node("BatchNormalization", ["conv1.tmp_1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn.tmp_2"]),
        _const("three", np.array(3, np.float32)), _const("zero", np.array(0, np.float32)),
        _const("six", np.array(6, np.float32)),
        helper.make_node("Add", ["bn.tmp_2", "three"], ["Add@0"]),
        helper.make_node("Clip", ["Add@0", "zero", "six"], ["Clip@0"]),
        helper.make_node("Mul", ["bn.tmp_2", "Clip@0"], ["Mul@0"]),
        helper.make_node("Div", ["Mul@0", "six"], ["hardswish_0.tmp_0"]),
        helper.make_node("GlobalAveragePool", ["hardswish_0.tmp_0"], ["pool.tmp_0"]),
        _const("w2", RNG.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32)),
        _const("b2", RNG.normal(0, 0.1, (c,)).astype(np.float32)),
        helper.make_node("Conv", ["pool.tmp_0", "w2", "b2"], ["se.tmp_0"]),
        helper.make_node("HardSigmoid", ["se.tmp_0"], ["hardsigmoid_0.tmp_0"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["hardswish_0.tmp_0", "hardsigmoid_0.tmp_0"], ["gated.tmp_0"]),
        helper.make_node("Relu", ["gated.tmp_0"], ["relu_0.tmp_0"]),
        helper.make_node("MaxPool", ["relu_0.tmp_0"], ["pool2d_0.tmp_0"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Shape", ["pool2d_0.tmp_0"], ["Shape@0"]),
        helper.make_node("Cast", ["Shape@0"], ["shape.tmp_0"], to=TensorProto.INT32),
        _const("s0", np.array([0], np.int64)), _const("s1", np.array([1], np.int64)),
        helper.make_node("Slice", ["shape.tmp_0", "s0", "s1", "s0"], ["batch.tmp_0"]),
        _const("rest", np.array([-1], np.int32)),
        helper.make_node("Concat", ["batch.tmp_0", "rest"], ["Concat@0"], axis=0),
        helper.make_node("Cast", ["Concat@0"], ["Cast@0"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["pool2d_0.tmp_0", "Cast@0"], ["reshape.tmp_0"]),
        _const("fc_w", RNG.normal(0, 0.3, (c * 4, 3)).astype(np.float32)),
        _const("fc_b", RNG.normal(0, 0.1, (3,)).astype(np.float32)),
        helper.make_node("MatMul", ["reshape.tmp_0", "fc_w"], ["linear.tmp_0"]),
        helper.make_node("Add", ["linear.tmp_0", "fc_b"], ["linear.tmp_1"]),
        helper.make_node("Softmax", ["linear.tmp_1"], ["softmax.tmp_0"], axis=1),
        helper.make_node("Identity", ["softmax.tmp_0"], ["save_infer_model/scale_0.tmp_1"]),
    ]
    graph = helper.make_graph(
        nodes, "paddle_style", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 16, 16])],
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", TensorProto.FLOAT, [-1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def torch_style(path: Path) -> Path:
    """What torch.onnx writes for an ordinary CNN: '/layer/Op_output_0' names, initializers,
    a padded max pool, a residual add, Gemm after Flatten."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.pool = nn.MaxPool2d(3, 2, padding=1)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            y = self.pool(self.stem(x))
            y = torch.relu(y + self.block(y))
            y = torch.nn.functional.leaky_relu(self.up(y), 0.1)
            return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))

    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "n"}},
                      dynamo=False, opset_version=17)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("write", [paddle_style, torch_style])
def test_imported_model_computes_what_onnxruntime_computes(tmp_path: Path, write) -> None:
    path = write(tmp_path / "model.onnx")
    x = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    gm = load(str(path))
    np.testing.assert_allclose(gm(torch.from_numpy(x)).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)


def test_paddle_patterns_become_one_module_each(tmp_path: Path) -> None:
    gm = load(str(paddle_style(tmp_path / "model.onnx")))
    kinds = [type(m).__name__ for m in gm.children()]
    assert kinds.count("Hardswish") == 1  # x * clip(x + 3, 0, 6) / 6: one op, one quant point
    conv = next(m for m in gm.children() if isinstance(m, nn.Conv2d))
    assert conv.bias is not None  # the Add after the Conv is its bias
    fc = next(m for m in gm.children() if isinstance(m, nn.Linear))
    assert fc.bias is not None
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(getattr(t, "__name__", "") in ("add", "truediv") for t in ops)


def test_export_keeps_the_files_names_and_diff_pairs_every_point(tmp_path: Path) -> None:
    original = paddle_style(tmp_path / "model.onnx")
    calib = [RNG.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    result = deployq.export(str(original), calib[0], tmp_path / "out", calib=calib, ort_format=False)
    records = json.loads((tmp_path / "out" / "qparams.json").read_text())
    names = {r["name"] for r in (records["quant_points"] if isinstance(records, dict) else records)}
    file_tensors = {o for n in onnx.load(str(original)).graph.node for o in n.output} | {"x"}
    activations = {n for n in names if not n.endswith(".weight")}
    assert activations and activations <= file_tensors  # quant points are the file's own tensor names
    assert {"hardswish_0.tmp_0", "bn.tmp_2", "hardsigmoid_0.tmp_0"} <= activations
    quant = onnx.load(str(result.files["int8"]))
    assert quant.graph.output[0].name == "save_infer_model/scale_0.tmp_1"
    report = deployq.diff(str(original), str(result.files["int8"]), calib[:2])
    assert not report.unmatched
    assert {r.point.name for r in report.rows if r.point.kind != "weight"} == activations
    assert deployq.check(str(result.files["checkpoint"]), result.files["int8"], calib[:2]).max_lsb <= 1


def test_cli_export_onnx_then_check_and_a_changed_file(tmp_path: Path) -> None:
    original = torch_style(tmp_path / "model.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    for i in range(4):
        np.save(data / f"{i}.npy", RNG.normal(0, 1, (1, 3, 16, 16)).astype(np.float32))
    runner = CliRunner()
    out = runner.invoke(main, ["export", "--onnx", str(original), "--calib", str(data), "--out", str(tmp_path / "o"),
                               "--no-ort"])
    assert out.exit_code == 0, out.output
    ckpt = tmp_path / "o" / "model.int8.pt"
    out = runner.invoke(main, ["check", "--ckpt", str(ckpt), "--onnx", str(tmp_path / "o" / "model.int8.onnx"),
                               "--input", str(data)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["diff", str(original), str(tmp_path / "o" / "model.int8.onnx"), "--input", str(data),
                               "--json", "-"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["rows"]
    file_tensors = {o for n in onnx.load(str(original)).graph.node for o in n.output} | {"image"}
    assert {r["name"] for r in rows if r["kind"] == "activation"} <= file_tensors  # torch.onnx's '/stem/...' names
    original.write_bytes(original.read_bytes() + b"\0")  # the checkpoint's file is no longer the same
    out = runner.invoke(main, ["check", "--ckpt", str(ckpt), "--onnx", str(tmp_path / "o" / "model.int8.onnx")])
    assert out.exit_code == 1 and "changed since the checkpoint was written" in out.output


def test_inspect_lists_the_files_names(tmp_path: Path) -> None:
    path = paddle_style(tmp_path / "model.onnx")
    out = CliRunner().invoke(main, ["inspect", "--onnx", str(path), "--json", "-"])
    assert out.exit_code == 0, out.output
    names = [p["name"] for p in json.loads(out.stdout)]
    assert names[0] == "x" and "hardsigmoid_0.tmp_0" in names and "conv1_tmp_1.weight" in names
    out = CliRunner().invoke(main, ["inspect", "--onnx", str(path), "--leaf", "conv1_tmp_1"])
    assert out.exit_code == 1 and "--leaf" in out.output


def test_unsupported_nodes_are_named_before_any_work(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("TopK", ["a", "k"], ["v", "i"], name="topk_0"),
         helper.make_node("MyOp", ["a"], ["b"], domain="com.vendor", name="custom")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.array([2], np.int64), "k")])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(OnnxImportError, match=r"2 node\(s\): 'topk_0' \(TopK\), 'custom' \(com.vendor:MyOp\)"):
        load(str(path))
    out = CliRunner().invoke(main, ["export", "--onnx", str(path), "--calib", "zeroq", "--out", str(tmp_path / "o")])
    assert out.exit_code == 1 and "TopK" in out.output and not (tmp_path / "o").exists()


def test_symbolic_sizes_need_an_input_shape(tmp_path: Path) -> None:
    model = onnx.load(str(paddle_style(tmp_path / "model.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    onnx.save(model, str(tmp_path / "free.onnx"))
    with pytest.raises(ValueError, match="pass --input-shape"):
        deployq.export(str(tmp_path / "free.onnx"), None, tmp_path / "o", calib="zeroq")


def test_recipe_names_an_onnx_model(tmp_path: Path) -> None:
    from deployq.qat.onnx_import import FACTORY
    from deployq.train.recipe import RecipeError, _model_spec

    path = paddle_style(tmp_path / "model.onnx")
    spec = _model_spec({"model": {"onnx": "model.onnx"}}, tmp_path, "recipe.yaml")
    assert spec.factory == FACTORY and spec.kwargs["path"] == str(path.resolve()) and spec.weights is None
    assert spec.kwargs["shapes"] == [[1, 3, 16, 16]]  # the file's sizes, a symbolic batch as 1
    with pytest.raises(RecipeError, match="without weights"):
        _model_spec({"model": {"onnx": "model.onnx", "weights": "w.pt"}}, tmp_path, "recipe.yaml")


def test_convert_takes_a_model_proto_with_unknown_shapes() -> None:
    """No shape inference (a model it cannot take) still converts where ranks are not needed."""
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    gm = convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), torch.sigmoid(x))


def grid_head(path: Path) -> Path:
    """A head that adds an anchor grid computed from its feature map's shape (Shape, Gather, Range,
    Expand...: how ultralytics' YOLO exports), with any input size."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)

        def forward(self, x):
            y = self.conv(x)
            h, w = y.shape[2], y.shape[3]
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            return torch.sigmoid(y) + torch.stack([gx, gy]).unsqueeze(0).expand(1, 2, h, w)

    torch.onnx.export(Head().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["images"],
                      dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}}, dynamo=False, opset_version=17)
    return path


def test_a_grid_computed_from_shapes_is_a_constant_at_the_given_size(tmp_path: Path) -> None:
    path = grid_head(tmp_path / "head.onnx")
    assert {"Range", "Expand"} & {n.op_type for n in onnx.load(str(path)).graph.node}
    with pytest.raises(OnnxImportError, match="Range"):
        load(str(path))  # sizes unknown: the grid depends on the input
    with pytest.raises(ValueError, match="pass --input-shape"):
        deployq.export(str(path), None, tmp_path / "o", calib="zeroq")
    gm = load(str(path), shapes=[[1, 3, 24, 32]])
    x = RNG.normal(0, 1, (3, 3, 24, 32)).astype(np.float32)  # another batch: it stays symbolic
    np.testing.assert_allclose(gm(torch.from_numpy(x)).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)
    calib = [RNG.normal(0, 1, (1, 3, 24, 32)).astype(np.float32) for _ in range(4)]
    result = deployq.export(str(path), calib[0], tmp_path / "o", calib=calib, ort_format=False)
    assert deployq.check(str(result.files["checkpoint"]), result.files["int8"], calib[:2]).max_lsb <= 1


def test_dynamic_hw_where_the_graph_reads_no_sizes(tmp_path: Path) -> None:
    calib = [RNG.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    result = deployq.export(str(torch_style(tmp_path / "cnn.onnx")), calib[0], tmp_path / "o", calib=calib,
                            dynamic_hw=True, ort_format=False)
    x = RNG.normal(0, 1, (1, 3, 32, 24)).astype(np.float32)  # another size than calibrated at
    assert _ort(result.files["int8"], x).shape == (1, 5)
    grid = [RNG.normal(0, 1, (1, 3, 24, 32)).astype(np.float32) for _ in range(2)]
    with pytest.raises(ValueError, match="--dynamic-hw: this ONNX model computes with sizes"):
        deployq.export(str(grid_head(tmp_path / "head.onnx")), grid[0], tmp_path / "g", calib=grid, dynamic_hw=True)


def test_attention_with_layer_norm_at_opset_17(tmp_path: Path) -> None:
    """LayerNormalization (opset 17), MatMul between activations, Softmax, reshapes from shapes."""
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.qkv, self.proj = nn.LayerNorm(16), nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            n, t, c = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(n, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.transpose(-2, -1) * (c // 2) ** -0.5, dim=-1)
            return x + self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))

    block = Attention().eval()
    nn.init.normal_(block.norm.weight)  # not the defaults (ones, zeros): the importer must carry them
    nn.init.normal_(block.norm.bias)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(block, (torch.randn(1, 6, 16),), str(path), input_names=["tokens"], dynamo=False,
                      opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"LayerNormalization", "Softmax", "MatMul"} <= ops
    gm = load(str(path), shapes=[[1, 6, 16]])
    x = RNG.normal(0, 1, (1, 6, 16)).astype(np.float32)
    np.testing.assert_allclose(gm(torch.from_numpy(x)).detach().numpy(), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_silu_spelled_out_is_one_op_and_one_quant_point(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.Sigmoid()).eval()
    path = tmp_path / "silu.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], dynamo=False, opset_version=17)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Sigmoid") == 2  # SiLU as Sigmoid + Mul
    gm = load(str(path))
    kinds = [type(m).__name__ for m in gm.children()]
    assert kinds.count("SiLU") == 1 and kinds.count("Sigmoid") == 1  # the model's own sigmoid stays one
    x = RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(gm(torch.from_numpy(x)).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-6)
    points = deployq.quant_points(deployq.prepare(gm, torch.zeros(1, 3, 8, 8)))
    activations = [p.op for p in points.values() if p.kind == "activation"]
    assert "Sigmoid" not in activations[:-1] and activations.count("SiLU") == 1


def test_qat_from_an_onnx_recipe_then_export_and_check(tmp_path: Path) -> None:
    """A recipe names the ONNX file; QAT with distillation at ONNX tensor names; the checkpoint
    records the file, so export and check rebuild the model from it."""
    from deployq.examples import zoo
    from deployq.qat import checkpoint as ck
    from deployq.qat.onnx_import import FACTORY
    from deployq.train.loop import train

    teacher = zoo.unet(width=4, seed=1).eval()
    path = tmp_path / "unet.onnx"
    torch.onnx.export(teacher, (torch.zeros(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False, opset_version=17)
    x = RNG.random((16, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        y = teacher(torch.from_numpy(x)).numpy()
    np.savez(tmp_path / "train.npz", input=x, target=y)
    np.savez(tmp_path / "val.npz", input=x[:4], target=y[:4])
    gm = load(str(path), shapes=[[1, 3, 16, 16]])
    layer = next(n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "call_module" and "Relu" in n.target)
    doc = {"model": {"onnx": "unet.onnx"}, "data": {"kind": "npz", "train": "train.npz", "val": "val.npz"},
           "loss": "l1", "distill": {"layers": {layer: 1.0}}, "epochs": 1, "batch_size": 4,
           "calibration_batches": 2, "output_dir": "run"}
    import yaml
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    train(tmp_path / "recipe.yaml", progress=False)
    best = ck.load(tmp_path / "run" / "best.pt")
    assert best.factory == FACTORY and best.factory_kwargs["path"] == str(path.resolve())
    result = deployq.export(str(tmp_path / "run" / "best.pt"), out_dir=tmp_path / "o", ort_format=False)
    assert layer in {o for n in onnx.load(str(result.files["int8"])).graph.node for o in n.input}
    assert deployq.check(str(tmp_path / "run" / "best.pt"), result.files["int8"], [x[:2]]).max_lsb <= 1
