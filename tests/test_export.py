"""End-to-end export: torch fake-quant and the QDQ model agree at every quant point (reference view),
the int8 model runs with integer kernels, files are small, deterministic, and bad input fails cleanly."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import deployq
from deployq.exporters.depth_to_space import SUFFIX as BLOCKS_SUFFIX
from deployq.qat import checkpoint as ck
from deployq.examples.lowlight import model as lowlight
from deployq.cli import main
from deployq.examples import zoo
from deployq.deploy.export import export as run_export
from deployq.qat.loading import resolve_model
from deployq.verify.check import check_parity

LOWLIGHT_CONFIG = str(Path(lowlight.__file__).with_name("quant.yaml"))


def head_tail_config(first, last, **defaults):
    """10-bit input and first/last layers (weights and outputs), as the thesis does."""
    return {**defaults, "input": 10, "layers": {first: {"weight": 10, "activation": 10},
                                                last: {"weight": 10, "activation": 10}}}


CASES = {
    "unet": (zoo.unet, (1, 3, 16, 16), head_tail_config("enc1.0", "out")),
    "resnet": (zoo.resnet, (1, 3, 16, 16), head_tail_config("stem.0", "head", weight={"quantizer": "lsq"},
                                                            activation={"quantizer": "lsq+"})),
    "channel_attention": (zoo.channel_attention, (1, 3, 16, 16),
                          head_tail_config("conv", "out", weight={"quantizer": "dsq_lsq"}, activation={"quantizer": "dsq_lsq"})),
    "space_to_depth": (zoo.space_to_depth, (1, 1, 16, 16), head_tail_config("conv1", "out", activation={"observer": "percentile"})),
    "lowlight": (lowlight.build, (1, 4, 32, 32), LOWLIGHT_CONFIG),  # the thesis' 10-bit head/tail layers
}
FACTORY = {"lowlight": "deployq.examples.lowlight.model:build"}


def trained_checkpoint(tmp_path, name, steps=3):
    """A calibrated model with a few QAT steps, so learned qparams are arbitrary values, saved."""
    factory, shape, config = CASES[name]
    qmodel = deployq.prepare(factory(), torch.randn(*shape), config)
    deployq.calibrate(qmodel, [torch.randn(2, *shape[1:]) for _ in range(4)], progress=False)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    for _ in range(steps):
        x = torch.rand(2, *shape[1:])
        y = qmodel(x)
        loss = sum((t - x.mean()).abs().mean() for t in (y if isinstance(y, tuple) else (y,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = ck.save(tmp_path / f"{name}.pt", qmodel, factory=FACTORY.get(name, f"deployq.examples.zoo:{name}"),
                   inputs=[ck.InputSpec("x", shape)])
    return path, shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_at_every_quant_point(name, tmp_path):
    path, shape = trained_checkpoint(tmp_path, name)
    source = resolve_model(ckpt=str(path))
    result = run_export(source, tmp_path / "out", progress=False)
    batches = [torch.rand(3, *shape[1:]) * 1.5 for _ in range(4)]
    report = check_parity(result.qmodel, result.quant_model, batches)
    assert report.ok(min_exact=0.9999, max_lsb=1), [p.to_json() for p in report.failures()]
    names = {p.name for p in report.points}
    assert names == set(deployq.quant_points(result.qmodel))  # every quant point was compared
    assert any(p.bits == 10 for p in report.points)
    # Both models running freely from the input (accumulated view): a one-step flip from float
    # summation order spreads downstream, so deep models show more differences there; but the first
    # quant point (topological order) with any difference, where it starts, is off by at most 1 LSB.
    free = check_parity(result.qmodel, result.quant_model, batches, local=False)
    first = next((p for p in free.points if p.kind != "weight" and p.exact < p.elements), None)
    assert first is None or first.max_lsb <= 1, first.to_json()
    # the final outputs agree too
    feeds = {source.inputs[0].name: batches[0].numpy()}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    onnx_out = ort.InferenceSession(result.quant_model.SerializeToString(), so).run(None, feeds)[0]
    torch_out = result.qmodel(batches[0])
    torch_out = (torch_out[0] if isinstance(torch_out, tuple) else torch_out).detach().numpy()
    assert np.abs(onnx_out - torch_out).max() <= 4 * max(r.scale[0] for r in result.records.values() if r.kind == "activation")
    assert np.mean(np.abs(onnx_out - torch_out) < 1e-6) > 0.9


def test_qparams_file_and_integer_weight_storage(tmp_path):
    """qparams.json holds every quant point with the fields of its schema; weights are integer
    initializers: int8 at 8 bits, int16 at 10 bits with codes beyond the 8-bit range (not saturated)."""
    path, _ = trained_checkpoint(tmp_path, "unet", steps=1)
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    data = json.loads(result.files["qparams"].read_text())
    assert data["format"] == "deployq-qparams"
    points = {p["name"]: p for p in data["quant_points"]}
    assert set(points) == set(deployq.quant_points(result.qmodel))
    for p in points.values():
        bits = p["bits"]
        assert (p["qmin"], p["qmax"]) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if p["signed"] else (0, 2 ** bits - 1))
        assert all(s > 0 for s in p["scale"]) and all(p["qmin"] <= z <= p["qmax"] for z in p["zero_point"])
        assert p["axis"] in ((0, 1) if p["kind"] == "weight" else (None,))  # 1: ConvTranspose's output channels
    graph = result.quant_model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    widths = set()
    for p in (p for p in points.values() if p["kind"] == "weight"):
        layer = next(n for n in graph.node if n.name == p["layer"])
        dq = producers[layer.input[1]]
        codes = inits[dq.input[0]]
        assert dq.op_type == "DequantizeLinear" and codes.dtype == (np.int8 if p["bits"] <= 8 else np.int16), p["name"]
        assert p["qmin"] <= codes.min() and codes.max() <= p["qmax"]
        if p["bits"] == 10:
            assert np.abs(codes).max() > 127, p["name"]
        widths.add(p["bits"])
    assert widths == {8, 10}


def optimized_ops(model_bytes, path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path)
    so.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return session, [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int8_model_uses_integer_kernels_and_is_small(tmp_path):
    qmodel = deployq.prepare(zoo.unet(width=32), torch.randn(1, 3, 32, 32))
    deployq.calibrate(qmodel, [torch.randn(2, 3, 32, 32) for _ in range(3)], progress=False)
    path = ck.save(tmp_path / "u.pt", qmodel, factory="deployq.examples.zoo:unet", factory_kwargs={"width": 32},
                   inputs=[ck.InputSpec("x", (1, 3, 32, 32))])
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    sizes = result.sizes()
    assert sizes["int8"] <= 0.30 * sizes["float"], sizes
    session, ops = optimized_ops(result.files["int8"].read_bytes(), tmp_path / "opt.onnx")
    convs = sum(n.op_type == "Conv" for n in result.quant_model.graph.node)
    # the UNet's 5 Conv and its ConvTranspose, exported as Conv + DepthToSpace: all integer kernels
    assert convs == 6 and ops.count("QLinearConv") == convs
    assert not {"Conv", "FusedConv", "ConvTranspose"} & set(ops)
    y = session.run(None, {"x": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)})[0]
    assert y.shape == (2, 3, 32, 32) and np.isfinite(y).all()


def test_export_is_deterministic(tmp_path):
    path, _ = trained_checkpoint(tmp_path, "unet", steps=1)
    source = resolve_model(ckpt=str(path))
    a = run_export(source, tmp_path / "a", progress=False)
    b = run_export(resolve_model(ckpt=str(path)), tmp_path / "b", progress=False)
    for key in ("float", "int8", "qparams"):
        assert a.files[key].read_bytes() == b.files[key].read_bytes(), key


def test_four_bit_layers_are_exact_too(tmp_path):
    """Codes narrower than int8 are clipped before QuantizeLinear, like the 10-bit ones in int16."""
    qmodel = deployq.prepare(zoo.unet(), torch.rand(*CASES["unet"][1]),
                             {"weight": {"bits": 4}, "activation": {"bits": 4}, "input": 8})
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16) for _ in range(3)], progress=False)
    path = ck.save(tmp_path / "u4.pt", qmodel, factory="deployq.examples.zoo:unet", inputs=[ck.InputSpec("x", (1, 3, 16, 16))])
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    report = check_parity(result.qmodel, result.quant_model, [torch.rand(2, 3, 16, 16) * 2 for _ in range(2)])
    assert report.ok() and {p.bits for p in report.points} == {4, 8}
    clips = [n for n in result.quant_model.graph.node if n.op_type == "Clip"]
    # one per 4-bit point, and the copy on the ConvTranspose's block-layout output (exporters/depth_to_space.py)
    copies = [n for n in clips if BLOCKS_SUFFIX in n.name]
    assert len(copies) == 1
    assert len(clips) - len(copies) == sum(r.bits == 4 for r in result.records.values() if r.kind != "weight")


def test_per_tensor_weights_get_an_int32_bias_too(tmp_path):
    """One weight scale per layer: the int32 bias scale s_in·s_w is a scalar, and stays exact."""
    qmodel = deployq.prepare(zoo.plain_cnn(), torch.rand(1, 3, 16, 16), {"weight": {"scheme": "per_tensor_symmetric"}})
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16) for _ in range(2)], progress=False)
    result = deployq.export(qmodel, torch.rand(1, 3, 16, 16), tmp_path, ort_format=False)
    biases = [i for i in result.quant_model.graph.initializer if i.name.endswith(".bias_quantized")]
    assert biases and all(i.data_type == onnx.TensorProto.INT32 for i in biases)
    assert deployq.check(qmodel, result.files["int8"], inputs=[torch.rand(2, 3, 16, 16)]).ok(max_lsb=1)


class PassThroughGate(torch.nn.Module):
    """gMLP's spatial gate at initialization: weights ~1e-6, bias 1 (the gate passes everything),
    so bias / (s_in·s_w) is past the int32 range a bias code may take."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gate = torch.nn.Conv2d(8, 8, 1)
        torch.nn.init.normal_(self.gate.weight, std=1e-6), torch.nn.init.ones_(self.gate.bias)

    def forward(self, x):
        y = self.stem(x)
        return y * self.gate(y)


