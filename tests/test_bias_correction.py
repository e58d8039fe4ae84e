"""Empirical bias correction (deployq.ptq.bias_correction): the quantized layers' mean output error
per channel is removed on the calibration data; export and torch/onnxruntime parity still hold."""

import copy

import pytest
import torch

import deployq
from deployq.ptq.bias_correction import SHRINK, BiasCorrectionReport, channel_mean, correct_bias, layer_errors

SHRUNK = 0.25  # a shrink to test (the default, SHRINK, corrects the whole mean error)
from ptq_models import BITS4, modes
from ptq_models import calibrated as calibrated_on


def data(seed: int, n: int) -> list[torch.Tensor]:
    """Image-like inputs in [0, 1): with zero-mean inputs the first layer's expected error,
    ΔW·E[x], would be 0 and nothing would be left to correct there."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=g) for _ in range(n)]


CALIB, HELD_OUT = data(1, 8), data(2, 4)


def calibrated(config=None) -> torch.fx.GraphModule:
    return calibrated_on(CALIB, config)



def test_channel_mean_keeps_the_channel_dimension():
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(channel_mean(t, 1), t.mean((0, 2)))
    assert torch.equal(channel_mean(t, -1), t.mean((0, 1)))


def per_sample_spread(qmodel: torch.fx.GraphModule, reference: torch.fx.GraphModule, path: str) -> torch.Tensor:
    """σ_c: the standard deviation over the calibration samples of the layer's per-sample mean error."""
    from deployq.ptq.layers import capture, per_sample_means, quantized_output, take_batches

    data = capture(qmodel, path, take_batches(qmodel, CALIB, 8), reference)
    error = quantized_output(qmodel.get_submodule(path), data.x_quant) - data.y_float
    return per_sample_means(error, 1).std(0)


@pytest.mark.parametrize("shrink", [SHRINK, SHRUNK])
def test_mean_error_per_channel_is_removed_and_export_stays_exact(tmp_path, shrink):
    """With the default (no shrink) what is left of each channel's mean error is the int32 bias's
    rounding; with a shrink, at most that many standard deviations of its per-sample error more."""
    qmodel = calibrated(BITS4)
    reference = copy.deepcopy(qmodel)  # the float targets, before any correction
    before = layer_errors(qmodel, CALIB, reference)
    report = correct_bias(qmodel, CALIB, shrink=shrink)
    after = layer_errors(qmodel, CALIB, reference)
    assert isinstance(report, BiasCorrectionReport)
    assert [p for p, _ in report.layers] == ["0", "3", "6"] and report.skipped == ("9",)
    assert all(r > 0 for _, r in report.layers)
    assert qmodel.get_submodule("9").layer.bias is None  # nowhere to put a correction: left alone
    for path, error in list(after.items())[:3]:
        layer = qmodel.get_submodule(path)
        step = layer.input_quant.qparams()[0] * layer.weight_quant.qparams()[0]
        allowed = 0.5 * step + shrink * per_sample_spread(qmodel, reference, path)
        assert torch.all(error.abs() <= allowed * 1.01), path
        assert torch.all(error.abs() < before[path].abs() + 0.5 * step * 1.01), path  # never a larger shift
        if shrink == 0:
            assert error.abs().mean() < 0.05 * before[path].abs().mean(), path
    assert modes(qmodel) == {"quantize"}
    result = deployq.export(qmodel, CALIB[0], tmp_path, ort_format=False)
    parity = deployq.check(qmodel, result.files["int8"], inputs=HELD_OUT)
    assert parity.ok(max_lsb=1), [p.to_json() for p in parity.failures()]


def test_layer_selection_changes_only_those_biases():
    qmodel = calibrated(BITS4)
    betas = {p: qmodel.get_submodule(p).bn.bias.detach().clone() for p in ("0", "3", "6")}
    report = correct_bias(qmodel, CALIB, layers=["3"], max_batches=2)
    assert [p for p, _ in report.layers] == ["3"]
    assert torch.equal(qmodel.get_submodule("0").bn.bias, betas["0"])
    assert torch.equal(qmodel.get_submodule("6").bn.bias, betas["6"])
    assert not torch.equal(qmodel.get_submodule("3").bn.bias, betas["3"])
    assert qmodel.get_submodule("9").layer.bias is None
    with pytest.raises(ValueError, match="no quantized weight layer"):
        correct_bias(qmodel, CALIB, layers=["3.bn"])


