"""The fake quantizers' C kernels (deployq/qat/kernels.c through deployq.qat.native): the forward equal
to the eager torch forward bit for bit, the gradients equal to the eager ones to float rounding, the
work split the same whatever the shape or thread count, the build cached and atomic, and a clear
fallback where no compiler works. The closed-form gradients through a quantizer's stored
parameters are tested against autograd in test_quantizers.py (its `kernels="C"` cases)."""

import numpy as np
import pytest
import torch

from deployq.qat import fake_quant, native

# shapes as the kernels see them, (outer, channels, inner): a per-tensor activation over several
# work chunks, per-channel weights with long rows, and ConvTranspose weights per output channel
# (axis 1) whose rows hold 4 values each
SHAPES = [(1, 1, 3 * 16384 + 5), (1, 8, 1000), (64, 16, 4), (3, 5, 1)]


def _case(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    scale = torch.rand(channels, generator=gen) * 0.05 + 0.01
    zero_point = torch.randint(0, 40, (channels,), generator=gen).float()
    # x: half exact ties (k + ½)·s, half anywhere, some beyond the code range
    codes = torch.randint(-100, 300, shape, generator=gen).float()
    x = (codes + 0.5) * scale.reshape(1, -1, 1)
    x[..., ::2] = torch.randn(x[..., ::2].shape, generator=gen) * 3
    grad = torch.randn(shape, generator=gen)
    return x, grad, scale, zero_point


def _eager(x, grad, scale, zero_point, alpha):
    s, zp = scale.reshape(1, -1, 1), zero_point.reshape(1, -1, 1)
    bounds = (torch.tensor(0.0), torch.tensor(255.0))
    forward = fake_quant._fake_quantize_forward(x, s, zp, *bounds)
    if alpha is None:
        return forward, (*fake_quant._gradients_ste(grad, x / s, s, zp, *bounds), torch.tensor(0.0))
    return forward, fake_quant._gradients_dsq(grad, x / s, s, zp, torch.tensor(alpha), *bounds)


@pytest.fixture(scope="module")
def kernels():
    built = native.load()
    assert built is not None, native.FAILURE
    return built


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [None, 0.2])
def test_c_kernels_equal_the_eager_functions(kernels, shape, alpha):
    """Forward bit for bit (ties included); ∂L/∂x and the per-channel sums to float rounding."""
    x, grad, scale, zero_point = _case(shape)
    forward, gradients = _eager(x, grad, scale, zero_point, alpha)
    assert torch.equal(kernels.forward(x, shape, scale, None, zero_point, False, 0.0, 255.0), forward)
    got = kernels.gradients(grad, x, shape, scale, None, zero_point, False, alpha, fake_quant.ALPHA_RANGE, 0.0, 255.0,
                            1.0, False)
    for a, b in zip(got, gradients):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=2e-5, atol=1e-5)


def test_c_forward_uses_the_floor_and_rounds_a_learned_zero_point(kernels):
    """s = max(s, floor) and zp = clamp(rint(zp), qmin, qmax) inside the kernel, as torch computes them."""
    shape = (2, 3, 50)
    x, _, scale, _ = _case(shape)
    floor = scale * torch.tensor([2.0, 1.0, 0.5])
    zero_point = torch.tensor([3.4, 260.0, -7.6])
    s = torch.maximum(scale, floor).reshape(1, -1, 1)
    zp = torch.clamp(torch.round(zero_point), 0, 255).reshape(1, -1, 1)
    expected = fake_quant._fake_quantize_forward(x, s, zp, torch.tensor(0.0), torch.tensor(255.0))
    assert torch.equal(kernels.forward(x, shape, scale, floor, zero_point, True, 0.0, 255.0), expected)