def test_a_bias_large_next_to_its_weights_keeps_its_value(tmp_path):
    """The weight scale is bounded so the bias codes fit in int32: the gate stays ~1 in the
    integer model (saturated, it fell to ~0.7 and the output to ~10 dB)."""
    x = torch.randn(1, 3, 16, 16)
    model = PassThroughGate().eval()
    qmodel = deployq.prepare(model, x)
    deployq.calibrate(qmodel, [torch.randn(2, 3, 16, 16) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, x, tmp_path, ort_format=False, progress=False)
    inputs = [torch.randn(2, 3, 16, 16)]
    assert deployq.check(qmodel, result.files["int8"], inputs=inputs).ok(max_lsb=1)
    codes = numpy_helper.to_array(next(i for i in result.quant_model.graph.initializer
                                       if i.name.startswith("gate") and i.name.endswith(".bias_quantized")))
    assert np.abs(codes).max() <= 2**30
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=inputs, mode="local")
    assert {r.point.name: r.stats.sqnr_db for r in report.rows}["gate"] > 40


def test_int16_and_vnni_variants_keep_parity(tmp_path):
    path, shape = trained_checkpoint(tmp_path, "resnet", steps=1)
    batches = [torch.randn(2, *shape[1:]) for _ in range(2)]
    for kwargs in ({"target": "int16"}, {"act_signed": True, "weight_bits": 7}):
        result = run_export(resolve_model(ckpt=str(path)), tmp_path / "v", progress=False, **kwargs)
        report = check_parity(result.qmodel, result.quant_model, batches)
        if "target" in kwargs:
            # a 16-bit step is 256x finer: a one-step flip upstream (float summation order)
            # moves downstream codes by a few steps, so the bound is looser there
            assert report.ok(min_exact=0.95, max_lsb=4) and report.exact_fraction > 0.99, kwargs
        else:
            assert report.ok(), kwargs
        bits = {r.bits for r in result.records.values() if r.kind == "weight"}
        assert bits == ({16} if "target" in kwargs else {7, 10})
    signed = {r.signed for r in result.records.values() if r.kind != "weight"}
    assert signed == {True}


