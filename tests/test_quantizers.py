"""Quantizers: forward bit-exact to an independent numpy integer reference; gradients per paper."""

import math

import numpy as np
import pytest
import torch

from deployq.core.qspec import QuantSpec
from deployq.qat import fake_quant
from deployq.qat.fake_quant import straight_through
from deployq.qat.quantizers import QUANTIZERS, create_quantizer

ALL = ["fixed", "lsq", "lsq+", "dsq", "dsq_lsq", "pact"]


# --- the quantizers' formulas written with autograd's own ops: the references the fused node is
# --- checked against


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """rint (half to even) forward, identity gradient (the straight-through estimator)."""
    return straight_through(torch.round(v), v)


def scale_gradient(p: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient reaching `p` is multiplied by `factor` (LSQ's g)."""
    return straight_through(p, p * factor)


def soft_round(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """DSQ's differentiable rounding in the integer domain (interval width Δ = 1): within [i, i+1],
    i + (φ + 1)/2 with φ = tanh(k(v − i − ½)) / tanh(k/2), k = log(2/α − 1). As α → 0 it becomes
    round(v); α is the distance of φ from ±1 at the interval ends (Gong et al., 2019)."""
    i = torch.floor(v).detach()
    k = torch.log(2.0 / alpha - 1.0)
    phi = torch.tanh(k * (v - i - 0.5)) / torch.tanh(0.5 * k)
    return i + 0.5 * (phi + 1.0)


def numpy_fake_quant(x, s, zp, qmin, qmax, axis=None):
    """Independent reference: x̂ = (clip(rint(x / s) + zp, qmin, qmax) − zp) · s in float32."""
    x = np.asarray(x, np.float32)
    s = np.asarray(s, np.float32)
    zp = np.asarray(zp, np.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    q = np.clip(np.rint(np.divide(x, s, dtype=np.float32)) + zp, qmin, qmax)
    return ((q - zp) * s).astype(np.float32)


def make(name, bits, signed=False, symmetric=False, per_channel=False, channels=1, is_weight=False):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric or name == "pact",
                     per_channel=per_channel, quantizer=name)
    q = create_quantizer(spec, "t", axis=0 if per_channel else None, channels=channels, is_weight=is_weight)
    q.mode = "quantize"
    return q


def data(rng, lo, hi, n=4000):
    """Random values across (and beyond) the range, plus exact half-way ties."""
    return np.concatenate([rng.uniform(lo * 1.3, hi * 1.3, n), np.linspace(lo, hi, 997)]).astype(np.float32)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [2, 4, 8, 10, 16])
@pytest.mark.parametrize("training", [False, True])
def test_forward_is_the_integer_formula(name, bits, training, rng):
    signed = name == "pact" and bits % 2 == 0
    q = make(name, bits, signed=signed)
    lo, hi = (-2.0, 3.0) if name != "pact" else ((-3.0, 3.0) if signed else (0.0, 3.0))
    q.set_qparams(np.float32((hi - lo) / (q.qmax - q.qmin)), np.array(0.0 if name == "pact" else round(-lo / ((hi - lo) / (q.qmax - q.qmin)))))
    q.train(training)
    x = data(rng, lo, hi)
    s, zp = (t.numpy() for t in q.qparams())
    out = q(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(out, numpy_fake_quant(x, s, zp, q.qmin, q.qmax))


@pytest.mark.parametrize("name", ["fixed", "lsq", "lsq+", "dsq", "dsq_lsq"])
def test_per_channel_weights_match_reference(name, rng):
    q = make(name, 8, signed=True, symmetric=True, per_channel=True, channels=6, is_weight=True)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    out = q(torch.from_numpy(w)).detach().numpy()  # weights calibrate from themselves
    s, zp = (t.numpy() for t in q.qparams())
    assert s.shape == (6,)
    np.testing.assert_allclose(s, np.abs(w).reshape(6, -1).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(out, numpy_fake_quant(w, s, zp, -128, 127, axis=0))


def test_ten_bit_quantizer_has_exactly_1024_levels():
    q = make("fixed", 10)
    q.set_qparams(np.float32(4.0 / 1023), np.array(256))
    out = q(torch.linspace(-5, 5, 200_000))
    assert out.unique().numel() == 1024


def lsq_reference_grads(x, s, zp, qmin, qmax, g):
    """LSQ (Esser et al. 2020, eq. 3) and LSQ+ (Bhalgat et al. 2020): per-element ∂x̂/∂s and
    ∂x̂/∂zp, summed (loss = Σ x̂) and scaled by g."""
    v = x / s
    r = np.rint(v)
    low, high = r + zp < qmin, r + zp > qmax
    inside = ~(low | high)
    ds = np.where(inside, r - v, np.where(low, qmin - zp, qmax - zp))
    dzp = np.where(inside, 0.0, -s)
    return g * ds.sum(), g * dzp.sum()


@pytest.mark.parametrize("name", ["lsq", "lsq+"])
def test_lsq_gradients_match_the_papers(name, rng):
    q = make(name, 4, signed=False)
    s, zp = np.float32(0.2), 3.0
    q.set_qparams(s, np.array(zp))
    x = rng.uniform(-1.5, 3.5, size=(8, 50)).astype(np.float32)
    q(torch.from_numpy(x)).sum().backward()
    g = 1.0 / math.sqrt(50 * q.qmax)  # N = features per sample, Qp = qmax
    want_s, want_zp = lsq_reference_grads(x.astype(np.float64), float(s), zp, q.qmin, q.qmax, g)
    # the parameter is log s: its gradient is s · ∂L/∂s
    assert q.log_scale.grad.item() / float(q.qparams()[0]) == pytest.approx(want_s, rel=1e-4)
    if name == "lsq+":
        assert q.zero_point.grad.item() == pytest.approx(want_zp, rel=1e-4)
        assert want_zp != 0


def test_soft_round_approaches_rint_as_alpha_shrinks():
    v = torch.linspace(-4.4, 4.4, 100_001, dtype=torch.float64)
    alphas = (0.4, 0.1, 0.01, 1e-4, 1e-8, 1e-12)
    errors = [(soft_round(v, torch.tensor(a, dtype=torch.float64)) - torch.round(v)).abs() for a in alphas]
    means = [float(e.mean()) for e in errors]
    assert means == sorted(means, reverse=True)  # k = log(2/α − 1) grows as α shrinks
    away_from_jumps = (v - v.floor() - 0.5).abs() > 0.1
    assert float(errors[-1][away_from_jumps].max()) < 0.005 < float(errors[0][away_from_jumps].max())


@pytest.mark.parametrize("name", ["dsq", "dsq_lsq"])
def test_dsq_alpha_receives_gradient(name, rng):
    q = make(name, 4)
    q.set_qparams(np.float32(0.25), np.array(2.0))
    q.train()
    x = torch.from_numpy(rng.uniform(-0.4, 3.0, 500).astype(np.float32))
    ((q(x) - x) ** 2).sum().backward()
    assert q.alpha.grad is not None and torch.isfinite(q.alpha.grad) and q.alpha.grad.abs() > 0


def test_pact_alpha_gradient_counts_clipped_values(rng):
    q = make("pact", 8)
    q.set_qparams(np.float32(2.0 / 255), np.array(0))
    x = torch.from_numpy(rng.uniform(-1, 3, 1000).astype(np.float32))
    q(x).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(float((x >= q.alpha.detach()).sum()))


def test_learned_scales_stay_positive_under_adam(rng):
    """Adam moves a parameter by ~lr per step; a linear scale of a near-empty channel went through
    zero. The log-parametrized scale only shrinks by a relative step."""
    q = make("lsq", 8, signed=True, symmetric=True, per_channel=True, channels=2, is_weight=True)
    w = torch.tensor(np.stack([rng.normal(0, 1e-4, 27), rng.normal(0, 1.0, 27)]).astype(np.float32))
    q(w)  # initializes from the weights: channel 0 has a scale near 1e-6
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        ((q(w) - w) ** 2).sum().backward()
        optimizer.step()
    scale = q.qparams()[0]
    assert (scale > 0).all() and scale[0] > 1e-7


def test_registry_lists_known_names():
    assert set(ALL) <= set(QUANTIZERS)
    with pytest.raises(KeyError, match="known: .*lsq"):
        QUANTIZERS.get("lsq++")


def test_activation_quantizer_refuses_to_run_uncalibrated():
    q = make("fixed", 8)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.ones(3))


def test_observe_then_quantize_freezes_qparams(rng):
    from deployq.qat.calibrate import set_mode

    q = make("lsq", 8)
    model = torch.nn.Sequential(q)
    set_mode(model, "observe")
    q(torch.tensor([-1.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    set_mode(model, "quantize")
    s, zp = q.qparams()
    assert s.item() == pytest.approx(5.0 / 255, rel=1e-6) and zp.item() == round(1 / (5.0 / 255))
    q(torch.tensor([100.0]))  # quantize mode does not observe
    assert q.qparams()[0].item() == s.item()


def _reference(q, x):
    """The quantizer's formula written with autograd's own elementwise ops (what the fused node
    replaces): LSQ's gradient scale g on the learned scale and offset, and round with the
    straight-through or DSQ's soft-rounding gradient."""

    g = 1.0 / math.sqrt(q._feature_count(x) * q.qmax)
    if hasattr(q, "log_scale"):
        scale = torch.exp(scale_gradient(q.log_scale, g))
    else:
        scale = q.scale
    if q.scale_floor is not None:
        scale = torch.maximum(scale, q.scale_floor)
    if isinstance(q.zero_point, torch.nn.Parameter):
        zp = torch.clamp(round_ste(scale_gradient(q.zero_point, g)), q.qmin, q.qmax)
    else:
        zp = q.zero_point
    if scale.ndim:
        shape = [1] * x.ndim
        shape[q.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    v = x / scale
    if hasattr(q, "alpha") and q.training:
        rounded = straight_through(torch.round(v), soft_round(v, torch.clamp(q.alpha, 1e-4, 0.4999)))
    else:
        rounded = round_ste(v)
    return (torch.clamp(rounded + zp, q.qmin, q.qmax) - zp) * scale


@pytest.mark.parametrize("name", ["fixed", "lsq", "lsq+", "dsq", "dsq_lsq"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("floor", [False, True])
@pytest.mark.parametrize("kernels", ["eager", "C"])
def test_fused_gradients_equal_autograds_own(name, per_channel, floor, kernels):
    """The fused node's closed-form backward gives the gradients autograd computes for the same
    formula written out (to float rounding), for x, the scale, the zero point and DSQ's α, with and
    without a scale floor (above one channel's scale, tied with another's, below a third's); the
    forward is the same, bit for bit. Eagerly and with the C kernels of `deployq train`."""
    spec = QuantSpec(bits=4, signed=False, symmetric=False, per_channel=per_channel, quantizer=name)
    q = create_quantizer(spec, "t", axis=1, channels=3)
    q.set_qparams(np.array([0.11, 0.2, 0.05]) if per_channel else np.array(0.1),
                  np.array([3, 5, 2]) if per_channel else np.array(4))
    q.mode = "quantize"
    q.train()
    if isinstance(q.zero_point, torch.nn.Parameter):
        with torch.no_grad():
            q.zero_point.add_(0.3)  # off the integer grid, as a learned offset is
    if floor:
        s = q._effective_scale().detach()
        q.scale_floor = s * torch.tensor([1.5, 1.0, 0.5]) if per_channel else s * 1.0  # per tensor: a tie
    fake_quant.use_compiled_kernels(kernels == "C")
    assert (fake_quant._NATIVE[0] is not None) == (kernels == "C")
    x = (torch.randn(2, 3, 5, 5) * 0.8 + 0.2).requires_grad_()
    weight = torch.randn(2, 3, 5, 5)
    params = [p for p in q.parameters() if p.requires_grad]
    assert torch.equal(q(x), _reference(q, x))
    fused = torch.autograd.grad((q(x) * weight).sum(), [x, *params])
    reference = torch.autograd.grad((_reference(q, x) * weight).sum(), [x, *params])
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_kernels_give_the_eager_gradients():
    """torch.compile'd math (what `deployq train` uses on CUDA; here inductor's C++) against the
    eager functions: the gradients to float tolerance, the forward bit for bit, half-step ties
    included (the quotient x / s comes from an eager division; (q − zp)·s must stay uncontracted)."""
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 3, 64, generator=gen), torch.randn(2, 3, 64, generator=gen)
    s, zp, alpha = torch.full((1, 3, 1), 0.07), torch.tensor([2.0, 5.0, 9.0]).reshape(1, 3, 1), torch.tensor(0.2)
    bounds = (torch.tensor(0.0), torch.tensor(15.0))
    ties = (torch.randint(-40, 40, (4, 3, 4096), generator=gen) + 0.5) * s * torch.rand(1, 3, 1, generator=gen).add(0.5)
    scales = torch.rand(1, 3, 1, generator=gen) * 0.05 + 1e-3
    ties[:, :, ::2] = (torch.randint(-300, 300, (4, 3, 2048), generator=gen) + 0.5) * scales
    wide = (torch.tensor(-128.0), torch.tensor(127.0))
    eager = fake_quant._gradients_dsq(grad, x / s, s, zp, alpha, *bounds)
    eager_forward = [fake_quant._fake_quantize_forward(ties, scale, zp, *wide) for scale in (scales, scales[:, :1])]
    fake_quant.use_compiled_kernels(True)
    try:
        compiled = fake_quant._KERNELS["dsq"](grad, x / s, s, zp, alpha, *bounds)
        # the CUDA path: the compiled elementwise terms, summed by torch's own reduction
        terms = fake_quant._summed(fake_quant._KERNELS["dsq_terms"](grad, x / s, s, zp, alpha, *bounds))
        forward = [fake_quant._KERNELS["forward"](ties / scale, scale, zp, *wide) for scale in (scales, scales[:, :1])]
    finally:
        fake_quant.use_compiled_kernels(False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(terms) == len(eager) == 4
    for a, b in zip(terms, eager):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(forward, eager_forward):
        assert torch.equal(a, b)


def test_readiness_is_remembered_once_true_and_forgotten_on_loading_a_state_dict():
    """is_ready() reads the `initialized` buffer until it is true (a CUDA model would wait for the
    device at every call otherwise); loading an uncalibrated state dict makes it read again, so
    quantize mode before calibration is still refused."""
    q = create_quantizer(QuantSpec(), "act")
    blank = {k: v.clone() for k, v in q.state_dict().items()}
    q.mode = "quantize"
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.rand(2, 3))
    q.set_qparams(np.array(0.1), np.array(0.0))
    assert q.is_ready() and q(torch.rand(2, 3)).shape == (2, 3)
    q.load_state_dict(blank)
    assert not q.is_ready()
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.rand(2, 3))


def test_code_range_tensors_live_on_the_datas_device():
    low, high = fake_quant._bounds(0, 255, torch.float32, torch.device("meta"))
    assert low.device.type == high.device.type == "meta" and float(fake_quant._bounds(0, 255, torch.float32,
                                                                                        torch.device("cpu"))[1]) == 255


def test_a_searching_weight_observer_runs_again_only_when_the_weight_changes(monkeypatch, rng):
    """Weight qparams follow the weight at every forward; with the MSE search (4-bit ``auto``) the
    qparams of unchanged values are remembered, and a changed weight gets its own again."""
    from deployq.qat import quantizers

    runs = []
    real = quantizers.create_observer
    monkeypatch.setattr(quantizers, "create_observer", lambda *a: runs.append(a) or real(*a))
    spec = QuantSpec(bits=4, signed=True, symmetric=True, per_channel=True)
    q = create_quantizer(spec, "w", axis=0, channels=3, is_weight=True)
    q.mode = "quantize"
    weight = torch.from_numpy(rng.laplace(0, 1, (3, 50)).astype(np.float32))
    first = q(weight)
    runs.clear()
    assert torch.equal(q(weight.clone()), first) and not runs
    q.set_qparams(np.ones(3), np.zeros(3))  # someone else's qparams: the remembered ones come back
    assert torch.equal(q(weight), first)
    changed = weight * 2
    doubled = q(changed)
    assert len(runs) == 1
    fresh = create_quantizer(spec, "w", axis=0, channels=3, is_weight=True)
    fresh.mode = "quantize"
    assert torch.equal(doubled, fresh(changed))


@pytest.mark.parametrize("weight,searched", [({"bits": 4}, True), ({"bits": 4, "quantizer": "lsq"}, False),
                                             ({"bits": 4, "observer": "minmax"}, False), ({"bits": 8}, False)])
def test_training_is_told_which_weights_search_their_range_at_every_step(weight, searched):
    """`deployq train` names the weight quantizers that would run the MSE search at every step."""
    import deployq
    from deployq.examples import zoo
    from deployq.qat.calibrate import weights_searched_every_step

    qmodel = deployq.prepare(zoo.reused(), torch.randn(1, 3, 16, 16), {"weight": weight})
    names = weights_searched_every_step(qmodel)
    assert bool(names) == searched and all(n.endswith("weight") for n in names)