def test_c_gradients_do_not_depend_on_the_thread_count(kernels):
    """Partial sums are added in a fixed order: one thread and two give the same bits."""
    shape = (4, 3, 20000)
    x, grad, scale, zero_point = _case(shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(kernels.gradients(grad, x, shape, scale, None, zero_point, False, 0.3,
                                             fake_quant.ALPHA_RANGE, 0.0, 255.0, 1.0, False))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_build_is_cached_under_xdg_cache_home_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load() is not None, native.FAILURE
        files = list((tmp_path / "deployq" / "kernels").iterdir())
        assert len(files) == 1 and files[0].name.startswith("deployq_kernels_") and files[0].suffix == ".so"
        stamp = files[0].stat().st_mtime_ns
        native.load.cache_clear()
        assert native.load() is not None and files[0].stat().st_mtime_ns == stamp  # read, not rebuilt
    finally:
        native.load.cache_clear()


def test_without_a_compiler_training_warns_and_runs_eagerly(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C kernels were not built.*no-such-cc"):
            fake_quant.use_compiled_kernels(True)
        assert fake_quant._NATIVE[0] is None
        assert not (tmp_path / "deployq" / "kernels").exists() or not any((tmp_path / "deployq" / "kernels").iterdir())
        x, _, scale, zero_point = _case((1, 1, 100))
        rule = fake_quant.Rule(0, 255, None)
        y = fake_quant.FakeQuantize.apply(x.reshape(-1), scale[:1].reshape(()), zero_point[:1].reshape(()), None, None,
                                          rule, 1.0)
        expected = fake_quant._fake_quantize_forward(x, scale[:1], zero_point[:1], torch.tensor(0.0),
                                                     torch.tensor(255.0))
        assert torch.equal(y, expected.reshape(-1))
    finally:
        fake_quant.use_compiled_kernels(False)
        native.load.cache_clear()


def test_c_kernels_serve_float32_on_the_cpu_only(kernels):
    fake_quant.use_compiled_kernels(True)
    x = torch.zeros(3)
    assert isinstance(fake_quant._native_for(x, torch.ones(())), native.Kernels)
    assert fake_quant._native_for(x.double(), torch.ones((), dtype=torch.float64)) is None
    assert fake_quant._native_for(x, torch.ones((), dtype=torch.float64)) is None
    assert np.isfinite(float(kernels.forward(torch.ones(1, 1, 4), (1, 1, 4), torch.ones(1), None, torch.zeros(1),
                                             False, 0.0, 255.0).sum()))


@pytest.mark.parametrize("alpha", [0.6, 1e-6])
def test_c_kernels_clamp_alpha_and_stop_its_gradient_outside_the_range(alpha):
    """DSQ's α beyond ALPHA_RANGE: both paths round softly with the clamped α and give α no gradient."""
    from deployq.core.qspec import QuantSpec
    from deployq.qat.quantizers import create_quantizer

    q = create_quantizer(QuantSpec(bits=8, signed=False, symmetric=False, quantizer="dsq_lsq"), "t")
    q.set_qparams(np.array(0.03), np.array(7))
    q.mode = "quantize"
    q.train()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    x, grad, _, _ = _case((2, 3, 500))
    results = []
    for fused in (False, True):
        fake_quant.use_compiled_kernels(fused)
        xs = x.clone().requires_grad_()
        results.append(torch.autograd.grad((q(xs) * grad).sum(), [xs, q.log_scale, q.zero_point, q.alpha]))
    fake_quant.use_compiled_kernels(False)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    assert results[1][3].item() == 0.0


def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch):
    """Apple's clang knows no -fopenmp: the kernels are built without it (one thread), equal results."""
    import shutil

    real = shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(wrapper))
    native.load.cache_clear()
    try:
        kernels = native.load()
        assert kernels is not None, native.FAILURE
        x, grad, scale, zero_point = _case((2, 3, 20000))
        forward, _ = _eager(x, grad, scale, zero_point, None)
        assert torch.equal(kernels.forward(x, x.shape, scale, None, zero_point, False, 0.0, 255.0), forward)
    finally:
        native.load.cache_clear()