def _output_drift(qmodel: torch.fx.GraphModule, float_model: torch.fx.GraphModule,
                  batches: list[torch.Tensor]) -> dict[str, float]:
    """mean_c |E[y_q − y]_c| / std(y) of every quantized layer's output on `batches`, measured
    without the module under test: forward hooks on the quantized model and on the float model
    (a copy taken before the correction, which moves the float parameters)."""
    from deployq.qat.fused import QuantLayer

    outputs: dict[str, dict[str, list[torch.Tensor]]] = {"q": {}, "f": {}}
    hooks = []
    for key, model in (("q", qmodel), ("f", float_model)):
        for path, module in model.named_modules():
            if isinstance(module, QuantLayer):
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, key=key, path=path: outputs[key].setdefault(path, []).append(o.detach())))
    with torch.no_grad():
        for x in batches:
            qmodel(x), float_model(x)
    for h in hooks:
        h.remove()
    drift = {}
    for path in outputs["q"]:
        error = torch.cat(outputs["q"][path]) - torch.cat(outputs["f"][path])
        drift[path] = float(channel_mean(error, 1).abs().mean() / torch.cat(outputs["f"][path]).std())
    return drift


def test_correction_lowers_the_mean_output_error_on_held_out_data():
    """What bias correction is for, measured independently and on other inputs than it saw: the
    layers' mean output error falls (with the correction's sign flipped it grows). The ReLUs are
    not fused here, so a layer's output is the pre-activation the correction is about (after a
    ReLU, zero-mean noise itself has a positive mean)."""
    qmodel = calibrated({**BITS4, "fuse_activations": []})
    float_model = copy.deepcopy(qmodel)
    deployq.set_mode(float_model, "float")
    before = _output_drift(qmodel, float_model, HELD_OUT)
    correct_bias(qmodel, CALIB)
    after = _output_drift(qmodel, float_model, HELD_OUT)
    corrected = ["0", "3", "6"]
    assert all(after[p] < 0.5 * before[p] for p in corrected), (before, after)
    assert sum(after.values()) < 0.5 * sum(before.values())


def test_a_shift_within_the_noise_is_not_corrected():
    """A channel whose mean error is a steady offset is corrected by it; one whose per-sample errors
    only scatter around zero (their mean within 2 standard errors) keeps its bias: correcting
    measurement noise adds noise to the data the correction did not see. With a shrink, a
    significant shift the samples disagree on is corrected by its mean less that many standard
    deviations of their spread."""
    from deployq.ptq.bias_correction import layer_correction
    from deployq.ptq.layers import LayerData, quantized_output

    layer = calibrated(BITS4).get_submodule("0")
    x = torch.cat(CALIB)  # 32 samples
    y_quant = quantized_output(layer, x)
    g = torch.Generator().manual_seed(3)
    error = torch.zeros_like(y_quant)
    error[:, 0] = 0.5  # a steady shift
    error[:, 1] = torch.randn(x.shape[0], 1, 1, generator=g)  # per-sample scatter, mean ~ 0
    error[:, 1] -= error[:, 1].mean() - 0.1  # mean 0.1, standard error ~ 1 / sqrt(32) = 0.18
    error[:, 2] = error[:, 1] + 0.9  # mean 1.0, the same scatter: significant, shrunk
    delta = layer_correction(layer, LayerData(x, x, y_quant - error))
    assert delta[0] == pytest.approx(0.5, rel=1e-5) and delta[1] == 0
    assert delta[2] == pytest.approx(1.0, rel=1e-5)
    assert torch.all(delta[3:] == 0)  # no error at all
    shrunk = layer_correction(layer, LayerData(x, x, y_quant - error), shrink=SHRUNK)
    spread = float(error[:, 2, 0, 0].std())
    assert shrunk[0] == pytest.approx(0.5, rel=1e-5) and shrunk[1] == 0  # a steady shift has no spread
    assert shrunk[2] == pytest.approx(1.0 - SHRUNK * spread, rel=1e-4) and 0 < shrunk[2] < 1.0
    one = layer_correction(layer, LayerData(x[:1], x[:1], y_quant[:1] - error[:1]))
    assert one[1] == pytest.approx(float(error[0, 1].mean()), rel=1e-5)  # one sample: no spread, kept


