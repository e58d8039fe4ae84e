"""Hessian trace (Hutchinson) of activations: accuracy, ranking, the distillation config, the CLI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import deployq
from deployq.qat import checkpoint as ck
from deployq.train import distill as dst
from deployq.cli.train import hessian as hessian_command
from deployq.examples import zoo
from deployq.train.hessian import hessian_traces
from deployq.train.hessian_report import write_distill_config


class SmoothNet(nn.Module):
    """tanh layers: a Hessian with off-diagonal terms, so Hutchinson has variance to average."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 8), nn.Tanh()
        self.fc2, self.act2 = nn.Linear(8, 8), nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def exact_trace(net, x, y, layer):
    """Tr of ∂²L/∂a² built in full with torch.autograd.functional.hessian on a function of a."""
    a1 = net.act1(net.fc1(x)).detach()
    if layer == "act1":
        a, rest = a1, lambda a: net.head(net.act2(net.fc2(a)))
    else:
        a, rest = net.act2(net.fc2(a1)).detach(), net.head
    hessian = torch.autograd.functional.hessian(lambda a: F.mse_loss(rest(a), y), a)
    return float(hessian.reshape(a.numel(), a.numel()).trace())


def test_hutchinson_is_within_5_percent_of_the_exact_trace():
    torch.manual_seed(0)
    net = SmoothNet().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(2)]
    qmodel = deployq.prepare(net, torch.randn(1, 6))
    report = hessian_traces(qmodel, batches, ["act1", "act2"], tol=0, max_iter=2000, bits=None, estimator="per-layer")
    for layer in ("act1", "act2"):
        exact = np.mean([exact_trace(net, x, y, layer) for x, y in batches])  # averaged over batches
        assert report[layer].trace == pytest.approx(exact, rel=0.05)
        assert report[layer].iterations == 2000 and not report[layer].converged
        assert report[layer].numel == 8 and report[layer].per_element == report[layer].trace / 8
    assert report.loss == "mse between the model's output and the targets"


def test_shared_products_estimate_every_layer_without_bias():
    """One Hessian-vector product for both layers per sample: the cross terms z_1ᵀH_12 z_2 vanish in
    expectation, so each layer's mean is within a few standard errors of its exact trace."""
    torch.manual_seed(0)
    net = SmoothNet().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(2)]
    qmodel = deployq.prepare(net, torch.randn(1, 6))
    shared = hessian_traces(qmodel, batches, ["act1", "act2"], tol=0, max_iter=4000, bits=None, estimator="shared")
    assert shared.estimator == "shared"
    for layer in ("act1", "act2"):
        exact = np.mean([exact_trace(net, x, y, layer) for x, y in batches])
        assert abs(shared[layer].trace - exact) <= 4 * shared[layer].stderr, (layer, shared[layer], exact)
        assert shared[layer].trace == pytest.approx(exact, rel=0.1)


def test_refine_estimates_the_top_layers_again_with_per_layer_products():
    """refine=1: the layer the shared products rank first is estimated again per layer (the same
    numbers as a per-layer run with the seed), the other keeps its shared estimate."""
    net = SmoothNet().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(2)]
    qmodel = deployq.prepare(net, torch.randn(1, 6))
    kwargs = dict(tol=0, max_iter=300, bits=None, seed=3)
    shared = hessian_traces(qmodel, batches, ["act1", "act2"], estimator="shared", **kwargs)
    refined = hessian_traces(qmodel, batches, ["act1", "act2"], estimator="shared", refine=1, **kwargs)
    top, other = shared.names
    alone = hessian_traces(qmodel, batches, [top], estimator="per-layer", **kwargs)
    assert refined[top].trace == alone[top].trace and refined[top].stderr == alone[top].stderr
    assert refined[top].trace != shared[top].trace
    assert refined[other].trace == shared[other].trace
    assert refined.estimator == "shared, the top 1 again per-layer"


