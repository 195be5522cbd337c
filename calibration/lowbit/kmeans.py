"""k-means palettes (non-uniform quantization): each weight becomes an index into a look-up table (LUT) of
2^bits float values, one LUT per tensor or per group of output channels; the LUT entries are the weighted
k-means centroids of the weights that use it.

The target format is Core ML's `constexpr_lut_to_dense` (iOS18 opset), scalar palettization (VECTOR_SIZE 1):
  weight [N, K] = lut[n // group_channels, 0, indices[n, k], 0]
  - indices: uint{bits} [N, K], bits in {1, 2, 3, 4, 6, 8} (held here as uint8, values < 2^bits; the
    converter packs them to `bits` bits);
  - lut: [N / group_channels, 1, 2^bits, 1] (`Palette.coreml_lut()`): the op's LUT has rank K+2 for rank-K
    indices and its first K dims must divide the indices' dims, so LUTs can be shared by blocks of output
    channels only (per tensor: [1, 1, 2^bits, 1]); coremltools' `per_grouped_channel` palettization with
    channel_axis 0 and `group_size = group_channels` is the same layout;
  - the LUT dtype of an FP16 ML program is fp16: palettize with `lut_dtype=torch.float16` so the centroids are
    fp16 values before the indices are assigned, and the artifact holds exactly the plan's numbers.

The algorithm is Lloyd's k-means in one dimension, exact and fast because the values are sorted once: every
cluster of a 1-D k-means is a contiguous run of the sorted values (bounded by the midpoints of neighbouring
centroids), so an assignment is a `searchsorted` of k-1 midpoints and an update is k differences of prefix
sums. It is weighted (minimizes sum_i u_i (w_i - lut[idx_i])^2, with u = diag(H), the inputs' second moments
per input channel, or any importance [K] or [N, K]) and starts from seeded k-means++ (Arthur & Vassilvitskii
2007), with its random draws made on the CPU so CUDA and CPU runs start from the same centroids.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # constexpr_lut_to_dense's index types uint1..uint8 (no uint5/uint7)
DEFAULT_GROUP_CHANNELS = 16  # coremltools: "a group size of 8 or 16 gives good accuracy while still increasing speed"
DEFAULT_ITERS = 100  # Lloyd usually settles in 10-40 iterations on layer-sized tensors; it stops when it does


class PaletteGranularity(StrEnum):
    TENSOR = "tensor"  # one LUT for the whole weight
    GROUPED_CHANNELS = "grouped_channels"  # one LUT per block of `group_channels` consecutive output channels


@dataclass(frozen=True)
class Palette:
    """A palettized weight [N, K]: row n uses LUT `n // group_channels`.

    lut: float32 [groups, 2^bits] (values fp16-representable when palettized with lut_dtype=float16); sorted
        ascending per group; duplicates possible when a group has fewer distinct values than entries.
    indices: uint8 [N, K], each < 2^bits.
    group_channels: output channels per LUT (N for a per-tensor palette).
    """

    lut: torch.Tensor
    indices: torch.Tensor
    bits: int
    group_channels: int

    def __post_init__(self):
        rows, _ = self.indices.shape
        entries = 2**self.bits
        if self.bits not in PALETTE_BITS:
            raise ValueError(f"bits {self.bits}: a palette has {PALETTE_BITS} bits")
        if rows % self.group_channels or tuple(self.lut.shape) != (rows // self.group_channels, entries):
            raise ValueError(
                f"lut {tuple(self.lut.shape)} does not fit indices {tuple(self.indices.shape)} in groups of "
                f"{self.group_channels} output channels with {entries} entries"
            )
        if self.indices.dtype != torch.uint8:
            raise ValueError(f"indices are {self.indices.dtype}; expected torch.uint8")

    @property
    def granularity(self) -> PaletteGranularity:
        rows = self.indices.shape[0]
        return PaletteGranularity.TENSOR if self.group_channels == rows else PaletteGranularity.GROUPED_CHANNELS

    def channel_group(self) -> torch.Tensor:
        """The LUT of each output channel, int64 [N]."""
        return torch.arange(self.indices.shape[0], device=self.indices.device) // self.group_channels

    def dequantize(self) -> torch.Tensor:
        """The real weight, float32 [N, K]."""
        luts = self.lut[self.channel_group()]  # [N, 2^bits]
        return torch.gather(luts, 1, self.indices.long())

    def coreml_lut(self) -> torch.Tensor:
        """The LUT in `constexpr_lut_to_dense`'s shape for these rank-2 indices: [groups, 1, 2^bits, 1]."""
        return self.lut.reshape(self.lut.shape[0], 1, self.lut.shape[1], 1)

    def to(self, device: torch.device | str) -> Palette:
        return Palette(self.lut.to(device), self.indices.to(device), self.bits, self.group_channels)


