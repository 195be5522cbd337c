"""Activation range observers for the calibration pass, and the per-tensor quant they lead to.

Forward hooks feed each quantized layer's input to its observer, batch after batch (`observe`); `range()`
then gives the clipping range (lo, hi), lo <= 0 <= hi, and `activation_quant` turns it into the plan's
scale and zero point.

- minmax: the observed range. Never clips, so one outlier widens the step for every other value.
- percentile: clips a fraction of the values (ONNX Runtime's percentile calibrator; pytorch-quantization).
- mse: the range minimizing the expected squared error, rounding inside plus clipping outside (PyTorch's
  HistogramObserver `_non_linear_param_search`, TensorRT ModelOpt "mse"), here computed exactly for a
  histogram whose counts are spread uniformly inside each bin, on the grid the artifact will use.
- entropy: the range minimizing KL(P || Q) between the histogram P and its quantized version Q (TensorRT's
  entropy calibration: Migacz, "8-bit Inference with TensorRT", GTC 2017; pytorch-quantization's
  `_compute_amax_entropy`).

The last three share `_Histogram`: fixed memory (2 * bins float64 counts, 32 KiB at 2048 bins), one
`aminmax` and one `bincount` per batch.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
import torch

from edgeq.calibration.weights import fp16_grid_up
from edgeq.plan import PerTensor, QDtype, TensorQuant, symmetric_zero_point

OBSERVERS = ("minmax", "percentile", "mse", "entropy")
SCALE_DTYPES = ("float32", "float16")

# The smallest scale handed out: float32 epsilon, as torch.ao's observers (a range of all zeros, or a
# subnormal one, would otherwise give scale 0 or a denormal that some kernels flush to zero).
_MIN_SCALE = float(np.finfo(np.float32).eps)
_FP16_MIN_NORMAL = np.float32(2.0**-14)  # subnormal scales risk flush-to-zero in fp16 kernels
# Values binned per chunk, so the index temporaries stay small (16 MiB) whatever the batch size.
_BIN_CHUNK = 1 << 22
_MIN_EXPONENT = -100
_COARSE_PER_OCTAVE = 8  # candidate ranges 2**(1/8) (9%) apart, then refined linearly between neighbours
_FINE_POINTS = 33
_KL_MAX_EVALS = 256  # KL candidates evaluated per search before refining around the best (strided)


class Observer(Protocol):
    def observe(self, x: torch.Tensor | np.ndarray) -> None:
        """Take one batch of values (any shape); called many times."""

    def range(self) -> tuple[float, float]:
        """The chosen clipping range (lo, hi), lo <= 0 <= hi so that 0 is exact."""


def make_observer(
    name: str, dtype: QDtype, symmetric: bool, *, percentile: float = 99.99, bins: int = 2048
) -> Observer:
    """An observer by name (one of OBSERVERS) for activations quantized to `dtype`.

    `percentile` (percent of values kept, in (0, 100]) is used by "percentile"; `bins` (histogram bins per
    side of zero) by every histogram observer. minmax needs neither dtype nor symmetric (activation_quant
    applies them); the others choose their range for that grid.
    """
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)}")
    dtype = QDtype(dtype)
    if name == "minmax":
        return MinMaxObserver()
    if bins < 16:
        raise ValueError(f"bins must be at least 16, got {bins}")
    if name == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        return PercentileObserver(dtype, symmetric, bins, percentile)
    return {"mse": MseObserver, "entropy": EntropyObserver}[name](dtype, symmetric, bins)


def activation_quant(
    lo: float, hi: float, dtype: QDtype, symmetric: bool, scale_dtype: str = "float32"
) -> TensorQuant:
    """Per-tensor quant covering [lo, hi] (widened to include 0, so 0 is a code).

    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point round(qmin - lo / scale), clamped.
    Symmetric: scale = max(|lo|, |hi|) / (qmax - zp) with zp = symmetric_zero_point(dtype), that is
    qmax for signed codes and 127 for uint8 (zero point 128). The scale is rounded *up* to float32 and, with
    scale_dtype "float16", up to the float16 grid (Core ML keeps scales in fp16; the plan must hold exactly
    what the artifact stores, and rounding up keeps the range covered); the zero point is computed from the
    rounded scale. A degenerate range (all zeros) gets a tiny positive scale (float32 eps; float16's
    smallest normal with float16 scales). Raises ValueError for a non-finite range or lo > hi.
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"activation range [{lo}, {hi}] is not a finite interval")
    dtype = QDtype(dtype)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(float(_scale(np.float64(lo), np.float64(hi), dtype, symmetric)), _MIN_SCALE)
    scale32 = np.float32(scale)
    if scale32 < scale:
        scale32 = np.nextafter(scale32, np.float32(np.inf))
    if scale_dtype == "float16":
        # At least float16's smallest normal, 2**-14 (fp16_grid_up's floor, np.float16(6.1e-05), is the
        # largest subnormal, one ulp below it).
        scale32 = fp16_grid_up(np.array([max(scale32, _FP16_MIN_NORMAL)], dtype=np.float32))[0]
        if not np.isfinite(scale32):
            raise ValueError(f"activation range [{lo}, {hi}] needs a scale above float16's maximum (65504)")
    zero = _zero_point(np.float64(lo), np.float64(scale32), dtype, symmetric)
    return TensorQuant(dtype, PerTensor(), symmetric, scale32, np.int32(zero))