def brightness_varied(seed: int, batches: int, low: float, high: float) -> list[torch.Tensor]:
    """Image-like batches, each sample scaled by its own brightness in [low, high): the first
    layer's mean error ΔW·E[x] changes with it."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=g) * (low + (high - low) * torch.rand(4, 1, 1, 1, generator=g))
            for _ in range(batches)]


def test_a_shift_the_samples_disagree_on_is_corrected_less():
    """What a shrink is for: calibration samples of varied brightness disagree about each
    layer's mean error, and on other data the whole correction over-corrects. On held-out samples
    of the same kind and on darker ones (a smaller error than the calibration average), the shrunk
    correction leaves less mean output error than the whole one; both leave less than none."""
    calib = brightness_varied(1, 8, 0.0, 2.0)
    qmodel = calibrated_on(calib, {**BITS4, "fuse_activations": []})
    float_model = copy.deepcopy(qmodel)
    deployq.set_mode(float_model, "float")
    for held_out in (brightness_varied(10, 4, 0.0, 2.0), brightness_varied(11, 4, 0.0, 0.6)):
        drift = {}
        for shrink in (None, 0.0, SHRUNK):
            model = copy.deepcopy(qmodel)
            if shrink is not None:
                correct_bias(model, calib, shrink=shrink)
            drift[shrink] = sum(_output_drift(model, float_model, held_out).values())
        assert drift[SHRUNK] < 0.95 * drift[0.0] < 0.95 * drift[None], drift


def test_reused_weights_are_the_fresh_ones_and_follow_in_place_changes():
    """The PTQ passes quantize each weight once per pass (reused_weights); what they reuse must
    be what the layer computes fresh, also after a parameter or an input scale changed in place
    (bias correction shifts BN's beta between passes)."""
    from deployq.ptq.layers import reused_weights
    from deployq.qat.fused import QuantLayer

    qmodel = calibrated(BITS4)
    x = HELD_OUT[0]
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
    first = layers[0]
    with torch.no_grad():
        fresh = qmodel(x)
        with reused_weights(qmodel):
            assert torch.equal(qmodel(x), fresh) and torch.equal(qmodel(x), fresh)  # the second call reuses
            assert all(m.__dict__["_deployed"] is not None for m in layers)
            (first.bn.bias if first.bn is not None else first.layer.bias).add_(0.5)  # as bias correction does
            shifted = qmodel(x)
        assert not torch.equal(shifted, fresh) and torch.equal(shifted, qmodel(x))  # outside: computed fresh
        with reused_weights(qmodel):
            qmodel(x)
            first.input_quant.scale.mul_(2.0)  # the input scale sets the int32 bias grid
            rescaled = qmodel(x)
        assert not torch.equal(rescaled, shifted) and torch.equal(rescaled, qmodel(x))
    assert all(m.__dict__["_deployed"] is None and not m.reuse_deployed for m in layers)


def _biases(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".bias")}


def test_one_stacked_pass_corrects_as_the_layer_by_layer_passes_do(monkeypatch):
    """All samples stacked, each layer corrected in a hook before it runs (one forward): the same
    biases as one pass per layer, which is what the method defines."""
    import deployq.ptq.bias_correction as bc

    g = torch.Generator().manual_seed(1)
    samples = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(16)]
    one_pass = calibrated_on(samples, BITS4)
    by_layer = copy.deepcopy(one_pass)
    correct_bias(one_pass, samples, max_batches=16)
    monkeypatch.setattr(bc, "_in_one_pass", lambda *args: None)
    correct_bias(by_layer, samples, max_batches=16)
    a, b = _biases(one_pass), _biases(by_layer)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], _biases(calibrated_on(samples, BITS4))[k]) for k in a)  # it did correct