def palettize(
    w: torch.Tensor,
    bits: int,
    *,
    per: PaletteGranularity | str = PaletteGranularity.TENSOR,
    group_channels: int | None = None,
    weights: torch.Tensor | None = None,
    seed: int = 0,
    iters: int = DEFAULT_ITERS,
    lut_dtype: torch.dtype = torch.float32,
) -> Palette:
    """Weighted k-means palette of `w` [N, K] (a conv's weight flattened to [N, C*kh*kw]) with 2^bits entries.

    per: "tensor" (one LUT) or "grouped_channels" (one LUT per `group_channels` consecutive output channels,
        default 16; it must divide N).
    weights: importance per input channel [K] (e.g. diag(H) = mean x_k^2, or activation energy) or per weight
        [N, K]; non-negative; None weighs every weight alike. A group whose weights are all zero is clustered
        unweighted (any LUT has zero weighted error there).
    seed: seeds k-means++; the same seed gives the same palette. iters: Lloyd iterations at most.
    lut_dtype: the dtype the runtime stores the LUT in (float16 for an FP16 Core ML program): centroids are
        rounded to it before the indices are chosen, so the palette is exact in that dtype.
    """
    per = _granularity(per)
    if bits not in PALETTE_BITS:
        raise ValueError(f"bits {bits}: a palette has {PALETTE_BITS} bits (Core ML constexpr_lut_to_dense indices)")
    if w.dim() != 2:
        raise ValueError(f"weight has shape {tuple(w.shape)}; expected [N out, K in] (flatten a conv's weight first)")
    if iters < 1:
        raise ValueError(f"iters {iters}: need at least one Lloyd iteration")
    rows, columns = w.shape
    group_channels = _group_channels(per, group_channels, rows)
    groups = rows // group_channels
    values = w.detach().float().reshape(groups, group_channels * columns)
    importance = _importance(weights, w).reshape(groups, -1)
    lut = _kmeans_1d(values, importance, 2**bits, seed=seed, iters=iters)
    lut = lut.to(lut_dtype).float().sort(dim=1).values
    indices = _nearest(lut, values).to(torch.uint8).reshape(rows, columns)
    return Palette(lut, indices, bits, group_channels)


class KMeansPalette:
    """k-means palettes in the layer-by-layer driver's solver shape (calibration/lowbit/driver.py): `add_batch`
    accumulates the inputs' second moments diag(H) = mean x_k^2 when `weighted` (the weights of the k-means:
    an error on an input channel that is large costs more at the layer's output), `solve()` -> Palette (which,
    like LowBitWeight, has `dequantize()`). Unweighted, it needs no inputs and the driver runs no pass for it."""

    def __init__(self, weight: torch.Tensor, bits: int, *, weighted: bool = True, name: str = "layer", **options):
        self.W = weight.detach().reshape(weight.shape[0], -1).float()
        self.bits, self.weighted, self.name, self.options = bits, weighted, name, options
        self.energy = torch.zeros(self.W.shape[1], dtype=torch.float64, device=self.W.device)
        self.nsamples = 0

    @property
    def needs_inputs(self) -> bool:
        return self.weighted

    def add_batch(self, inputs: torch.Tensor) -> None:
        if not self.weighted:
            return
        x = inputs.detach().reshape(-1, self.W.shape[1]).to(self.energy.device, torch.float64)
        self.energy += x.pow(2).sum(dim=0)
        self.nsamples += x.shape[0]

    def solve(self) -> Palette:
        if self.weighted and self.nsamples == 0:
            raise ValueError(f"k-means palette of {self.name}: no calibration inputs reached this layer (add_batch was never called)")
        weights = (self.energy / self.nsamples).float() if self.weighted else None
        return palettize(self.W, self.bits, weights=weights, **self.options)


def kmeans_solver(bits: int, *, weighted: bool = True, **options):
    """A solver factory for the layer-by-layer driver: one KMeansPalette per layer; `options` are palettize's
    (per, group_channels, seed, iters, lut_dtype)."""
    return lambda fqn, module: KMeansPalette(module.weight, bits, weighted=weighted, name=fqn, **options)


def _granularity(per: PaletteGranularity | str) -> PaletteGranularity:
    try:
        return PaletteGranularity(per)
    except ValueError:
        raise ValueError(f"per={per!r}: expected one of {[g.value for g in PaletteGranularity]}") from None


def _group_channels(per: PaletteGranularity, group_channels: int | None, rows: int) -> int:
    if per is PaletteGranularity.TENSOR:
        if group_channels not in (None, rows):
            raise ValueError(f"group_channels={group_channels} with per='tensor': leave it out, or use per='grouped_channels'")
        return rows
    group_channels = DEFAULT_GROUP_CHANNELS if group_channels is None else group_channels
    if group_channels < 1 or rows % group_channels:
        raise ValueError(
            f"group_channels={group_channels} does not divide the {rows} output channels "
            "(Core ML shares a LUT by equal blocks of output channels); use a divisor of them"
        )
    return group_channels