def _scale(lo: np.ndarray, hi: np.ndarray, dtype: QDtype, symmetric: bool) -> np.ndarray:
    if symmetric:
        return np.maximum(-lo, hi) / (dtype.qmax - symmetric_zero_point(dtype))
    return (hi - lo) / (dtype.qmax - dtype.qmin)


def _zero_point(lo: np.ndarray, scale: np.ndarray, dtype: QDtype, symmetric: bool) -> np.ndarray:
    if symmetric:
        return np.full(np.shape(scale), symmetric_zero_point(dtype), dtype=np.int64)
    return np.clip(np.rint(dtype.qmin - lo / scale), dtype.qmin, dtype.qmax).astype(np.int64)


def _float_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return tensor.float()  # no copy for float32; aminmax and the bin arithmetic want a floating type


def _min_max(tensor: torch.Tensor) -> tuple[float, float]:
    lo, hi = (float(v) for v in torch.aminmax(tensor))  # one pass for both; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"an observed activation holds non-finite values (min {lo}, max {hi})")
    return lo, hi


class MinMaxObserver:
    """The running min and max (with 0). Exact, cheap (one `aminmax` per batch), but never clips."""

    def __init__(self):
        self.lo, self.hi, self.seen = 0.0, 0.0, False

    def observe(self, x: torch.Tensor | np.ndarray) -> None:
        tensor = _float_tensor(x)
        if tensor.numel() == 0:
            return
        lo, hi = _min_max(tensor)
        self.lo, self.hi, self.seen = min(self.lo, lo), max(self.hi, hi), True

    def range(self) -> tuple[float, float]:
        if not self.seen:
            raise ValueError("the observer saw no values (was the layer reached during calibration?)")
        return self.lo, self.hi


