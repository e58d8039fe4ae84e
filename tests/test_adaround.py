"""AdaRound (deployq.ptq.adaround): lower per-layer reconstruction loss than rounding to nearest,
binary rounding, the chosen codes exactly in the exported int8 model, torch/onnxruntime parity."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import deployq
from deployq.ptq.adaround import (NOT_GENERAL, UNDERDETERMINED, AdaRoundReport, adaround, beta_at, initial_v,
                                  rectified_sigmoid, rows_and_columns)
from deployq.ptq.layers import LayerData
from deployq.ptq.layers import weight_layers
from deployq.qat.fused import QuantLayer
from ptq_models import BITS4, modes, tiny_model
from ptq_models import calibrated as calibrated_on


def data(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


CALIB, HELD_OUT = data(1, 8), data(2, 4)


def calibrated(config=None) -> torch.fx.GraphModule:
    return calibrated_on(CALIB, config)


def sqnr(model: nn.Module) -> float:
    """Output SQNR (dB) of `model` against the float model on the held-out inputs."""
    reference = tiny_model()
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in HELD_OUT])
        out = torch.cat([model(x) for x in HELD_OUT])
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))



def folded_codes(layer: QuantLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W'/s, s, zp) of a layer's BN-folded weight, in numpy (s, zp shaped to broadcast)."""
    scale, zero_point = (t.numpy() for t in layer.weight_quant.qparams())
    shape = [-1] + [1] * (layer.layer.weight.ndim - 1)
    s, zp = scale.reshape(shape), zero_point.reshape(shape)
    folded = layer.folded_weight_and_bias()[0].detach().numpy()
    return folded / s, s, zp


@pytest.fixture(scope="module")
def rounded_4bit():
    """(nearest, adarounded, report): a 4-bit model before and after AdaRound, every layer learned
    (no guard: the first layer, on white noise, would keep nearest rounding, as tested below)."""
    nearest = calibrated(BITS4)
    with torch.no_grad():
        nearest(CALIB[0])  # weight qparams follow the weights: computed on a forward
    qmodel = copy.deepcopy(nearest)
    report = adaround(qmodel, CALIB, iterations=100, guard=False)
    return nearest, qmodel, report


def test_rectified_sigmoid_starts_at_the_fractional_part_and_beta_anneals():
    rest = torch.linspace(0, 0.999, 50)
    assert torch.allclose(rectified_sigmoid(initial_v(rest)), rest, atol=1e-5)
    assert beta_at(0, 100) is None and beta_at(19, 100) is None  # warm-up: 20% without regulariser
    assert beta_at(20, 100) == pytest.approx(20.0) and beta_at(99, 100) == pytest.approx(2.0, abs=0.3)


def test_loss_goes_down_and_output_sqnr_is_not_worse(rounded_4bit):
    nearest, qmodel, report = rounded_4bit
    assert isinstance(report, AdaRoundReport)
    assert [l.path for l in report.layers] == [p for p, _ in weight_layers(qmodel)] == ["0", "3", "6", "9"]
    assert all(l.loss_after <= l.loss_before and l.iterations == 100 for l in report.layers)
    # The first layer reads white noise (input covariance ∝ I): there nearest rounding is already
    # optimal (the paper's Hessian argument). Later layers read correlated activations.
    assert all(l.loss_after < 0.8 * l.loss_before for l in report.layers[1:])
    assert any(l.flipped > 0.05 for l in report.layers)
    assert sqnr(qmodel) >= sqnr(nearest) + 1.0  # 4-bit weights: a measurable gain
    assert modes(qmodel) == {"quantize"}


def test_codes_are_floor_plus_a_binary_h_and_are_what_export_writes(rounded_4bit, tmp_path):
    nearest, qmodel, _ = rounded_4bit
    result = deployq.export(qmodel, CALIB[0], tmp_path, ort_format=False)
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(result.files["int8"]).graph.initializer}
    for path, layer in weight_layers(qmodel):
        ratio, s, zp = folded_codes(layer)
        before, s0, zp0 = folded_codes(nearest.get_submodule(path))
        np.testing.assert_array_equal(s, s0)  # calibration's qparams are kept
        np.testing.assert_array_equal(zp, zp0)
        codes = np.clip(np.rint(ratio) + zp, -8, 7)
        np.testing.assert_allclose(ratio, np.rint(ratio), atol=1e-3)  # the weights lie on the grid
        floor = np.floor(before) + zp
        assert np.all((codes == np.clip(floor, -8, 7)) | (codes == np.clip(floor + 1, -8, 7)))  # h ∈ {0, 1}
        np.testing.assert_array_equal(initializers[f"{path}.weight_quantized"], codes)
    parity = deployq.check(qmodel, result.files["int8"], inputs=HELD_OUT)
    assert parity.ok(max_lsb=1), [p.to_json() for p in parity.failures()]
    assert modes(qmodel) == {"quantize"}


def test_under_the_default_4_bit_ranges_it_still_gains_and_exports_exactly(tmp_path):
    """At 4 bits the default observer clips each channel's range (MSE search). AdaRound keeps those
    scales, chooses between the two codes around each weight (a weight beyond the range keeps
    the edge code), lowers every layer's loss and the output error, and export writes its codes."""
    nearest = calibrated({"weight": {"bits": 4}})
    with torch.no_grad():
        nearest(CALIB[0])
    qmodel = copy.deepcopy(nearest)
    report = adaround(qmodel, CALIB, iterations=100)
    assert all(l.loss_after <= l.loss_before for l in report.layers) and sqnr(qmodel) > sqnr(nearest)
    result = deployq.export(qmodel, CALIB[0], tmp_path, ort_format=False)
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(result.files["int8"]).graph.initializer}
    for path, layer in weight_layers(qmodel):
        ratio, s, _ = folded_codes(layer)
        before, s0, _ = folded_codes(nearest.get_submodule(path))
        np.testing.assert_array_equal(s, s0)
        codes = np.clip(np.rint(ratio), -8, 7)
        assert np.all((codes == np.clip(np.floor(before), -8, 7)) | (codes == np.clip(np.floor(before) + 1, -8, 7)))
        np.testing.assert_array_equal(initializers[f"{path}.weight_quantized"], codes)
    assert deployq.check(qmodel, result.files["int8"], inputs=HELD_OUT).ok(max_lsb=1)


