"""deployq diff: matching by name, the four modes, a found fault, quantize_static models, errors."""

import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import deployq
from deployq.qat import checkpoint as ck
from deployq.cli import main
from deployq.verify.diff import diff, saturation_warning
from deployq.verify.match import match
from deployq.verify.stats import Stats
from deployq.examples import zoo
from deployq.deploy.export import export as run_export
from deployq.qat.loading import resolve_model
from deployq.core.runtime import ModelFileError, cpu_isa

SHAPE = (1, 3, 16, 16)


def calibration_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(SHAPE, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A well-calibrated UNet (inputs in [0, 1)) exported to float + int8 ONNX."""
    tmp = tmp_path_factory.mktemp("diff")
    qmodel = deployq.prepare(zoo.unet(width=8), torch.rand(*SHAPE))
    deployq.calibrate(qmodel, calibration_inputs(16), progress=False)
    path = ck.save(tmp / "u.pt", qmodel, factory="deployq.examples.zoo:unet", factory_kwargs={"width": 8},
                   inputs=[ck.InputSpec("x", SHAPE)])
    result = run_export(resolve_model(ckpt=str(path)), tmp / "out", progress=False)
    return result, path


def feeds(n=4, seed=1):
    return [{"x": t.numpy()} for t in calibration_inputs(n, seed)]


def test_every_quant_point_is_matched_by_name(exported):
    result, _ = exported
    m = match(result.float_model, result.quant_model)
    activations = {p.name for p in m.activations}
    assert activations == {r.name for r in result.records.values() if r.kind != "weight"}
    assert {p.name for p in m.weights} == {r.name for r in result.records.values() if r.kind == "weight"}
    assert not m.unmatched
    assert dict((p.name, p.inputs) for p in m.activations)["dec.0"] == ("cat",)


def test_accumulated_report_streams_metrics_in_graph_order(exported):
    result, _ = exported
    report = diff(result.float_model, result.quant_model, feeds(), progress=False)
    names = [r.point.name for r in report.rows if r.point.kind == "activation"]
    assert names[0] == "x" and names[-1] == "out"
    assert report.gate_sqnr > 20 and all(r.stats.n > 0 for r in report.rows)
    x = next(r for r in report.rows if r.point.name == "x")
    assert x.stats.lsb[1] == x.stats.lsb[2] == 0  # the input is the float input, exactly rounded


def inject_fault(model, name, factor=4.0):
    faulty = onnx.ModelProto()
    faulty.CopyFrom(model)
    q = next(n for n in faulty.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    init = next(i for i in faulty.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return faulty


@pytest.mark.parametrize("mode", ["local", "sensitivity"])
@pytest.mark.parametrize("victim", ["enc2.2", "dec.1"])
def test_an_injected_scale_fault_ranks_first(exported, mode, victim):
    result, _ = exported
    faulty = inject_fault(result.quant_model, victim)
    report = diff(result.float_model, faulty, feeds(), mode=mode, progress=False)
    assert report.ranking()[0].point.name == victim, [(r.point.name, r.stats.sqnr_db) for r in report.ranking()[:4]]


@pytest.mark.skipif(not cpu_isa().get("vnni") and cpu_isa()["arch"] in ("x86_64", "amd64"),
                    reason="x86 without VNNI: onnxruntime's u8 x s8 kernels saturate int16 partial sums by design "
                           "(docs/design.md, contract 5); test_saturation_warning_on_rows_of_a_real_match covers that CPU")
@pytest.mark.parametrize("variant", [{}, {"act_signed": True}, {"weight_bits": 7}])
def test_kernel_mode_integer_kernels_stay_within_one_lsb(exported, tmp_path, variant):
    """u8 x s8, s8 x s8 and 7-bit weights: on a CPU with VNNI (or not x86) no variant saturates."""
    _, path = exported
    result = run_export(resolve_model(ckpt=str(path)), tmp_path / "out", progress=False, **variant)
    report = diff(result.float_model, result.quant_model, feeds(2), mode="kernel", progress=False)
    assert report.rows and all(r.stats.lsb[2] == 0 for r in report.rows)
    assert report.isa["arch"] and ("vnni" in report.isa)


def test_saturation_warning_on_rows_of_a_real_match(exported):
    """The rows of a real kernel-mode report, with the LSB histogram a CPU without VNNI gives one
    8-bit integer layer (u8 x s8 products saturating int16): the warning names it and the fix,
    only where the CPU lacks VNNI."""
    result, _ = exported
    report = diff(result.float_model, result.quant_model, feeds(1), mode="kernel", progress=False)
    for row in report.rows:  # every layer clean, as on a CPU with VNNI (this one may have none)
        row.stats.lsb = [1000, 0, 0]
    victim = next(r for r in report.rows if r.point.bits == 8 and r.point.layer)
    victim.stats.lsb = [900, 50, 50]  # what saturation looks like: 5 % of the codes more than 1 LSB off
    message = saturation_warning(report.rows, {"avx2": True, "vnni": False})
    assert victim.point.name in message and "--act-signed" in message and "--weight-bits 7" in message
    assert saturation_warning(report.rows, {"avx2": True, "vnni": True}) is None
    victim.stats.lsb = [1000, 0, 0]
    assert saturation_warning(report.rows, {"avx2": True, "vnni": False}) is None


def test_metrics_match_a_hand_computation():
    """SQNR = 10·log10(Σx² / Σ(x − x̂)²), cosine = Σx·x̂ / √(Σx²·Σx̂²), over every batch added."""
    stats = Stats()
    stats.add(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    stats.add(np.array([[3.0]]), np.array([[2.0]]))
    # Σx² = 14, Σ(x − x̂)² = 0.25 + 1 = 1.25, Σx·x̂ = 1 + 5 + 6 = 12, Σx̂² = 1 + 6.25 + 4 = 11.25
    assert stats.sqnr_db == pytest.approx(10 * np.log10(14 / 1.25))
    assert stats.cosine == pytest.approx(12 / np.sqrt(14 * 11.25))
    assert stats.mse == pytest.approx(1.25 / 3) and stats.max_err == pytest.approx(1.0)


def test_quantize_static_model_with_batchnorm(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deployq.deploy.float_graph import export_float

    float_model = export_float(deployq.prepare(zoo.resnet(), torch.rand(*SHAPE)), (torch.rand(*SHAPE),))
    assert sum(n.op_type == "BatchNormalization" for n in float_model.graph.node) == 5
    onnx.save(float_model, tmp_path / "f.onnx")
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds(8, seed=3))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    quant = onnx.load(tmp_path / "q.onnx")
    q_sources = {n.input[0] for n in quant.graph.node if n.op_type == "QuantizeLinear"}
    weight_dqs = [n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    m = match(float_model, quant)
    assert not m.unmatched
    assert {p.source for p in m.activations} == q_sources  # every quantized activation
    assert len(m.weights) == len(weight_dqs) == 6  # every weight, against BN-folded float weights
    report = diff(float_model, quant, feeds(2), progress=False)
    assert report.gate_sqnr > 20
    assert all(r.stats.sqnr_db > 30 for r in report.rows if r.point.kind == "weight")


def test_cli_writes_json_and_self_contained_html(exported, tmp_path):
    result, _ = exported
    out = CliRunner().invoke(main, ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "2",
                                    "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert "verdict: accumulated" in out.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["name"] for r in data["rows"]} >= {"x", "cat", "out", "out.weight"}
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "enc1.2" in page
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]+)"', page) + re.findall(r"url\(", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)  # nothing to fetch: offline
    # the output pictures (float, quantized, error) of the image model, as PNGs that decode
    import base64

    import imageio.v3
    images = [imageio.v3.imread(base64.b64decode(link.split(",", 1)[1])) for link in links]
    assert len(images) == 3 and images[0].shape == images[1].shape == images[2].shape == (16, 16, 3)
    assert "<h2>Activations (" in page and "<h2>Weights (" in page and "Per-channel weight ranges" in page
    acts = page.split("<h2>Activations (")[1].split("<h2>Weights (")[0]
    assert "enc1.2" in acts and "out.weight" not in acts  # the sections do not mix
    assert 'stroke="#c33"' in acts  # a value histogram with its representable range marked


def test_fail_below_gates_ci(exported):
    result, _ = exported
    args = ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "2"]
    assert CliRunner().invoke(main, args + ["--fail-below", "5"]).exit_code == 0
    out = CliRunner().invoke(main, args + ["--fail-below", "200"])
    assert out.exit_code == 3 and "FAIL" in out.output  # the gate: distinct from errors (1)


def test_fail_below_gates_on_the_worst_of_several_outputs(tmp_path):
    """Two heads, one with 2-bit weights: the gate is the worse output's SQNR, so a threshold
    between the two outputs' fails (a gate on the best output, or on their pooled error, passes)."""
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fine = torch.nn.Conv2d(8, 4, 1)
            self.coarse = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.body(x))
            return self.fine(y), self.coarse(y) * 0.01  # the coarse output is also the smaller one

    x = torch.rand(1, 3, 8, 8)
    qmodel = deployq.prepare(TwoHeads().eval(), x, {"layers": {"fine": {"weight": 16, "activation": 16},
                                                               "coarse": {"weight": 2}}})
    deployq.calibrate(qmodel, [torch.rand(2, 3, 8, 8) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, x, tmp_path, ort_format=False, progress=False)
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=[torch.rand(2, 3, 8, 8)])
    fine, coarse = sorted(s.sqnr_db for s in report.outputs.values())[::-1]
    assert fine > coarse + 10
    assert report.gate_sqnr == coarse
    between = (fine + coarse) / 2
    assert not report.passed(between) and report.passed(coarse - 1)
    args = ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "2",
            "--fail-below", f"{between:.1f}"]
    assert CliRunner().invoke(main, args).exit_code == 3