class _Histogram:
    """Counts of x in 2 * bins equal bins over [-bins * width, bins * width], width a power of two.

    Why this layout: bins are anchored at 0, so 0 is an edge and each side keeps its full resolution even
    when the other is empty (ReLU outputs); and power-of-two widths make growth exact. When a batch exceeds
    the range, the width doubles k times and each 2**k old bins merge into one new bin: no interpolation
    onto unrelated edges (as torch.ao's HistogramObserver must do), and the counts depend only on the final
    width, not on how the data was batched: streaming gives exactly the one-shot histogram. The cost: the
    largest value may use as few as half of the bins of its side.
    """

    def __init__(self, bins: int):
        self.bins = bins
        self.counts = np.zeros(2 * bins)
        self.exponent: int | None = None  # width = 2 ** exponent; None while every value seen was 0
        self.zeros = 0  # values counted before a width existed (all exactly 0)
        self.lo, self.hi, self.seen = 0.0, 0.0, False

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) if self.exponent is not None else 0.0

    def add(self, x: torch.Tensor | np.ndarray) -> None:
        tensor = _float_tensor(x)
        if tensor.numel() == 0:
            return
        lo, hi = _min_max(tensor)
        self.lo, self.hi, self.seen = min(self.lo, lo), max(self.hi, hi), True
        amax = max(-lo, hi)
        if amax == 0:  # all zeros: no width needed to count them
            if self.exponent is None:
                self.zeros += tensor.numel()
            else:
                self.counts[self.bins] += tensor.numel()
            return
        exponent = math.frexp(amax / self.bins)[1]  # smallest power of two with bins * 2**e > amax
        while self.bins * math.ldexp(1.0, exponent) <= amax:
            exponent += 1
        # Widths below 2**-100 resolve nothing a scale can (scales stop at float32 eps), and 1 / width
        # must stay finite in float32.
        exponent = max(exponent, _MIN_EXPONENT)
        if self.exponent is None:
            self.exponent = exponent
            self.counts[self.bins] += self.zeros  # 0 lies in the first bin right of the zero edge
        elif exponent > self.exponent:
            self._grow(exponent)
        # Bin index floor(x / width) + bins: exact, since the width is a power of two (torch.histc maps
        # through (x - min) / (max - min) in float32 and may misplace values at edges). bincount counts in
        # int64 (histc in float32, inexact past 2**24), and was faster here: 0.4 s against 0.7 s for 12.6M
        # values (64 x 128 x 1536) on 2 busy cores.
        inverse = math.ldexp(1.0, -self.exponent)
        for chunk in tensor.reshape(-1).split(_BIN_CHUNK):
            index = chunk.mul(inverse).floor_().add_(self.bins).to(torch.int32)
            self.counts += torch.bincount(index, minlength=2 * self.bins).cpu().numpy()

    def _grow(self, exponent: int) -> None:
        merge = np.arange(self.bins) >> min(exponent - self.exponent, 62)  # old bin -> new bin, per side
        positive = np.bincount(merge, self.counts[self.bins :], minlength=self.bins)
        negative = np.bincount(merge, self.counts[: self.bins][::-1], minlength=self.bins)  # by |x|
        self.counts = np.concatenate([negative[::-1], positive])
        self.exponent = exponent

    def magnitudes(self) -> np.ndarray:
        """Counts of |x| over bins [i * width, (i + 1) * width), i < bins."""
        return self.counts[self.bins :] + self.counts[: self.bins][::-1]


class _HistogramObserver:
    def __init__(self, dtype: QDtype, symmetric: bool, bins: int):
        self.dtype, self.symmetric = dtype, symmetric
        self.histogram = _Histogram(bins)
        self._range: tuple[float, float] | None = None

    def observe(self, x: torch.Tensor | np.ndarray) -> None:
        self.histogram.add(x)
        self._range = None

    def range(self) -> tuple[float, float]:
        hist = self.histogram
        if not hist.seen:
            raise ValueError("the observer saw no values (was the layer reached during calibration?)")
        if hist.exponent is None:
            return 0.0, 0.0
        if self._range is None:
            lo, hi = self._choose()
            # Never past what was seen (a bin edge may lie beyond it); always with 0.
            self._range = float(min(max(lo, hist.lo), 0.0)), float(max(min(hi, hist.hi), 0.0))
        return self._range

    def _choose(self) -> tuple[float, float]:
        raise NotImplementedError


class PercentileObserver(_HistogramObserver):
    """Keeps `percentile` percent of the values: of |x| when symmetric, else (100 - percentile) / 2 percent
    cut from each tail (ONNX Runtime's convention, so both modes clip the same share of values). Inside a
    bin the value is interpolated linearly (uniform density)."""

    def __init__(self, dtype: QDtype, symmetric: bool, bins: int, percentile: float):
        super().__init__(dtype, symmetric, bins)
        self.percentile = percentile

    def _choose(self) -> tuple[float, float]:
        hist, keep = self.histogram, self.percentile / 100
        if self.symmetric:
            amax = _quantile(hist.magnitudes(), 0.0, hist.width, keep)
            return -amax, amax
        left, tail = -hist.bins * hist.width, (1 - keep) / 2
        return _quantile(hist.counts, left, hist.width, tail), _quantile(hist.counts, left, hist.width, 1 - tail)


def _quantile(counts: np.ndarray, left: float, width: float, fraction: float) -> float:
    """The value below which `fraction` of the counts lie; bins start at `left`, `width` apart."""
    cumulative = np.cumsum(counts)
    target = fraction * cumulative[-1]
    i = min(int(np.searchsorted(cumulative, target)), len(counts) - 1)
    before = cumulative[i - 1] if i else 0.0
    inside = (target - before) / counts[i] if counts[i] > 0 else 0.0
    return left + (i + min(max(inside, 0.0), 1.0)) * width