def test_8bit_export_and_parity_and_layer_selection(tmp_path):
    qmodel = calibrated()
    untouched = {p: l.layer.weight.detach().clone() for p, l in weight_layers(qmodel)}
    report = adaround(qmodel, CALIB, iterations=30, layers=["3", "6"], max_batches=4)
    assert [l.path for l in report.layers] == ["3", "6"]
    for path, layer in weight_layers(qmodel):
        if path not in ("3", "6"):
            assert torch.equal(layer.layer.weight, untouched[path])
    result = deployq.export(qmodel, CALIB[0], tmp_path, ort_format=False)
    parity = deployq.check(qmodel, result.files["int8"], inputs=HELD_OUT)
    assert parity.ok(max_lsb=1), [p.to_json() for p in parity.failures()]
    with pytest.raises(ValueError, match="no quantized weight layer 'nope'"):
        adaround(qmodel, CALIB, iterations=1, layers=["nope"])


def test_an_uncalibrated_model_is_refused():
    qmodel = deployq.prepare(tiny_model(), CALIB[0])
    with pytest.raises(ValueError, match="not calibrated"):
        adaround(qmodel, CALIB, iterations=1)


def test_affine_weights_are_rounded_too():
    """Asymmetric weights (a zero point per channel): AdaRound works on W/s + zp, so a wrong
    zero-point term shows as no weight flipped and no loss gained (the safety revert would hide it
    from `check`); here it flips weights and lowers every later layer's reconstruction loss."""
    affine4 = {"weight": {**BITS4["weight"], "scheme": "per_channel_affine"}}
    nearest = calibrated(affine4)
    with torch.no_grad():
        nearest(CALIB[0])  # weight qparams follow the weights: computed on a forward
    qmodel = copy.deepcopy(nearest)
    zero_points = [l.weight_quant.qparams()[1] for _, l in weight_layers(qmodel)]
    assert any(bool((zp != 0).any()) for zp in zero_points)  # the case: non-zero zero points
    report = adaround(qmodel, CALIB, iterations=100, guard=False)  # every layer learned, as above
    assert all(l.loss_after < 0.9 * l.loss_before for l in report.layers[1:])
    assert all(l.flipped > 0.05 for l in report.layers[1:])  # measured 7-11 %
    assert sqnr(qmodel) >= sqnr(nearest) + 1.0  # measured +2.7 dB


def linear_case(features: int, samples_per_batch: int = 4, batches: int = 8):
    """A calibrated Linear(features -> 8) at 4-bit weights, its float copy, and its white-noise
    calibration batches: with input covariance ∝ I, rounding to nearest is the best rounding in
    expectation, so whatever AdaRound gains on its own samples is fitted noise."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(features, 8)).eval()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(samples_per_batch, features, generator=g) for _ in range(batches)]
    qmodel = deployq.prepare(copy.deepcopy(model), batches[0], BITS4)
    deployq.calibrate(qmodel, batches, progress=False)
    with torch.no_grad():
        qmodel(batches[0])
    return qmodel, model, batches


def output_error(qmodel: nn.Module, model: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((qmodel(inputs) - model(inputs)).pow(2).mean())


def test_a_layer_with_fewer_rows_than_weights_per_channel_keeps_nearest_rounding():
    """32 samples of a Linear(64 -> 8): each channel's 64 weights could fit them exactly."""
    qmodel, _, batches = linear_case(64)
    before = qmodel.get_submodule("0").layer.weight.detach().clone()
    report = adaround(qmodel, batches, iterations=50)
    assert report.layers[0].kept_nearest == UNDERDETERMINED and report.layers[0].flipped == 0
    assert torch.equal(qmodel.get_submodule("0").layer.weight, before)
    captured = LayerData(torch.zeros(32, 64), torch.zeros(32, 64), torch.zeros(32, 8))
    assert rows_and_columns(qmodel.get_submodule("0"), captured) == (32, 64)


def test_a_rounding_that_only_fits_its_own_samples_is_not_kept():
    """48 samples of a Linear(32 -> 8) on white noise. Unguarded, AdaRound lowers the loss on its
    samples and raises the error on new ones (the failure the guard is for); guarded, the rounding
    learned on the even samples loses on the odd ones, and nearest rounding is kept."""
    held_out = torch.randn(4096, 32, generator=torch.Generator().manual_seed(5))
    qmodel, model, batches = linear_case(32, batches=12)
    nearest_error = output_error(qmodel, model, held_out)
    unguarded = copy.deepcopy(qmodel)
    fitted = adaround(unguarded, batches, iterations=200, max_batches=12, guard=False).layers[0]
    assert fitted.loss_after < fitted.loss_before and fitted.flipped > 0
    assert output_error(unguarded, model, held_out) > nearest_error
    guarded = adaround(qmodel, batches, iterations=200, max_batches=12).layers[0]
    assert guarded.kept_nearest == NOT_GENERAL and guarded.flipped == 0
    assert output_error(qmodel, model, held_out) == nearest_error