def test_ptq_from_a_plain_state_dict(tmp_path):
    model = zoo.unet()
    torch.save(model.state_dict(), tmp_path / "float.pth")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32))
    runner = CliRunner()
    args = ["export", "--ckpt", str(tmp_path / "float.pth"), "--model", "deployq.examples.zoo:unet",
            "--input-shape", "1,3,16,16", "--out", str(tmp_path / "out")]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "--calib" in result.output
    result = runner.invoke(main, args + ["--calib", str(tmp_path / "calib.npy")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.float.onnx", "model.int8.onnx", "qparams.json", "model.int8.pt",
                                               "model.int8.ort", "model.int8.required_operators.config"}
    # the calibrated model is a deployq checkpoint: check runs on what post-training quantization made
    result = runner.invoke(main, ["check", "--ckpt", str(out / "model.int8.pt"), "--onnx", str(out / "model.int8.onnx")])
    assert result.exit_code == 0 and "PASS" in result.output, result.output


@pytest.mark.parametrize("make_args,message", [
    (lambda d: ["--ckpt", str(d / "missing.pt")], "does not exist"),
    (lambda d: ["--ckpt", str(d / "corrupt.pt")], "corrupt.pt"),
    (lambda d: ["--ckpt", str(d / "float.pth"), "--model", "no_such_module_xyz:build", "--input-shape", "1,3,16,16"], "cannot import"),
    (lambda d: ["--ckpt", str(d / "float.pth"), "--model", "deployq.examples.zoo:unet", "--input-shape", "1,3,16,16",
                "--config", str(d / "bad.yaml"), "--calib", str(d / "calib.npy")], "'enc9' matches no quant point"),
    (lambda d: ["--ckpt", str(d / "float.pth"), "--model", "deployq.examples.zoo:unet", "--input-shape", "1,3,16,16",
                "--config", str(d / "perchannel.yaml"), "--calib", str(d / "calib.npy")], "per-channel activations of 10 bits"),
])
def test_bad_input_fails_cleanly_without_partial_files(tmp_path, make_args, message):
    torch.save(zoo.unet().state_dict(), tmp_path / "float.pth")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "bad.yaml").write_text("layers:\n  enc9: {activation: 10}\n")
    (tmp_path / "perchannel.yaml").write_text("layers:\n  cat: {activation: '10 per_channel_affine'}\n")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", *make_args(tmp_path), "--out", str(out)])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not out.exists() or not any(out.iterdir())