class MseObserver(_HistogramObserver):
    """The range with the least expected squared error over the histogram (see `_expected_sq_error`).

    Symmetric: a 1-D search over the threshold T. Asymmetric: coordinate descent, the high end for the
    current low end and back, until neither moves by more than a bin (3 rounds at most; the ends interact
    only through the shared step, so it settles fast). Each 1-D search tries thresholds 2**(1/8) apart
    from the observed extreme down to one bin, then 33 points between the best one's neighbours. The
    observed extreme is a candidate, so the choice is never worse than minmax by this measure.
    """

    def _choose(self) -> tuple[float, float]:
        hist = self.histogram
        nonzero = np.flatnonzero(hist.counts)
        counts = hist.counts[nonzero]
        left_edges = (nonzero - hist.bins) * hist.width

        def cost(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
            scale = np.maximum(_scale(lo, hi, self.dtype, self.symmetric), _MIN_SCALE)
            zero = _zero_point(lo, scale, self.dtype, self.symmetric)
            qlo, qhi = self.dtype.qmin - zero, self.dtype.qmax - zero
            return _expected_sq_error(left_edges, hist.width, counts, scale, qlo, qhi)

        if self.symmetric:
            amax = _search(max(-hist.lo, hist.hi), hist.width, lambda t: cost(-t, t))
            return -amax, amax
        lo, hi, first = hist.lo, hist.hi, True
        for _ in range(3):
            # The first round searches everywhere; later ones adjust, within half an octave.
            new_hi, new_lo = hi, lo
            if hist.hi > 0:
                new_hi = _search(
                    hist.hi, hist.width, lambda h: cost(np.full_like(h, lo), h), None if first else hi
                )
            if hist.lo < 0:
                new_lo = -_search(
                    -hist.lo, hist.width, lambda m: cost(-m, np.full_like(m, new_hi)), None if first else -lo
                )
            moved = max(abs(new_lo - lo), abs(new_hi - hi))
            lo, hi, first = new_lo, new_hi, False
            if moved <= hist.width:  # settled: finer moves are below what the histogram resolves
                break
        return lo, hi


def _search(limit: float, floor: float, cost: Callable[[np.ndarray], np.ndarray], near: float | None = None) -> float:
    """The candidate in (0, limit] with the least cost: geometric from `limit` down to `floor` (or within
    half an octave of `near`), then refined between the best one's neighbours."""
    octaves = math.log2(limit / floor) if limit > floor else 0.0
    coarse = limit * 2.0 ** (-np.arange(int(octaves * _COARSE_PER_OCTAVE) + 1) / _COARSE_PER_OCTAVE)
    if near is not None:
        coarse = np.append(coarse[np.abs(np.log2(coarse / near)) <= 0.5], near)
    best = coarse[int(np.argmin(cost(coarse)))]
    step = 2.0 ** (1 / _COARSE_PER_OCTAVE)
    fine = np.append(np.linspace(best / step, min(best * step, limit), _FINE_POINTS), best)
    return float(fine[int(np.argmin(cost(fine)))])


def _expected_sq_error(
    left_edges: np.ndarray, width: float, counts: np.ndarray, scale: np.ndarray, qlo: np.ndarray, qhi: np.ndarray
) -> np.ndarray:
    """Total squared error of quantizing the histogram, for K candidate grids at once.

    Bins: `left_edges` (n,), all `width` wide, holding `counts` (n,), each spread uniformly over its bin.
    Grids: Q(x) = scale * clamp(round(x / scale), qlo, qhi), arrays of shape (K,); returns (K,).
    Exact for that density: per bin, counts / width * (E(b) - E(a)) with E the integral of (x - Q(x))**2,
    in closed form. Unlike the usual "step**2 / 12 inside, distance**2 outside" estimate, it stays right
    when bins are as wide as a step and on the clamp boundary (the half step past each end rounds inward).
    """
    s = scale[:, None]
    low, high = s * qlo[:, None], s * qhi[:, None]

    def integral(x: np.ndarray) -> np.ndarray:
        # Inside [low, high]: with u = x / s + 1/2 = k + f, the error in cell k is s * (f - 1/2), whose
        # integral from the cell's start is s**3 ((f - 1/2)**3 + 1/8) / 3; a full cell adds s**3 / 12.
        # Beyond an end, Q is that end: the integral of (x - high)**2 is (x - high)**3 / 3.
        u = np.clip(x, low, high) / s + 0.5
        k = np.floor(u)
        f = u - k - 0.5
        inside = s**3 * (k / 12 + (f**3 + 0.125) / 3)
        return inside + np.maximum(x - high, 0) ** 3 / 3 - np.maximum(low - x, 0) ** 3 / 3

    # Neighbouring bins share an edge: evaluate each edge once (edges are exact multiples of the width).
    edges = np.union1d(left_edges, left_edges + width)
    at = np.searchsorted(edges, left_edges)
    values = integral(edges)
    return (values[:, at + 1] - values[:, at]) @ counts / width


class EntropyObserver(_HistogramObserver):
    """The range with the least KL(P || Q) (TensorRT's entropy calibration), on the |x| histogram.

    For a candidate threshold T (a bin edge), P is the bins below T with the count beyond added to the
    last one, and Q spreads those bins over as many equal groups as the grid has levels in [0, T] (each
    group's count shared among its non-empty bins). Symmetric: qmax - zp + 1 levels (128 for int8, as
    TensorRT). Asymmetric: the range is [-T, T] clamped to what was seen, so the levels are counted on that
    range's step: 256 for one-signed data such as ReLU outputs (pytorch-quantization's unsigned case), 128
    for data even on both sides, in between for GELU-like data. Not a joint search over both ends: on GELU
    outputs that cut the long positive tail to 0..5.3 (28.6 dB against minmax's 42.3 at uint8), since KL
    weighs probability mass, not distance. A candidate keeps at least as many bins as levels, so a
    histogram narrower than that (16-bit codes at 2048 bins) keeps the observed range: at 16 bits
    clipping rarely pays.
    """

    def _choose(self) -> tuple[float, float]:
        hist, width = self.histogram, self.histogram.width
        counts = _despike(hist.magnitudes())
        stop_max = int(np.flatnonzero(counts)[-1]) + 1
        cumulative = np.cumsum(counts)
        if self.symmetric:
            fewest = self.dtype.qmax - symmetric_zero_point(self.dtype) + 1

            def levels(stop: int) -> int:
                return fewest
        else:
            span = self.dtype.qmax - self.dtype.qmin
            fewest = span // 2 + 1

            def levels(stop: int) -> int:
                threshold = stop * width
                return int(span * threshold / (min(threshold, -hist.lo) + min(threshold, hist.hi))) + 1

        if stop_max <= fewest:
            return hist.lo, hist.hi

        def divergence(stop: int) -> float:
            return _kl(counts, cumulative, stop, levels(stop)) if stop >= levels(stop) else math.inf

        stop = _best(np.arange(stop_max, fewest - 1, -1), divergence)
        return -stop * width, stop * width


def _despike(counts: np.ndarray) -> np.ndarray:
    """The counts with bin 0 set to bin 1's, as pytorch-quantization does: exact zeros (ReLU outputs,
    padding) pile into bin 0, and a spike there makes every wide candidate look far from its quantized
    version, so KL would pick a range a few groups wide."""
    counts = counts.copy()
    counts[0] = counts[1]
    return counts


def _best(candidates: np.ndarray, divergence: Callable[[int], float]) -> int:
    """The candidate with the least divergence, the first (widest) among equals: every candidate if few,
    else every stride-th, then each one near the best."""
    stride = max(1, math.ceil(len(candidates) / _KL_MAX_EVALS))
    coarse = [divergence(int(c)) for c in candidates[::stride]]
    best = int(np.argmin(coarse)) * stride
    if stride > 1:
        near = range(max(0, best - stride + 1), min(len(candidates), best + stride))
        best = min(near, key=lambda i: (divergence(int(candidates[i])), i))
    return int(candidates[best])


def _kl(counts: np.ndarray, cumulative: np.ndarray, stop: int, levels: int) -> float:
    """KL(P || Q) for keeping bins [0, stop) quantized to `levels` equal groups (see EntropyObserver)."""
    kept = counts[:stop]
    group = np.arange(stop) * levels // stop  # bin -> level, as np.digitize on linspace(0, stop, levels + 1)
    occupied = kept > 0
    group_sum = np.bincount(group, kept, minlength=levels)
    group_occupied = np.bincount(group, occupied, minlength=levels)
    q = np.where(occupied, group_sum[group] / np.maximum(group_occupied[group], 1), 0.0)
    p = kept.copy()
    p[-1] += cumulative[-1] - cumulative[stop - 1]
    # Q is built from the kept bins only (as TensorRT): clipped values piled into an empty last bin have
    # q = 0 there, an infinite divergence, and that candidate loses.
    support = p > 0
    if np.any(q[support] == 0):
        return math.inf
    p, q = p[support] / p.sum(), q[support] / q.sum()
    return float(np.sum(p * np.log(p / q)))