def _importance(weights: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """Per-weight importance [N, K] (float32, on w's device)."""
    if weights is None:
        return torch.ones(w.shape, device=w.device)
    weights = weights.detach().to(device=w.device, dtype=torch.float32)
    if tuple(weights.shape) not in ((w.shape[1],), tuple(w.shape)):
        raise ValueError(f"weights have shape {tuple(weights.shape)}; expected [K]={w.shape[1]} per input channel or {tuple(w.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative (e.g. diag(H) = mean x_k^2)")
    return weights.expand(w.shape).contiguous()


def _kmeans_1d(values: torch.Tensor, importance: torch.Tensor, k: int, *, seed: int, iters: int) -> torch.Tensor:
    """Weighted 1-D k-means of each row of `values` [G, M]: centroids [G, k], sorted ascending."""
    unweighted = importance.sum(dim=1, keepdim=True) <= 0
    importance = torch.where(unweighted, torch.ones_like(importance), importance)
    sorted_values, order = values.sort(dim=1, stable=True)
    sorted_importance = torch.gather(importance, 1, order)
    # Prefix sums in float64: a cluster's weight and weighted sum are differences of two of them.
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    mass = torch.cat([zero, sorted_importance.double().cumsum(dim=1)], dim=1)
    moment = torch.cat([zero, (sorted_importance.double() * sorted_values.double()).cumsum(dim=1)], dim=1)
    centroids = _kmeans_plus_plus(sorted_values, sorted_importance, k, seed)
    bounds = None
    for _ in range(iters):
        centroids = centroids.sort(dim=1).values
        midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
        new_bounds = torch.searchsorted(sorted_values, midpoints.contiguous(), right=True)  # ties go to the lower cluster, as in _nearest
        if bounds is not None and torch.equal(new_bounds, bounds):
            break  # assignments stopped changing: Lloyd has converged
        bounds = new_bounds
        edges = torch.cat([torch.zeros_like(bounds[:, :1]), bounds, torch.full_like(bounds[:, :1], values.shape[1])], dim=1)
        cluster_mass = mass.gather(1, edges[:, 1:]) - mass.gather(1, edges[:, :-1])
        cluster_moment = moment.gather(1, edges[:, 1:]) - moment.gather(1, edges[:, :-1])
        means = (cluster_moment / cluster_mass.clamp(min=torch.finfo(torch.float64).tiny)).float()
        centroids = torch.where(cluster_mass > 0, means, centroids)  # an empty cluster keeps its centroid
    return centroids.sort(dim=1).values


def _kmeans_plus_plus(sorted_values: torch.Tensor, importance: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Seeded weighted k-means++ centroids [G, k]: each next one drawn with probability u_i * D_i^2.

    k draws over every value cost k full passes over the layer (14 s for 8 bits on a 1536x384 layer), so the
    draws are made among at most INIT_POINTS representatives in all (but at least 8 per centroid per group):
    the weighted means of equal runs of the sorted values, each with its run's weight. Lloyd then refines on
    every value."""
    groups, count = sorted_values.shape
    limit = min(count, max(INIT_POINTS // groups, 8 * k))
    points, importance = _representatives(sorted_values, importance.double(), limit)
    count = points.shape[1]
    draws = torch.rand(k, groups, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    draws = draws.to(points.device)
    centroids = torch.empty(groups, k, dtype=torch.float64, device=points.device)
    distance = torch.full_like(points, float("inf"))
    for j in range(k):
        odds = importance if j == 0 else importance * distance
        if j:  # every point already sits on a centroid (fewer distinct values than entries): duplicate one
            odds = torch.where(odds.sum(dim=1, keepdim=True) <= 0, importance, odds)
        cumulative = odds.cumsum(dim=1)
        pick = torch.searchsorted(cumulative, draws[j] * cumulative[:, -1:], right=True).clamp(max=count - 1)
        centroids[:, j] = points.gather(1, pick).squeeze(1)
        distance = torch.minimum(distance, (points - centroids[:, j : j + 1]).pow(2))
    return centroids.float()


INIT_POINTS = 32768  # representatives k-means++ draws among, over all groups; 8-bit, 1536x384: 14 s -> 0.2 s


def _representatives(
    sorted_values: torch.Tensor, importance: torch.Tensor, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, weights), float64 [G, <= limit]: the values themselves when few enough, else the weighted means
    and total weights of consecutive equal-length runs of the sorted values (the last runs padded with
    zero-weight copies of the largest value)."""
    groups, count = sorted_values.shape
    values = sorted_values.double()
    if count <= limit:
        return values, importance
    run = -(-count // limit)
    slots = -(-count // run)
    pad = run * slots - count
    values = torch.cat([values, values[:, -1:].expand(groups, pad)], dim=1).reshape(groups, slots, run)
    weights = torch.cat([importance, importance.new_zeros(groups, pad)], dim=1).reshape(groups, slots, run)
    mass = weights.sum(dim=2)
    means = (values * weights).sum(dim=2) / mass.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(mass > 0, means, values[:, :, 0]), mass


def _nearest(lut: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest LUT entry [G, M] for each value [G, M] (lut [G, k] sorted ascending)."""
    midpoints = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, values.contiguous())