def test_a_gradient_of_the_gradient_is_taken_through_torch_not_the_c_kernels():
    """create_graph=True (Hessian-vector products, `deployq hessian --mode quantize`): the backward
    runs torch's operations, so the second derivative is the same with the C kernels on as off."""
    from deployq.core.qspec import QuantSpec
    from deployq.qat.quantizers import create_quantizer

    q = create_quantizer(QuantSpec(bits=8, signed=False, symmetric=False, quantizer="dsq_lsq"), "t")
    q.set_qparams(np.array(0.03), np.array(7))
    q.mode = "quantize"
    q.train()
    x, v, _, _ = _case((2, 3, 300))
    products = []
    for fused in (False, True):
        fake_quant.use_compiled_kernels(fused)
        xs = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((q(xs) * xs).sum(), xs, create_graph=True)
        products.append(torch.autograd.grad((g * v).sum(), xs)[0])
    fake_quant.use_compiled_kernels(False)
    assert products[0].abs().sum() > 0
    torch.testing.assert_close(products[1], products[0])


def test_c_kernels_take_an_empty_tensor(kernels):
    """No element (an empty batch): an empty result and zero gradient sums, not an allocation error."""
    x = torch.zeros(0, 3, 7)
    scale, zero_point = torch.full((3,), 0.1), torch.zeros(3)
    assert kernels.forward(x, x.shape, scale, None, zero_point, False, 0.0, 255.0).shape == x.shape
    grad_x, grad_s, grad_zp, grad_alpha = kernels.gradients(x, x, x.shape, scale, None, zero_point, False, 0.2,
                                                            fake_quant.ALPHA_RANGE, 0.0, 255.0, 1.0, False)
    assert grad_x.shape == x.shape and not grad_s.any() and not grad_zp.any() and grad_alpha.item() == 0.0


def test_qat_steps_with_the_c_kernels_follow_the_eager_ones():
    """A few Adam steps of a whole QAT model (LSQ+ scales and offsets, DSQ's α, the int32-bias
    floors, per-channel weights) with the C kernels and eagerly, from the same start: the same
    losses and parameters to float rounding (a wrong sign or factor anywhere would drift apart)."""
    import copy

    import deployq
    from deployq.examples import zoo

    config = {"weight": {"quantizer": "dsq_lsq"}, "activation": {"quantizer": "dsq_lsq"}}
    gen = torch.Generator().manual_seed(0)
    data = [torch.rand((4, 3, 16, 16), generator=gen) for _ in range(3)]
    student = deployq.prepare(zoo.resnet().train(), (data[0][:1],), config)
    deployq.calibrate(student, data, progress=False)
    runs = []
    for fused in (False, True):
        model = copy.deepcopy(student)
        fake_quant.use_compiled_kernels(fused)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for x in data * 3:
            loss = model(x).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    fake_quant.use_compiled_kernels(False)
    (eager_losses, eager_params), (c_losses, c_params) = runs
    assert eager_losses[-1] < eager_losses[0]  # it trains
    np.testing.assert_allclose(c_losses, eager_losses, rtol=1e-3)
    assert float((c_params - eager_params).norm() / eager_params.norm()) < 1e-3


def test_export_runs_the_c_kernels_while_it_calibrates_and_leaves_the_setting_as_it_was(monkeypatch, tmp_path):
    """native_kernels_where_built: the C kernels serve the quantizers inside the block (what export
    wraps its calibration and PTQ in) and not after it; where none build, the block runs eagerly
    without a warning (export is not training: nothing to switch off)."""
    served = []
    real = fake_quant._native_for
    monkeypatch.setattr(fake_quant, "_native_for", lambda x, s: served.append(real(x, s)) or served[-1])
    x, _, scale, zero_point = _case((1, 4, 50))
    rule = fake_quant.Rule(0, 255, 1)
    run = lambda: fake_quant.FakeQuantize.apply(x, scale, zero_point, None, None, rule, 1.0)  # noqa: E731
    assert fake_quant._NATIVE[0] is None
    eager = run()
    with fake_quant.native_kernels_where_built():
        inside = run()
    after = run()
    assert served[0] is None and served[1] is not None and served[2] is None
    assert torch.equal(inside, eager) and torch.equal(after, eager)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.load.cache_clear()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with fake_quant.native_kernels_where_built():
                assert torch.equal(run(), eager) and fake_quant._NATIVE[0] is None
    finally:
        native.load.cache_clear()