def test_weights_after_a_batchnorm_quant_point_pair_with_their_own_float_weights(tmp_path):
    """A BatchNorm that follows an activation is its own quant point and stays a node; the next
    1x1 Conv's float weights are the reference of its weight row (folding the BN forward into
    them, as the copy diff matches against once did, paired a weight with another)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(8),
                                torch.nn.Conv2d(8, 4, 1))
    model[2].running_mean.uniform_(0.5, 1.0), model[2].running_var.uniform_(2.0, 4.0), model.eval()
    x = torch.rand(1, 3, 8, 8)
    qmodel = deployq.prepare(model, x, {"weight": 16, "activation": 16})
    deployq.calibrate(qmodel, [torch.rand(2, 3, 8, 8) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, x, tmp_path, ort_format=False, progress=False)
    assert "BatchNormalization" in [n.op_type for n in result.quant_model.graph.node]
    report = deployq.diff(result.float_model, result.quant_model, inputs=[torch.rand(2, 3, 8, 8)], mode="local")
    rows = {r.point.name: r.stats.sqnr_db for r in report.rows}
    assert rows["3.weight"] > 50 and rows["2"] > 50, rows


def test_mismatched_models_are_clear_errors(exported, tmp_path):
    result, _ = exported
    runner = CliRunner()
    (tmp_path / "junk.onnx").write_bytes(b"definitely not onnx")
    out = runner.invoke(main, ["diff", str(result.files["float"]), str(tmp_path / "junk.onnx"), "--random", "1"])
    assert out.exit_code == 1 and "junk.onnx is not an ONNX model" in out.output
    from deployq.deploy.float_graph import export_float

    other = export_float(deployq.prepare(zoo.resnet(), torch.rand(1, 3, 8, 8)), (torch.rand(1, 3, 8, 8),))
    onnx.save(other, tmp_path / "other.onnx")
    out = runner.invoke(main, ["diff", str(tmp_path / "other.onnx"), str(result.files["int8"]), "--random", "1"])
    assert out.exit_code == 1 and "different inputs" in out.output
    same_inputs = export_float(deployq.prepare(zoo.resnet(), torch.rand(*SHAPE)), (torch.rand(*SHAPE),))
    with pytest.raises(ModelFileError, match="no quant point in common"):
        match(same_inputs, same_inputs)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(result.quant_model)
    keep = {i.name for i in renamed.graph.input} | {i.name for i in renamed.graph.initializer}
    for node in renamed.graph.node:  # every computed tensor renamed: only the input still pairs up
        node.input[:] = [n if n in keep or not n else f"other_{n}" for n in node.input]
        node.output[:] = [f"other_{n}" for n in node.output]
    for out in renamed.graph.output:
        out.name = f"other_{out.name}"
    with pytest.raises(ModelFileError, match="share only their inputs"):
        match(result.float_model, renamed)


def test_check_compares_torch_and_onnx_codes(exported, tmp_path):
    result, path = exported
    out = CliRunner().invoke(main, ["check", "--ckpt", str(path), "--onnx", str(result.files["int8"]),
                                    "--json", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    assert "PASS" in out.output
    assert json.loads((tmp_path / "c.json").read_text())["max_lsb"] <= 1
    faulty = inject_fault(result.quant_model, "enc2.2")
    onnx.save(faulty, tmp_path / "faulty.onnx")
    out = CliRunner().invoke(main, ["check", "--ckpt", str(path), "--onnx", str(tmp_path / "faulty.onnx")])
    assert out.exit_code == 3 and "enc2.2" in out.output  # a failed gate


def test_the_jump_marker_column_shows_only_with_a_marked_row(exported):
    from rich.console import Console

    from deployq.verify.report import table

    def header_and_text(report):
        console = Console(width=250, record=True)
        console.print(table(report))
        text = console.export_text()
        return next(line for line in text.splitlines() if "name" in line), text

    result, _ = exported
    report = diff(result.float_model, result.quant_model, feeds(2), progress=False)
    jump = report.first_jump
    assert jump is not None  # the input is exact; the first layer's rounding is a jump
    header, text = header_and_text(report)
    assert f"<- error jumps (-{jump.drop_db:.1f} dB)" in text and header.count("┃") == 10
    jump.jump = False
    header, text = header_and_text(report)
    assert "<- error jumps" not in text and header.count("┃") == 9  # no empty marker column


def test_weight_widths_are_read_off_16_bit_codes():
    from deployq.verify.match import _weight_bits

    assert _weight_bits(np.array([-512, 3, 511], np.int16)) == 10  # 10-bit affine uses -512
    assert _weight_bits(np.array([-511, 500], np.int16)) == 10
    assert _weight_bits(np.array([0, 1023], np.uint16)) == 10
    assert _weight_bits(np.array([-32768, 0], np.int16)) == 16


def test_a_dynamic_hw_export_takes_its_shape_from_the_input_files(exported, tmp_path):
    """diff and check on a --dynamic-hw export read height and width off the first --input file
    (an array, an image or a raw frame at its own size): no --input-shape needed."""
    import imageio.v3 as iio

    from deployq.calib.data import InputDataError
    from deployq.calib.feeds import shape_from_files
    from deployq.core.runtime import inputs_of

    result = run_export(resolve_model(ckpt=str(exported[1])), tmp_path / "dyn", dynamic_hw=True, ort_format=False,
                        progress=False)
    info = inputs_of(result.quant_model)[0]
    assert info.free == (2, 3)
    rng = np.random.default_rng(3)
    arrays, images = tmp_path / "arrays", tmp_path / "images"
    arrays.mkdir(), images.mkdir()
    for i in range(2):
        np.save(arrays / f"{i}.npy", rng.uniform(0, 1, (1, 3, 48, 40)).astype(np.float32))
    iio.imwrite(images / "a.png", (rng.uniform(0, 1, (24, 56, 3)) * 255).astype(np.uint8))
    assert shape_from_files(arrays, info) == (1, 3, 48, 40)
    assert shape_from_files(images, info) == (1, 3, 24, 56)
    iio.imwrite(tmp_path / "gray.png", np.zeros((24, 56), np.uint8))
    with pytest.raises(InputDataError, match=r"gray\.png.*\(1, 24, 56\).*\(\?, 3, \?, \?\)"):
        shape_from_files(tmp_path / "gray.png", info)

    report = deployq.diff(result.files["float"], result.files["int8"], arrays)
    assert len(report.rows) == len(exported[0].records) and min(r.stats.sqnr_db for r in report.rows) > 20
    cli = CliRunner().invoke(main, ["diff", str(result.files["float"]), str(result.files["int8"]),
                                    "--input", str(images)])
    assert cli.exit_code == 0, cli.output
    qmodel = resolve_model(ckpt=str(exported[1])).qmodel
    assert deployq.check(qmodel, result.files["int8"], inputs=arrays).ok(max_lsb=1)
    refused = CliRunner().invoke(main, ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "2"])
    assert refused.exit_code != 0 and "--input-shape" in refused.output


@pytest.mark.parametrize("mode", ["accumulated", "sensitivity"])
def test_every_mode_reports_the_integer_model_as_onnxruntime_runs_it(exported, mode, monkeypatch):
    """The rows read unoptimized graphs (QDQ in float); the report also gives the outputs of the
    integer model running freely on the fused kernels, measured here with onnxruntime and numpy.
    (On a CPU whose kernels match the reference view exactly the two views give the same numbers,
    so the sessions the report opens are checked as well: both models fully optimized.)"""
    import onnxruntime as ort

    from deployq.verify import diff as diff_module

    result, _ = exported
    batches = feeds(3, seed=7)
    opened = []
    real_session = diff_module.session
    monkeypatch.setattr(diff_module, "session", lambda model, **kw: opened.append(
        (any(n.op_type == "QuantizeLinear" for n in model.graph.node), bool(kw.get("optimize")),
         bool(kw.get("extra_outputs")))) or real_session(model, **kw))
    report = diff(result.float_model, result.quant_model, batches, mode=mode, progress=False)
    plain = [(quantized, optimized) for quantized, optimized, extra in opened if not extra]
    assert (True, True) in plain and (False, True) in plain  # the integer model and the float one, optimized
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    f, q = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in (result.float_model, result.quant_model))
    ref = np.concatenate([f.run(None, b)[0].ravel() for b in batches]).astype(np.float64)
    got = np.concatenate([q.run(None, b)[0].ravel() for b in batches]).astype(np.float64)
    want = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    (name,) = report.deployed
    assert report.deployed[name].sqnr_db == pytest.approx(want, abs=1e-6)
    assert f"onnxruntime's kernels: output SQNR {want:.1f} dB" in report.verdict()
    assert report.to_json()["deployed_outputs"][name]["sqnr_db"] == pytest.approx(want, abs=1e-6)


def _renamed_everywhere(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every tensor but the initializers renamed, as another exporter would name them."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    keep = {i.name for i in renamed.graph.initializer}
    for node in renamed.graph.node:
        node.input[:] = [n if n in keep or not n else f"/other/{n}" for n in node.input]
        node.output[:] = [f"/other/{n}" for n in node.output]
    for value in (*renamed.graph.input, *renamed.graph.output):
        value.name = f"/other/{value.name}"
    del renamed.graph.value_info[:]
    return renamed


def _weights_quantized_at_run_time(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every stored weight code replaced by its float value and a QuantizeLinear before its
    DequantizeLinear (AIMET's default export), the same codes at run time."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for node in list(out.graph.node):
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("weight_quantized"):
            continue
        codes, scale = numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis else 1 for d in range(codes.ndim)]
        values = (codes.astype(np.float32) - zp.reshape(shape)) * scale.reshape(shape)
        name = node.input[0][: -len("_quantized")]
        out.graph.initializer.remove(inits[node.input[0]])
        out.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
        q = onnx.helper.make_node("QuantizeLinear", [name, node.input[1], node.input[2]], [name + "_q"], axis=axis)
        node.input[0] = name + "_q"
        out.graph.node.insert(list(out.graph.node).index(node), q)
    return out


def test_weights_quantized_at_run_time_are_weight_rows_with_the_same_numbers(exported):
    result, _ = exported
    stored = diff(result.float_model, result.quant_model, feeds(2), mode="local", progress=False)
    at_run_time = diff(result.float_model, _weights_quantized_at_run_time(result.quant_model), feeds(2),
                       mode="local", progress=False)
    rows = lambda report: {(r.point.name, r.point.kind): r.stats.sqnr_db for r in report.rows}
    assert rows(at_run_time).keys() == rows(stored).keys() and any(k == "weight" for _, k in rows(stored))
    assert all(rows(at_run_time)[key] == pytest.approx(db, abs=1e-6) for key, db in rows(stored).items())


def test_a_model_whose_names_differ_is_paired_by_graph_position_with_the_same_numbers(exported):
    """Every tensor of deployq's own export renamed (inputs too): diff aligns the layers by their
    weights and reports the same rows, with the same numbers, as it does by name."""
    result, _ = exported
    by_name = diff(result.float_model, result.quant_model, feeds(2), mode="local", progress=False)
    by_position = diff(result.float_model, _renamed_everywhere(result.quant_model), feeds(2), mode="local",
                       progress=False)
    assert any("paired by graph position" in w for w in by_position.warnings)
    layers = {r.point.name: r.stats.sqnr_db for r in by_name.rows if r.point.layer}
    paired = {r.point.name: r.stats.sqnr_db for r in by_position.rows}
    assert layers and set(layers) <= set(paired)
    assert all(paired[name] == pytest.approx(db, abs=1e-6) for name, db in layers.items())
    # through the API (the CLI's path): its input is named its own way too, and is paired by order
    renamed = _weights_quantized_at_run_time(_renamed_everywhere(result.quant_model))
    report = deployq.diff(result.float_model, renamed, random=1, mode="local")
    assert {r.point.name for r in report.rows if r.point.kind == "weight"} == {
        r.point.name for r in by_name.rows if r.point.kind == "weight"}


def _quantize_static(tmp_path) -> onnx.ModelProto:
    """`tmp_path/theirs.onnx` (a TorchScript export: its own tensor names, `/conv1/Conv_output_0`)
    quantized as another tool's user would: onnxruntime's quantize_static, QDQ, per channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    theirs = onnx.load(tmp_path / "theirs.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{theirs.graph.input[0].name: f["x"]} for f in feeds(8, seed=3)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "theirs.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    return onnx.load(tmp_path / "q.onnx")


def test_another_exporters_quantize_static_model_pairs_every_convolution(tmp_path):
    """The TorchScript exporter names tensors `/blocks.0/conv1/Conv_output_0`; quantize_static
    keeps those names. diff against deployq's float graph of the same network pairs every
    convolution and the Linear by position, each with its own error (not another layer's)."""
    from deployq.deploy.float_graph import export_float

    model = zoo.resnet().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    float_model = export_float(deployq.prepare(model, torch.rand(*SHAPE)), (torch.rand(*SHAPE),))
    torch.onnx.export(model, (torch.rand(*SHAPE),), str(tmp_path / "theirs.onnx"), dynamo=False)
    theirs = onnx.load(tmp_path / "theirs.onnx")
    assert theirs.graph.input[0].name != "x" and any(n.output[0].startswith("/") for n in theirs.graph.node)
    report = diff(float_model, _quantize_static(tmp_path), feeds(2), mode="local", progress=False)
    layers = [n for n in float_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    weights = [r for r in report.rows if r.point.kind == "weight"]
    assert len(weights) == len(layers) == 6
    assert all(r.stats.sqnr_db > 30 for r in weights)  # each quantized weight against its own float weight
    assert {r.point.name for r in weights} == {n.input[1] for n in layers}  # named after the float weights
    assert not report.unmatched  # the adds too (quantize_static dropped their ReLU: paired with its output)
    acts = [r for r in report.rows if r.point.kind == "activation"]
    assert len(acts) == 9 and all(r.stats.sqnr_db > 35 for r in acts)  # measured 37-55 dB
    assert report.gate_sqnr > 20


def test_weights_balanced_are_blind_to_channel_scaling_and_nothing_else():
    """balanced(diag(a)·W·diag(b)) = balanced(W) for positive a, b (what CLE does to a layer); another
    W of the same shape stays far from it."""
    from deployq.verify.positions import balanced

    gen = np.random.default_rng(0)
    w = gen.standard_normal((8, 6, 3, 3))
    a, b = gen.uniform(0.1, 10, 8), gen.uniform(0.1, 10, 6)
    scaled = w * a[:, None, None, None] * b[None, :, None, None]
    assert np.linalg.norm(scaled - w) / np.linalg.norm(w) > 1  # the plain comparison cannot pair them
    assert np.linalg.norm(balanced(scaled) - balanced(w)) < 1e-6
    assert np.linalg.norm(balanced(gen.standard_normal(w.shape)) - balanced(w)) > 1


def test_an_equalized_export_by_another_tool_pairs_every_layer_with_the_float_model(tmp_path):
    """Another tool's cross-layer equalization rescales channels before it quantizes (AIMET's CLE:
    conv1's output channel i by 1/s_i, conv2's input channel i by s_i, the same function through the
    ReLU): its weights are far from the float model's, and diff pairs each layer by its balanced
    weights."""
    from deployq.deploy.float_graph import export_float

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    equalized = copy.deepcopy(model)
    with torch.no_grad():
        for first, second in ((equalized[0], equalized[2]), (equalized[2], equalized[4])):
            s = torch.rand(first.out_channels) * 4 + 0.25
            first.weight.div_(s.reshape(-1, 1, 1, 1)), first.bias.div_(s)
            second.weight.mul_(s.reshape(1, -1, 1, 1))
    x = torch.rand(*SHAPE)
    torch.testing.assert_close(equalized(x), model(x), rtol=1e-4, atol=1e-5)  # the same function
    float_model = export_float(deployq.prepare(model, x), (x,))
    torch.onnx.export(equalized, (x,), str(tmp_path / "theirs.onnx"), dynamo=False)
    name = float_model.graph.input[0].name  # (a Sequential's input is called `input`)
    inputs = [{name: f["x"]} for f in feeds(2)]
    report = diff(float_model, _quantize_static(tmp_path), inputs, mode="local", progress=False)
    layers = [n for n in float_model.graph.node if n.op_type == "Conv"]
    assert len(layers) == 3
    assert {r.point.name for r in report.rows if r.point.kind == "weight"} == {n.input[1] for n in layers}
    assert not report.unmatched


def test_another_tools_convtranspose_pairs_with_deployqs_conv_and_depth_to_space(tmp_path):
    """deployq's float graph writes a ConvTranspose as a 1x1 Conv + DepthToSpace and records it (the
    models' layout records); another tool's export keeps the ConvTranspose. diff pairs the two by
    the record: the layer by its weights in the ConvTranspose's layout, its output at the
    DepthToSpace's, its weight row against the float weight in that layout."""
    model = zoo.unet().eval()
    qmodel = deployq.prepare(model, torch.rand(*SHAPE))
    deployq.calibrate(qmodel, calibration_inputs(4), progress=False)
    float_model = deployq.export(qmodel, torch.rand(*SHAPE), tmp_path / "ours", progress=False).float_model
    assert any(n.op_type == "DepthToSpace" for n in float_model.graph.node)
    torch.onnx.export(model, (torch.rand(*SHAPE),), str(tmp_path / "theirs.onnx"), dynamo=False)
    theirs = onnx.load(tmp_path / "theirs.onnx")
    assert [n.op_type for n in theirs.graph.node].count("ConvTranspose") == 1
    report = diff(float_model, _quantize_static(tmp_path), feeds(2), mode="local", progress=False)
    weights = {r.point.name: r for r in report.rows if r.point.kind == "weight"}
    assert set(weights) == {n.input[1] for n in float_model.graph.node if n.op_type == "Conv"}  # up.weight too
    assert weights["up.weight"].point.op == "ConvTranspose" and weights["up.weight"].stats.sqnr_db > 30
    up = next(r for r in report.rows if r.point.name == "up")  # their ConvTranspose output, at DepthToSpace's
    assert up.point.kind == "activation" and up.stats.sqnr_db > 30
    assert not report.unmatched


def test_a_prelu_whose_slope_is_computed_from_constants_pairs_and_so_does_what_follows(tmp_path):
    """The TorchScript exporter (AIMET's path) writes a PReLU's slope as Unsqueeze(slope): a value
    computed from constants only, which the float graph holds as an initializer. The PReLU pairs as
    an op with one variable input, and the max pool after it pairs from there (MTCNN's layers)."""
    from deployq.deploy.float_graph import export_float

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.PReLU(8), torch.nn.MaxPool2d(2, ceil_mode=True),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.PReLU(4), torch.nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
    x = torch.rand(*SHAPE)
    float_model = export_float(deployq.prepare(model, x), (x,))
    torch.onnx.export(model, (x,), str(tmp_path / "theirs.onnx"), dynamo=False)
    theirs = onnx.load(tmp_path / "theirs.onnx")
    inits = {i.name: i for i in theirs.graph.initializer}
    for k, node in enumerate([n for n in theirs.graph.node if n.op_type == "PRelu"]):  # slope (C,) -> Unsqueeze
        slope = numpy_helper.to_array(inits[node.input[1]])
        theirs.graph.initializer.remove(inits[node.input[1]])
        theirs.graph.initializer.extend([numpy_helper.from_array(slope.reshape(-1), f"slope{k}"),
                                         numpy_helper.from_array(np.array([1, 2], np.int64), f"axes{k}")])
        theirs.graph.node.insert(list(theirs.graph.node).index(node), onnx.helper.make_node(
            "Unsqueeze", [f"slope{k}", f"axes{k}"], [f"/prelu{k}/Unsqueeze_output_0"]))
        node.input[1] = f"/prelu{k}/Unsqueeze_output_0"
    onnx.save(theirs, tmp_path / "theirs.onnx")
    name = float_model.graph.input[0].name
    report = diff(float_model, _quantize_static(tmp_path), [{name: f["x"]} for f in feeds(2)], mode="local",
                  progress=False)
    assert not report.unmatched
    ops = {r.point.op for r in report.rows if r.point.kind == "activation"}
    assert {"PRelu", "MaxPool"} <= ops, ops


def test_a_model_of_another_network_is_not_paired_by_position(exported, tmp_path):
    """Position pairing needs the weights to agree: another UNet's export (other random weights)
    renamed throughout aligns no layer, and diff says the models have nothing in common."""
    result, _ = exported
    other = deployq.prepare(zoo.unet(width=8, seed=1), torch.rand(*SHAPE))
    deployq.calibrate(other, calibration_inputs(4), progress=False)
    theirs = deployq.export(other, torch.rand(*SHAPE), tmp_path, progress=False).quant_model
    with pytest.raises(ModelFileError, match="share only their inputs|no quant point in common"):
        diff(result.float_model, _renamed_everywhere(theirs), feeds(1), progress=False)


class PReLUPool(torch.nn.Module):
    """MTCNN's pattern: Conv -> PReLU -> MaxPool -> Conv; the PReLU's negatives mostly lose in the pool."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = torch.nn.Conv2d(3, 8, 3), torch.nn.PReLU(8, init=0.5)
        self.pool, self.head = torch.nn.MaxPool2d(2, 2), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))))


def test_a_point_only_a_max_pool_reads_is_compared_after_the_pool(tmp_path, monkeypatch):
    """The PReLU's point is calibrated on what the pool outputs, so it clips negatives the pool
    drops anyway: its row compares the pool's outputs (what every reader sees), and is then as
    good as its grid, where the tensor before the pool is far off."""
    import deployq.verify.match as match_module

    torch.manual_seed(0)
    qmodel = deployq.prepare(PReLUPool().eval(), torch.randn(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.randn(4, 3, 16, 16) for _ in range(3)], progress=False)
    result = deployq.export(qmodel, torch.randn(1, 3, 16, 16), tmp_path, progress=False)
    batches = [{"x": torch.randn(2, 3, 16, 16).numpy()}]
    row = lambda report: next(r for r in report.rows if r.point.name == "act")
    pooled = diff(result.float_model, result.quant_model, batches, mode="local", progress=False)
    assert row(pooled).point.pool is not None and row(pooled).stats.sqnr_db > 35
    monkeypatch.setattr(match_module, "_only_max_pool", lambda *args: None)
    unpooled = diff(result.float_model, result.quant_model, batches, mode="local", progress=False)
    assert row(unpooled).stats.sqnr_db < row(pooled).stats.sqnr_db - 10