def test_files_left_by_an_earlier_export_are_pointed_out(tmp_path):
    path, _ = trained_checkpoint(tmp_path, "unet", steps=1)
    run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", target="fp32", progress=False)
    assert set(result.files) == {"float", "ort", "operators"} and result.files["ort"].name == "model.float.ort"
    stale = next((n for n in result.notes if "from an earlier export" in n), "")
    for name in ("model.int8.onnx", "model.int8.ort", "model.int8.required_operators.config", "qparams.json"):
        assert name in stale, result.notes


@pytest.mark.parametrize("bits", [8, 10])
def test_parity_holds_on_exact_half_step_ties(tmp_path, bits):
    """Inputs exactly half-way between two codes: x / s = k + ½ with a power-of-two scale, so the
    division is exact and only the tie rule decides. onnxruntime rounds half to even; so must
    the quantizers' own forward (round-half-up or multiplying by 1/s would differ here)."""
    qmodel = deployq.prepare(zoo.plain_cnn(), torch.zeros(1, 3, 16, 16), {"input": bits})
    deployq.calibrate(qmodel, [torch.rand(1, 3, 16, 16)], progress=False)
    scale = 2.0 ** -6
    qmodel.get_submodule("act_quant.x").set_qparams(np.array(scale, np.float32), np.array(0))
    path = ck.save(tmp_path / "ties.pt", qmodel, factory="deployq.examples.zoo:plain_cnn",
                   inputs=[ck.InputSpec("x", (1, 3, 16, 16))])
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    k = torch.randint(0, 2 ** bits - 2, (2, 3, 16, 16))
    ties = ((k.float() + 0.5) * scale)
    report = check_parity(result.qmodel, result.quant_model, [ties])
    x = next(p for p in report.points if p.name == "x")
    assert x.elements == ties.numel() and x.exact == x.elements  # every tie rounded alike
    assert report.ok(min_exact=0.9999, max_lsb=1)


def test_check_catches_a_fault_in_a_quantizers_own_forward(tmp_path, monkeypatch):
    """The torch side of check runs the quantizer modules' forward: rounding half up there (a
    plausible bug that the shared formula would not show) is caught on ties."""
    from deployq.qat import fake_quant

    qmodel = deployq.prepare(zoo.plain_cnn(), torch.zeros(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.rand(1, 3, 16, 16)], progress=False)
    qmodel.get_submodule("act_quant.x").set_qparams(np.array(2.0 ** -6, np.float32), np.array(0))
    path = ck.save(tmp_path / "f.pt", qmodel, factory="deployq.examples.zoo:plain_cnn",
                   inputs=[ck.InputSpec("x", (1, 3, 16, 16))])
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False)
    ties = (torch.randint(0, 200, (1, 3, 16, 16)).float() + 0.5) * 2.0 ** -6
    def half_up(ctx, x, s, zp, alpha, floor, rule, g):  # (a "fixed" quantizer stores s itself)
        shape = [-1 if axis == rule.axis else 1 for axis in range(x.ndim)] if s.ndim else []
        s, zp = s.reshape(shape), zp.reshape(shape)
        return (torch.clamp(torch.floor(x / s + 0.5) + zp, rule.qmin, rule.qmax) - zp) * s

    monkeypatch.setattr(fake_quant.FakeQuantize, "forward", staticmethod(half_up))
    report = check_parity(result.qmodel, result.quant_model, [ties])
    x = next(p for p in report.points if p.name == "x")
    assert x.exact < 0.75 * ties.numel() and not report.ok()  # half-up and half-to-even agree on half the ties