class PlainBiases(torch.nn.Module):
    """Convolutions with biases of their own and no BatchNorm: at 10 bits the bias is deployed as
    the float parameter itself, which the correction changes in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("wide", [False, True], ids=["4-bit, BN folded", "10-bit, float biases"])
def test_the_pass_returns_the_corrected_models_outputs(wide):
    """What the one pass returns is what the corrected model computes on the same samples (up to
    float rounding): the check on learned samples scores it instead of running the model again.
    With float biases (10 bits) the deployed bias is the parameter the correction changes."""
    from deployq.ptq.batched import model_outputs

    g = torch.Generator().manual_seed(3)
    samples = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(12)]
    if wide:
        model = deployq.prepare(PlainBiases().eval(), samples[0], {"weight": {"bits": 10}, "activation": {"bits": 10}})
        deployq.calibrate(model, samples, progress=False)
    else:
        model = calibrated_on(samples, BITS4)
    before = model_outputs(model, [(s,) for s in samples])
    report = correct_bias(model, samples, max_batches=12)
    after = model_outputs(model, [(s,) for s in samples])
    assert [len(run) for run in report.outputs] == [len(run) for run in after] and len(after) == 2  # 8 + 4
    for ours, theirs, old in zip(report.outputs, after, before):
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ours, theirs))
        assert not all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(ours, old))  # it did change them


def test_the_float_pass_gives_the_float_models_outputs_and_one_row_per_sample():
    """float_targets' outputs are the float model's, bit for bit (the check reads them as its
    reference); on a model that refuses stacked samples each sample counts once, not again after
    the refused run."""
    from deployq.ptq.batched import model_outputs
    from deployq.ptq.bias_correction import float_targets
    from deployq.ptq.layers import modes as in_mode

    g = torch.Generator().manual_seed(4)
    samples = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(10)]
    model = calibrated_on(samples, BITS4)
    targets = float_targets(model, samples, max_batches=10)
    with in_mode(model, "float"):
        expected = model_outputs(model, [(s,) for s in samples])
    assert all(torch.equal(a, b) for ours, theirs in zip(targets.outputs, expected) for a, b in zip(ours, theirs))
    assert all(means.shape[0] == 10 for means, _ in targets.means.values())

    one = deployq.prepare(BatchOfOne().eval(), samples[0])
    deployq.calibrate(one, samples, progress=False)
    targets = float_targets(one, samples, max_batches=10)
    assert len(targets.outputs) == 10 and all(means.shape[0] == 10 for means, _ in targets.means.values())


class BatchOfOne(torch.nn.Module):
    """A model written for one sample at a time: its view puts the batch size in by hand."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 14 * 14, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(1, -1))


def test_a_model_that_takes_one_sample_at_a_time_is_corrected_layer_by_layer():
    """Stacked samples do not run through it; nothing of the failed pass stays, and the layer-by-
    layer passes give what they give on their own."""
    import deployq.ptq.bias_correction as bc

    g = torch.Generator().manual_seed(2)
    samples = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(8)]
    model = deployq.prepare(BatchOfOne().eval(), samples[0])
    deployq.calibrate(model, samples, progress=False)
    reference = copy.deepcopy(model)
    assert bc._in_one_pass(model, bc.select_layers(model, None), [(s,) for s in samples],
                           lambda path, layer, x: bc.shift_bias(layer, torch.ones(1))) is None
    assert all(torch.equal(v, _biases(reference)[k]) for k, v in _biases(model).items())  # the failed pass undone
    report = correct_bias(model, samples, max_batches=8)
    assert len(report.layers) == 2


def test_the_one_pass_reports_each_layer_it_corrects(monkeypatch, capsys):
    """Progress on long work: away from a terminal, one line per corrected layer at interval 0."""
    from deployq.core import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(progress, "QUIET", False)
    model = calibrated()
    report = correct_bias(model, CALIB, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bias correction, one pass")]
    assert len(lines) == len(report.layers) >= 2 and lines[-1].startswith(
        f"bias correction, one pass: {len(report.layers)}/{len(report.layers)}")
