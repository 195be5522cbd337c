"""Activation observers: exact ranges, clipping that pays in SQNR dB, streaming, and the plan's scale rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeq.calibration.observers import (
    OBSERVERS,
    _expected_sq_error,
    _kl,
    activation_quant,
    make_observer,
)
from edgeq.plan import QDtype

HISTOGRAM_OBSERVERS = ("percentile", "mse", "entropy")
RNG = np.random.default_rng(0)
# A million values, about one layer's batch: with far fewer, the tail bins a clipped candidate ends in are
# mostly empty and entropy calibration's choice is noise (it tied minmax for some seeds at 200k values).
LAPLACE = RNG.laplace(size=1_000_000).astype(np.float32)
RELU = np.maximum(RNG.laplace(size=1_000_000), 0).astype(np.float32)  # half of the values exactly 0
GAUSS_OUTLIERS = np.concatenate([RNG.standard_normal(200_000), [40.0, -35.0, 60.0]]).astype(np.float32)


def _fed(name: str, data: np.ndarray, dtype=QDtype.INT8, symmetric=True, chunks=1, **options):
    observer = make_observer(name, dtype, symmetric, **options)
    for chunk in np.array_split(data, chunks):
        observer.observe(chunk)
    return observer


def _sqnr_db(data: np.ndarray, lo: float, hi: float, dtype: QDtype, symmetric: bool) -> float:
    quant = activation_quant(lo, hi, dtype, symmetric)
    error = quant.dequantize(quant.quantize(data)) - data.astype(np.float64)
    return 10 * math.log10(np.sum(data.astype(np.float64) ** 2) / np.sum(error**2))


def _steps_off(quant, values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return np.abs(quant.dequantize(quant.quantize(values)) - values) / quant.scale


def test_minmax_is_the_exact_running_range_with_zero():
    observer = make_observer("minmax", QDtype.INT8, False)
    observer.observe(torch.tensor([[0.5, 2.0], [3.25, 1.0]]))
    observer.observe(np.array([1.5, 7.75, 0.25], dtype=np.float64))
    assert observer.range() == (0.0, 7.75)  # all positive: the range still holds 0
    observer.observe(torch.tensor([-2.5]))
    assert observer.range() == (-2.5, 7.75)


@pytest.mark.parametrize("dtype", [QDtype.UINT8, QDtype.INT8, QDtype.INT16, QDtype.INT4])
@pytest.mark.parametrize("lo, hi", [(-0.3, 5.1), (0.0, 6.0), (-3.0, 0.0), (-1e-3, 1e3), (-7.7, 7.7)])
def test_asymmetric_quant_holds_zero_and_both_ends(dtype, lo, hi):
    quant = activation_quant(lo, hi, dtype, symmetric=False)
    assert quant.scale.dtype == np.float32 and quant.scale.shape == ()
    assert quant.dequantize(quant.quantize(np.float32(0.0))) == 0.0  # 0 is exactly a code
    assert _steps_off(quant, [lo, hi]).max() <= 0.5 + 1e-3
    assert quant.scale == pytest.approx((hi - lo) / (dtype.qmax - dtype.qmin), rel=1e-6)  # no slack added


@pytest.mark.parametrize(
    "dtype, zero_point, divisor", [(QDtype.INT8, 0, 127), (QDtype.UINT8, 128, 127), (QDtype.INT16, 0, 32767)]
)
def test_symmetric_quant_uses_the_dtype_zero_point(dtype, zero_point, divisor):
    quant = activation_quant(-2.0, 3.5, dtype, symmetric=True)
    assert quant.zero_point == zero_point
    assert quant.scale == pytest.approx(3.5 / divisor, rel=1e-6)
    assert _steps_off(quant, [-3.5, -2.0, 0.0, 3.5]).max() <= 0.5 + 1e-3
    assert quant.dequantize(quant.quantize(np.float32(0.0))) == 0.0


@pytest.mark.parametrize(
    "dtype, symmetric", [(QDtype.UINT8, False), (QDtype.INT8, True), (QDtype.INT16, False), (QDtype.INT16, True)]
)
def test_float16_scales_are_float16_exact_and_cover_the_range(dtype, symmetric):
    rng = np.random.default_rng(1)  # local: the draw must not depend on which tests ran before
    for lo, hi in zip(-rng.uniform(0, 3, 50) ** 3, rng.uniform(0, 3, 50) ** 3):
        quant16 = activation_quant(lo, hi, dtype, symmetric, scale_dtype="float16")
        quant32 = activation_quant(lo, hi, dtype, symmetric)
        scale = float(quant16.scale)
        assert float(np.float16(scale)) == scale  # what Core ML stores is what the plan holds
        # Rounded up, by at most an fp16 ulp, and never below float16's smallest normal.
        assert quant32.scale <= scale <= max(quant32.scale * (1 + 2**-10), 2**-14)
        # Rounded up, so the ends stay within half a step even with 65536 codes (rounding to nearest could
        # lose 16 steps at int16).
        assert _steps_off(quant16, [lo, hi]).max() <= 0.5 + 1e-3
        assert quant16.dequantize(quant16.quantize(np.float32(0.0))) == 0.0


def test_degenerate_and_invalid_ranges():
    for scale_dtype in ("float32", "float16"):
        for symmetric in (False, True):
            quant = activation_quant(0.0, 0.0, QDtype.UINT8, symmetric, scale_dtype)
            assert 0 < quant.scale < 1e-4 and np.isfinite(quant.scale)
            assert quant.dequantize(quant.quantize(np.float32(0.0))) == 0.0
    assert activation_quant(0.0, 1e-30, QDtype.INT8, True, "float16").scale == 2**-14  # float16's least normal
    for lo, hi in [(1.0, -1.0), (float("nan"), 1.0), (-float("inf"), 0.0)]:
        with pytest.raises(ValueError, match="not a finite interval"):
            activation_quant(lo, hi, QDtype.INT8, False)
    with pytest.raises(ValueError, match="float16, float32|float32, float16"):
        activation_quant(-1, 1, QDtype.INT8, False, "bfloat16")


def test_unknown_observer_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown observer 'max'; valid observers: minmax, percentile, mse, entropy"):
        make_observer("max", QDtype.INT8, True)


@pytest.mark.parametrize("name", OBSERVERS)
def test_all_zeros_empty_batches_and_bad_values(name):
    observer = make_observer(name, QDtype.UINT8, False)
    with pytest.raises(ValueError, match="saw no values"):
        observer.range()
    observer.observe(torch.zeros(0))
    observer.observe(torch.zeros(3, 4))
    assert observer.range() == (0.0, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        observer.observe(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clips_one_huge_outlier_that_minmax_keeps(symmetric):
    data = np.append(GAUSS_OUTLIERS[:100_000], 1000.0)
    assert _fed("minmax", data).range()[1] == 1000.0
    observer = _fed("percentile", data, QDtype.INT8, symmetric, chunks=5)
    lo, hi = observer.range()
    if symmetric:
        expected = np.percentile(np.abs(data), 99.99)
        assert (lo, hi) == (-hi, hi)
    else:
        expected = np.percentile(data, 99.995)
        assert lo == pytest.approx(np.percentile(data, 0.005), abs=observer.histogram.width)
    assert hi == pytest.approx(expected, abs=observer.histogram.width)  # within one bin of the exact one
    assert hi < 5


@pytest.mark.parametrize("percentile", [99.0, 99.99])
def test_percentile_matches_numpy_within_a_bin(percentile):
    data = LAPLACE[:200_000]
    symmetric = _fed("percentile", data, QDtype.INT8, True, chunks=3, percentile=percentile)
    expected = np.percentile(np.abs(data), percentile)
    assert symmetric.range()[1] == pytest.approx(expected, abs=symmetric.histogram.width)
    asymmetric = _fed("percentile", data, QDtype.UINT8, False, chunks=3, percentile=percentile)
    cut = (100 - percentile) / 2  # from each tail
    expected_ends = np.percentile(data, [cut, 100 - cut])
    np.testing.assert_allclose(asymmetric.range(), expected_ends, rtol=0, atol=asymmetric.histogram.width)


@pytest.mark.parametrize(
    "data, dtype, symmetric",
    [
        (LAPLACE, QDtype.INT8, True),
        (LAPLACE, QDtype.UINT8, False),
        (GAUSS_OUTLIERS, QDtype.INT8, True),
        (LAPLACE, QDtype.INT4, True),
    ],
    ids=["laplace-int8-sym", "laplace-uint8-asym", "gauss-outliers-int8-sym", "laplace-int4-sym"],
)
def test_mse_clips_for_less_error_than_every_other_observer(data, dtype, symmetric):
    sqnr = {name: _sqnr_db(data, *_fed(name, data, dtype, symmetric).range(), dtype, symmetric) for name in OBSERVERS}
    # Measured SQNR, minmax -> mse: 32.2 -> 35.4 dB (laplace int8), 32.8 -> 35.4 (uint8), 17.4 -> 20.3
    # (outliers: they carry much of the signal, so mse keeps most of them where percentile and entropy cut
    # them, 15.8 and 15.9 dB), 7.6 -> 16.0 (int4).
    assert sqnr["mse"] >= sqnr["minmax"] + 0.5
    assert sqnr["mse"] >= max(sqnr.values()) - 0.05


@pytest.mark.parametrize("dtype, symmetric", [(QDtype.INT8, True), (QDtype.UINT8, False)])
def test_entropy_beats_minmax_on_laplacian_and_survives_relu_zeros(dtype, symmetric):
    # Measured (int8, uint8): Laplacian 34.4, 34.4 dB vs minmax 32.2, 32.8; ReLU'd 34.6, 39.8 vs 32.2, 38.2.
    # Half of ReLU outputs are exactly 0: without removing that spike KL picks a range a few groups wide
    # (0..2, 8.7 dB at int8).
    for data in (LAPLACE, RELU):
        lo, hi = _fed("entropy", data, dtype, symmetric).range()
        assert lo == 0.0 if data is RELU else lo < 0
        minmax = _sqnr_db(data, *_fed("minmax", data).range(), dtype, symmetric)
        assert _sqnr_db(data, lo, hi, dtype, symmetric) >= minmax + 0.5


@pytest.mark.parametrize("dtype, symmetric", [(QDtype.INT8, True), (QDtype.UINT8, False), (QDtype.INT4, True)])
def test_expected_error_model_matches_the_measured_error(dtype, symmetric):
    data = LAPLACE[:200_000]
    observer = _fed("mse", data, dtype, symmetric)
    quant = activation_quant(*observer.range(), dtype, symmetric)
    measured = np.sum((quant.dequantize(quant.quantize(data)) - data.astype(np.float64)) ** 2)
    hist = observer.histogram
    bins = np.flatnonzero(hist.counts)
    zero = int(quant.zero_point)
    scale, qlo, qhi = np.array([float(quant.scale)]), np.array([dtype.qmin - zero]), np.array([dtype.qmax - zero])
    model = _expected_sq_error((bins - hist.bins) * hist.width, hist.width, hist.counts[bins], scale, qlo, qhi)[0]
    assert model == pytest.approx(measured, rel=0.01)  # measured within 0.03%


def test_kl_matches_a_literal_loop_of_tensorrts_algorithm():
    rng = np.random.default_rng(2)
    counts = np.floor(1000 * np.exp(-np.arange(600) / 80) * rng.uniform(0.5, 1.5, 600))
    counts[rng.integers(0, 600, 60)] = 0  # empty bins: Q shares each group's count among non-empty ones
    cumulative = np.cumsum(counts)
    for stop, levels in [(300, 128), (451, 128), (600, 256), (256, 256)]:
        p = counts[:stop].copy()
        p[-1] += counts[stop:].sum()
        group = np.digitize(np.arange(stop), np.linspace(0, stop, levels + 1)) - 1
        q = np.zeros(stop)
        for level in range(levels):
            members = [j for j in range(stop) if group[j] == level]
            occupied = [j for j in members if counts[j] > 0]
            for j in occupied:
                q[j] = sum(counts[m] for m in members) / len(occupied)
        if np.any((p > 0) & (q == 0)):
            expected = math.inf
        else:
            p, q = p / p.sum(), q / q.sum()
            expected = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q) if pj > 0)
        assert _kl(counts, cumulative, stop, levels) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", HISTOGRAM_OBSERVERS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_streaming_equals_one_shot(name, symmetric):
    data = LAPLACE[:50_000]
    # Sorted by magnitude, every chunk widens the range: the histogram regrows on the way.
    streamed = _fed(name, data[np.argsort(np.abs(data))], QDtype.UINT8, symmetric, chunks=10)
    one_shot = _fed(name, data, QDtype.UINT8, symmetric)
    np.testing.assert_array_equal(streamed.histogram.counts, one_shot.histogram.counts)
    width = one_shot.histogram.width
    np.testing.assert_allclose(streamed.range(), one_shot.range(), rtol=0, atol=width)


@pytest.mark.parametrize("name", OBSERVERS)
def test_a_range_growing_a_millionfold_keeps_every_value(name):
    observer = make_observer(name, QDtype.INT8, True, bins=256)
    observer.observe(torch.zeros(7))  # before any width exists
    observer.observe(torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 1e-3)
    big = torch.randn(20_000, generator=torch.Generator().manual_seed(2)) * 1e3
    observer.observe(big.to(torch.bfloat16))
    lo, hi = observer.range()
    amax = float(big.to(torch.bfloat16).abs().max())
    assert -amax <= lo < 0 < hi <= amax and hi > 1e3  # the bulk of the big batch
    if name != "minmax":
        assert observer.histogram.counts.shape == (512,)  # memory stays 2 * bins
        assert observer.histogram.counts.sum() == 21_007
