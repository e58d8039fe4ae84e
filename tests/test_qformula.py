"""The one formula (docs/design.md, contract 2) against an independent numpy reference."""

import numpy as np
import pytest
import torch

from deployq.core.qformula import (ZeroRangeWarning, bias_is_quantized, dequantize, fake_quantize, qparams_from_range,
                              qrange, quantize, quantize_np)


def reference(x, s, zp, qmin, qmax):
    """Written from the ONNX QuantizeLinear spec: saturate(round_half_even(x / s) + zp)."""
    x = np.asarray(x, np.float32)
    q = np.rint(np.divide(x, np.float32(s), dtype=np.float32)) + zp
    return np.clip(q, qmin, qmax)


@pytest.mark.parametrize("bits,signed,expected", [(8, False, (0, 255)), (8, True, (-128, 127)),
                                                  (10, False, (0, 1023)), (16, True, (-32768, 32767)),
                                                  (2, True, (-2, 1))])
def test_qrange(bits, signed, expected):
    assert qrange(bits, signed) == expected


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 8.0, True])
def test_qrange_rejects_widths_outside_2_to_16(bits):
    with pytest.raises(ValueError, match="from 2 to 16"):
        qrange(bits, False)


def test_ties_round_to_even_and_division_is_true_division(rng):
    s = np.float32(0.0123)  # not a power of two: x / s and x * (1/s) differ near ties
    k = np.arange(-30000, 30000, dtype=np.float64)
    x = ((k + 0.5) * float(s)).astype(np.float32)
    x = np.concatenate([x, rng.normal(0, 100, 5000).astype(np.float32)])
    want = reference(x, s, 3, -32768, 32767)
    ours = quantize(torch.from_numpy(x), torch.tensor(s), torch.tensor(3.0), -32768, 32767).numpy()
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(quantize_np(x, s, 3, -32768, 32767), want)
    by_reciprocal = np.clip(np.rint(x * (np.float32(1) / s)) + 3, -32768, 32767)
    assert (by_reciprocal != want).mean() > 0.1, "the test must contain ties where the two differ"


def test_zero_point_added_after_rounding():
    x = torch.tensor([2.5000002], dtype=torch.float32)  # rint(x) = 3, rint(x + 100) = 102 in float32
    assert quantize(x, torch.tensor(1.0), torch.tensor(100.0), 0, 255).item() == 103


def test_per_channel_axis(rng):
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    s = np.array([0.1, 0.02, 0.3], np.float32)
    zp = np.array([0, 5, -3], np.float32)
    got = quantize(torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(zp), -128, 127, axis=1).numpy()
    want = np.stack([reference(x[:, c], s[c], zp[c], -128, 127) for c in range(3)], axis=1)
    np.testing.assert_array_equal(got, want)
    back = dequantize(torch.from_numpy(got), torch.from_numpy(s), torch.from_numpy(zp), axis=1).numpy()
    np.testing.assert_array_equal(back, ((want - zp[None, :, None]) * s[None, :, None]).astype(np.float32))


def test_ten_bit_unsigned_has_1024_levels():
    x = torch.linspace(-1, 2, 100_000)
    s, zp = qparams_from_range(-0.5, 1.5, 0, 1023, symmetric=False)
    out = fake_quantize(x, torch.from_numpy(s), torch.from_numpy(zp).float(), 0, 1023)
    assert out.unique().numel() == 1024


def test_qparams_affine_represents_zero_exactly():
    s, zp = qparams_from_range(-0.37, 2.9, 0, 255, symmetric=False)
    assert float(fake_quantize(torch.zeros(1), torch.from_numpy(s), torch.tensor(float(zp)), 0, 255)) == 0.0
    assert s > 0 and 0 <= zp <= 255


def test_qparams_symmetric_signed_covers_max():
    s, zp = qparams_from_range(np.array([-1.0, -0.1]), np.array([0.5, 2.0]), -128, 127, symmetric=True)
    np.testing.assert_allclose(s, np.array([1.0, 2.0]) / 127, rtol=1e-6)
    assert (zp == 0).all()


@pytest.mark.parametrize("lo,hi", [(np.nan, 1.0), (0.0, np.inf), (1.0, 0.5)])
def test_qparams_reject_non_finite_and_inverted_ranges(lo, hi):
    with pytest.raises(ValueError, match="layer.x"):
        qparams_from_range(lo, hi, 0, 255, symmetric=False, name="layer.x")


@pytest.mark.parametrize("qmin,qmax,symmetric,scale,zp", [(0, 255, False, 2 / 255, 128), (-128, 127, False, 2 / 255, 0),
                                                          (-128, 127, True, 1 / 127, 0), (0, 255, True, 1 / 255, 0)])
def test_all_zero_range_gets_default_range_with_a_warning(qmin, qmax, symmetric, scale, zp):
    with pytest.warns(ZeroRangeWarning, match="layer.x: every value seen was 0"):
        s, z = qparams_from_range(0.0, 0.0, qmin, qmax, symmetric, name="layer.x")
    assert float(s) == pytest.approx(scale) and int(z) == zp


def test_zero_range_channels_get_the_default_and_others_keep_theirs():
    with pytest.warns(ZeroRangeWarning, match="1 of 2 channels"):
        s, z = qparams_from_range(np.array([0.0, -1.0]), np.array([0.0, 3.0]), -128, 127, True, name="w")
    np.testing.assert_allclose(s, [1 / 127, 3 / 127], rtol=1e-6)


def test_bias_quantized_only_for_integer_kernels():
    assert bias_is_quantized(8, 8)
    assert not bias_is_quantized(10, 8) and not bias_is_quantized(8, 10) and not bias_is_quantized(None, 8)


def test_decibels_are_defined_once_with_their_edge_cases():
    import math

    from deployq.core.decibels import psnr_db, ratio_db

    assert ratio_db(100.0, 1.0) == pytest.approx(20.0)
    assert ratio_db(1.0, 0.0) == math.inf and ratio_db(0.0, 1.0) == -math.inf
    assert psnr_db(1e-2) == pytest.approx(20.0) and psnr_db(255.0 ** 2 * 1e-4, peak=255.0) == pytest.approx(40.0)
