"""Observers give the expected range on known distributions and fail clearly on bad data."""

import numpy as np
import pytest
import torch

from deployq.qat.observers import OBSERVERS, create_observer
from deployq.core.qformula import ZeroRangeWarning, dequantize_np, quantize_np
from deployq.core.qspec import QuantSpec

U8 = QuantSpec(bits=8)
S8_SYM = QuantSpec(bits=8, signed=True, symmetric=True)


def observe(name, batches, spec=U8, axis=None, **args):
    spec = QuantSpec(**{**spec.to_dict(), "observer": name, "observer_args": args})
    obs = create_observer(spec, axis, "layer.x")
    for b in batches:
        obs.update(torch.as_tensor(b))
    return obs


def test_minmax_per_tensor_and_per_channel(rng):
    a, b = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8)) * 3
    lo, hi = observe("minmax", [a, b]).compute_range()
    assert lo == pytest.approx(min(a.min(), b.min())) and hi == pytest.approx(max(a.max(), b.max()))
    per = QuantSpec(bits=8, per_channel=True)
    lo, hi = observe("minmax", [a, b], spec=per, axis=1).compute_range()
    both = np.concatenate([a, b])
    np.testing.assert_allclose(lo, both.min(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(hi, both.max(axis=(0, 2)), rtol=1e-6)


def test_ema_minmax_follows_the_formula():
    obs = observe("ema_minmax", [np.array([-1.0, 1.0]), np.array([-3.0, 5.0])], momentum=0.75)
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(0.75 * -1 + 0.25 * -3) and hi == pytest.approx(0.75 * 1 + 0.25 * 5)


def test_percentile_on_a_gaussian(rng):
    batches = [rng.normal(size=200_000).astype(np.float32) for _ in range(5)]
    lo, hi = observe("percentile", batches, lower=0.1, upper=99.9).compute_range()
    assert hi == pytest.approx(3.09, rel=0.02) and lo == pytest.approx(-3.09, rel=0.02)
    lo3, hi3 = observe("percentile", batches, lower=3, upper=97).compute_range()  # the thesis' 3% tails
    assert hi3 == pytest.approx(1.88, rel=0.02)


def test_percentile_survives_a_growing_range(rng):
    batches = [rng.uniform(0, 1, 100_000), rng.uniform(0, 4, 100_000), rng.uniform(0, 2, 100_000)]
    _, hi = observe("percentile", batches, lower=0, upper=50).compute_range()
    everything = np.concatenate(batches)
    assert hi == pytest.approx(np.percentile(everything, 50), rel=0.02)


def test_mse_keeps_the_range_of_uniform_data_and_clips_outliers(rng):
    uniform = [rng.uniform(-1, 1, 100_000).astype(np.float32)]
    lo, hi = observe("mse", uniform, spec=S8_SYM).compute_range()
    assert hi == pytest.approx(1.0, abs=0.03)
    heavy = [np.concatenate([rng.laplace(0, 0.1, 200_000), [25.0]]).astype(np.float32)]
    _, hi = observe("mse", heavy, spec=QuantSpec(bits=4, signed=True, symmetric=True)).compute_range()
    assert hi < 0.5 * 25


def test_kl_clips_a_far_outlier_and_not_uniform_data(rng):
    data = [np.concatenate([rng.normal(0, 1, 300_000), [40.0]]).astype(np.float32)]
    _, hi = observe("kl", data, spec=S8_SYM).compute_range()
    assert 2.0 < hi < 20.0
    _, hi = observe("kl", [rng.uniform(-1, 1, 300_000).astype(np.float32)], spec=S8_SYM).compute_range()
    assert hi > 0.9


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_errors_name_the_quant_point(name):
    with pytest.raises(ValueError, match="layer.x.*NaN"):
        observe(name, [np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match="layer.x.*Inf"):
        observe(name, [np.array([1.0, -np.inf])])
    with pytest.raises(ValueError, match="layer.x.*no calibration data"):
        observe(name, []).qparams()



DATA_DRIVEN = [name for name in OBSERVERS if name != "probability"]  # probability: a fixed range, tested apart


@pytest.mark.parametrize("name", DATA_DRIVEN)
def test_all_zero_data_warns_and_keeps_zero_exact(name):
    """A quant point that only ever saw 0 (torchvision initialises some classifiers to zeros)
    gets the range [-1, 1] and a warning naming it, not an error that stops the export."""
    with pytest.warns(ZeroRangeWarning, match="layer.x"):
        scale, zp = observe(name, [np.zeros(10)]).qparams()
    assert float(scale) == pytest.approx(2 / 255)
    assert dequantize_np(quantize_np(np.zeros(3, np.float32), scale, zp, 0, 255), scale, zp)[0] == 0.0


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_scale_is_always_positive(name, rng):
    obs = observe(name, [rng.normal(size=10_000).astype(np.float32)])
    scale, zp = obs.qparams()
    assert scale > 0 and 0 <= zp <= 255


@pytest.mark.parametrize("name", DATA_DRIVEN)
def test_per_channel_ranges_are_each_channels_own(name, rng):
    """Channel c of the data is channel 0's scaled by 2^c: each observer's range scales the same way
    (every observer here is scale-equivariant), channel by channel."""
    base = rng.normal(size=(4, 1, 4000)).astype(np.float32)
    data = base * (2.0 ** np.arange(3, dtype=np.float32))[None, :, None]
    lo, hi = observe(name, [data[:2], data[2:]], spec=QuantSpec(bits=8, signed=True, per_channel=True), axis=1).compute_range()
    assert np.shape(hi) == (3,)
    np.testing.assert_allclose(np.asarray(hi) / hi[0], [1, 2, 4], rtol=0.05)
    np.testing.assert_allclose(np.asarray(lo) / lo[0], [1, 2, 4], rtol=0.05)


def test_kl_merging_matches_a_chunk_by_chunk_reference():
    """The vectorized merge-and-spread of the KL observer against np.array_split, chunk by chunk."""
    from deployq.qat.observers import _merged_and_spread

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(16, 600))
        levels = int(rng.integers(2, n + 1))
        counts = rng.integers(0, 5, n).astype(float) * (rng.random(n) > 0.3)
        expected = np.zeros(n)
        for idx in np.array_split(np.arange(n), levels):
            nonzero = counts[idx] > 0
            if nonzero.any():
                expected[idx[nonzero]] = counts[idx].sum() / nonzero.sum()
        np.testing.assert_allclose(_merged_and_spread(counts, levels), expected, rtol=1e-12, atol=0)


def _quantization_mse(x, lo, hi, spec):
    from deployq.core.qformula import qparams_from_range

    scale, zp = qparams_from_range(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    return float(np.mean((dequantize_np(quantize_np(x, scale, zp, spec.qmin, spec.qmax), scale, zp) - x) ** 2))


def test_auto_is_minmax_at_8_bits_and_mse_at_4_bits_where_it_lowers_the_error(rng):
    """The default observer: min/max at 8 bits (every earlier result unchanged), the MSE search at 4,
    where a trained layer's few large weights stretch min/max over codes the rest never use. On
    such data (Laplace values and one outlier) the 4-bit range it picks has a lower error."""
    data = np.concatenate([rng.laplace(0, 0.1, 20_000), [1.5]]).astype(np.float32)
    for bits, expected in ((8, "minmax"), (4, "mse")):
        spec = QuantSpec(bits=bits, signed=True, symmetric=True)
        assert spec.observer == "auto" and spec.observer_name == spec.observer_label == expected
        auto = create_observer(spec, None, "w")
        auto.update(torch.from_numpy(data))
        named = observe(expected, [data], spec=spec)
        assert auto.compute_range() == named.compute_range()
    four = QuantSpec(bits=4, signed=True, symmetric=True)
    chosen, widest = observe("auto", [data], spec=four).compute_range(), observe("minmax", [data], spec=four).compute_range()
    assert _quantization_mse(data, *chosen, four) < 0.5 * _quantization_mse(data, *widest, four)
    assert QuantSpec(bits=4, observer="minmax").observer_name == "minmax"  # a named observer at any width
    with pytest.raises(ValueError, match="observer_args need a named observer"):
        QuantSpec(bits=4, observer_args={"steps": 10})


@pytest.mark.parametrize("spec,shape,axis", [
    (QuantSpec(bits=4, signed=True, symmetric=True, per_channel=True), (64, 300), 0),
    (QuantSpec(bits=8, per_channel=True), (5, 16, 7, 7), 1),
    (QuantSpec(bits=3), (2, 4000), None),
])
def test_mse_search_of_all_channels_at_once_equals_channel_by_channel(spec, shape, axis, rng):
    """MSEObserver's vectorized range against its own per-channel definition (_channel_range), with
    heavy-tailed channels of different spreads and one channel that saw a single value."""
    from deployq.qat.observers import _HistogramObserver

    x = rng.laplace(0, 1, shape) * rng.uniform(0.1, 3, (shape[0],) + (1,) * (len(shape) - 1))
    if axis is not None:
        index = [slice(None)] * len(shape)
        index[axis] = 2
        x[tuple(index)] = 0.25
    obs = observe("mse", [x.astype(np.float32)], spec=spec, axis=axis)
    fast, reference = obs._range(), _HistogramObserver._range(obs)
    np.testing.assert_array_equal(fast[0], reference[0])
    np.testing.assert_array_equal(fast[1], reference[1])