def test_the_tolerance_stops_early_and_max_iter_caps():
    qmodel = deployq.prepare(SmoothNet().eval(), torch.randn(1, 6))
    batches = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(2)]
    loose = hessian_traces(qmodel, batches, ["act1"], tol=0.05, max_iter=500, bits=None)
    assert loose["act1"].converged and 2 <= loose["act1"].iterations < 500
    assert loose["act1"].stderr <= 0.05 * abs(loose["act1"].trace)  # the stop rule: s.e. within tol of the mean
    tight = hessian_traces(qmodel, batches, ["act1"], tol=0.01, max_iter=5000, bits=None)
    assert tight["act1"].iterations > loose["act1"].iterations and tight["act1"].stderr <= 0.01 * abs(tight["act1"].trace)
    capped = hessian_traces(qmodel, batches, ["act1"], tol=0, max_iter=7, bits=None)
    assert capped["act1"].iterations == 7 and not capped["act1"].converged
    assert capped["act1"].seconds > 0 and capped["act1"].stderr > 0


class Sensitive(nn.Module):
    """`probe`'s output reaches the result multiplied by 30: its Hessian is 900x larger."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Conv2d(4, 3, 1)
        self.probe_conv, self.probe = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x))))) + 30 * self.probe(self.probe_conv(x))


def sensitive_report(**kw):
    torch.manual_seed(0)
    batches = [torch.rand(2, 3, 8, 8) for _ in range(2)]  # inputs only: the float output is the target
    return hessian_traces(Sensitive().eval(), batches, **kw)


def test_the_ranking_puts_the_sensitive_layer_first():
    report = sensitive_report()
    assert report.names[0] == "probe"
    assert report.layers[0].per_element > 100 * report.layers[1].per_element
    assert "float model's own output" in report.loss and "no targets" in report.loss
    assert set(report.names) == {"probe", "act1", "act2", "head", "mul"}  # the output sum is not a quant point


def test_bit_suggestion_gives_the_sensitive_layer_more_bits():
    report = sensitive_report()
    suggestions = {s.name: s for s in report.bit_suggestions()}
    assert suggestions["probe"].bits == 10 and suggestions["act1"].bits == 8
    probe = report["probe"]
    assert probe.perturbation[8] > probe.perturbation[10] > 0
    assert suggestions["probe"].omega[8] == pytest.approx(0.5 * probe.per_element * probe.perturbation[8])


def test_distill_config_weights_follow_the_normalized_traces(tmp_path):
    report = sensitive_report()
    config = write_distill_config(report, tmp_path / "distill.yaml", top=3, coeff=0.7)
    assert config.names == report.names[:3]
    weights = np.array([w for _, w in config.layers])
    traces = np.array([report[n].per_element for n in config.names])
    np.testing.assert_allclose(weights, 0.7 * traces / traces.sum())
    assert weights.sum() == pytest.approx(0.7)
    assert dst.load(tmp_path / "distill.yaml") == config  # loadable by the distillation code
    assert "# deployq hessian" in (tmp_path / "distill.yaml").read_text()


def test_layer_globs_and_unknown_layers():
    report = sensitive_report(layers="act*")
    assert sorted(report.names) == ["act1", "act2"]
    with pytest.raises(dst.LayerNotFoundError, match=r"'prob' is not in the model.*Nearest names: probe"):
        sensitive_report(layers=["prob"])


def test_a_piecewise_linear_net_under_l1_has_no_curvature_to_rank():
    batches = [(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))]
    report = hessian_traces(zoo.unet(width=4), batches, loss="l1", max_iter=5, bits=None)
    assert all(layer.trace == 0.0 for layer in report.layers)
    with pytest.raises(dst.DistillError, match="no layer has a positive Hessian trace.*use mse"):
        report.distill_config()


def test_quantize_mode_needs_a_calibrated_model_and_restores_the_modes():
    qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
    batches = [torch.rand(2, 3, 16, 16)]
    with pytest.raises(dst.DistillError, match="needs a calibrated model"):
        hessian_traces(qmodel, batches, mode="quantize")
    deployq.calibrate(qmodel, batches, progress=False)
    report = hessian_traces(qmodel, batches, ["enc1.2"], mode="quantize", max_iter=5)
    assert report.mode == "quantize" and report["enc1.2"].trace > 0
    assert qmodel.get_submodule("act_quant.enc1.2").mode == "quantize"


@pytest.fixture
def checkpoint(tmp_path):
    qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16)], progress=False)
    return ck.save(tmp_path / "qat.pt", qmodel, factory="deployq.examples.zoo:unet",
                   factory_kwargs={"width": 4}, inputs=[ck.InputSpec("x", (2, 3, 16, 16))])


def test_cli_ranks_layers_and_writes_the_config_from_a_yaml_dataset(tmp_path, checkpoint, rng):
    x = rng.random((8, 3, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "data.npz", input=x, target=x)
    (tmp_path / "data.yaml").write_text("data: {kind: npz, train: data.npz, val: data.npz}\n")
    out = tmp_path / "distill.yaml"
    result = CliRunner().invoke(hessian_command, ["--ckpt", str(checkpoint), "--data", str(tmp_path / "data.yaml"),
                                                  "--top", "2", "--coeff", "0.5", "--out", str(out),
                                                  "--max-iter", "20"])
    assert result.exit_code == 0, result.output
    assert "Tr(H)/n" in result.output and "mse between the model's output and the targets" in result.output
    assert "HAWQ-style suggestion" in result.output
    config = dst.load(out)
    assert len(config.layers) == 2 and sum(config.weights.values()) == pytest.approx(0.5)


def test_cli_takes_input_files_and_reports_unknown_layers(tmp_path, checkpoint, rng):
    np.save(tmp_path / "inputs.npy", rng.random((4, 3, 16, 16), dtype=np.float32))
    out = tmp_path / "distill.yaml"
    args = ["--ckpt", str(checkpoint), "--data", str(tmp_path / "inputs.npy"), "--out", str(out), "--max-iter", "10"]
    result = CliRunner().invoke(hessian_command, args + ["--layers", "enc*"])
    assert result.exit_code == 0, result.output
    assert "float model's own output" in result.output
    assert set(dst.load(out).names) == {"enc1.2", "enc2.2"}
    result = CliRunner().invoke(hessian_command, args + ["--layers", "enc3"])
    assert result.exit_code == 1 and "'enc3' is not in the model" in result.output


def test_inputs_over_the_pixel_budget_are_read_as_smaller_crops_where_the_model_runs_on_them():
    """A fully convolutional model whose input has more pixels than the budget is fed crops of about
    that many (aspect kept, multiples of 32); one of fixed size keeps its input, and says why; its
    quantizers' modes and BatchNorm statistics are as they were."""
    from deployq.examples import zoo
    from deployq.qat.checkpoint import InputSpec
    from deployq.train.batches import bounded_inputs

    conv = deployq.prepare(zoo.unet().train(), torch.rand(1, 3, 32, 32))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    (spec,), note = bounded_inputs(conv, [InputSpec("x", (1, 3, 256, 384))], 64 * 64)
    assert spec.shape == (1, 3, 32, 64) and "crops of 32x64" in note and "over --pixels 4096" in note
    assert conv.training and all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())
    assert bounded_inputs(conv, [InputSpec("x", (1, 3, 64, 64))], 64 * 64) == ([InputSpec("x", (1, 3, 64, 64))], "")

    fixed = deployq.prepare(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 128 * 128, 2)),
                            torch.rand(1, 3, 128, 128))
    (spec,), note = bounded_inputs(fixed, [InputSpec("x", (1, 3, 128, 128))], 64 * 64)
    assert spec.shape == (1, 3, 128, 128) and "does not run on 64x64: at full size" in note
