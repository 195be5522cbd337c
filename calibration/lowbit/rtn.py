"""Round-to-nearest (RTN) onto the low-bit grid, with min-max or MSE-searched clipping, and `LowBitWeight`, the
result every low-bit algorithm returns (codes, scales, zero points) and every converter will pack.

Clipping: the min-max range wastes grid steps on a group's few largest weights. `mse_clip` tries shrink factors
(1.0 down to 0.5 by default) per (row, group) and keeps the one whose rounded group has the least squared error,
optionally weighted per input channel by the input's second moments diag(H) = E[x_k^2] (the "activation-weighted"
variant: an error on a channel whose input is large costs more at the layer's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeq.calibration.lowbit.grid import Grid

CLIP_MODES = ("minmax", "mse")
# Measured on MiniLM's encoder.layer.0.attention.self.query, group 32: 100 steps instead of 20 lowered the
# squared error by at most 0.7% (4, 3 and 2 bits); searching down to 0.2 instead of 0.5 changed nothing at 3-4
# bits and helped only 2-bit symmetric (10%: its grid has 3 usable levels), which can pass min_shrink itself.
DEFAULT_SHRINK_STEPS = 20  # 1.0, 0.974, ..., 0.5
DEFAULT_MIN_SHRINK = 0.5


def codes_dtype(grid: Grid) -> torch.dtype:
    """int8 holds every grid but asymmetric 8-bit (codes 0..255), which is stored as uint8."""
    return torch.int8 if grid.qmax <= 127 else torch.uint8


@dataclass(frozen=True)
class LowBitWeight:
    """A weight [N out, K in] on a low-bit grid: real = scale * (code - zero), per (row, group of K columns).

    codes: integer tensor [N, K] (int8; uint8 for asymmetric 8-bit), in the STORED column order.
    scale, zero: float32 [N, groups]; groups run along the stored columns, `grid.group_size` columns each.
    perm: None when the stored order is the original column order (the case every runtime can hold). Otherwise
        stored column i is original column perm[i]: GPTQ's act-order without static groups stores codes in
        its solving order so that each group is contiguous there, which makes the groups non-contiguous in
        the original order (GPTQ's `g_idx`). ONNX MatMulNBits, blockwise DequantizeLinear, TFLite blockwise
        and Core ML blockwise all need contiguous groups in the original order: converters must refuse a
        weight with a perm (use GPTQ with `static_groups=True` together with act-order).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grid: Grid
    perm: torch.Tensor | None = None

    def __post_init__(self):
        rows, columns = self.codes.shape
        groups = self.grid.groups(columns)
        for name in ("scale", "zero"):
            shape = tuple(getattr(self, name).shape)
            if shape != (rows, groups):
                raise ValueError(f"{name} has shape {shape}; codes {tuple(self.codes.shape)} on {self.grid} need {(rows, groups)}")
        if self.perm is not None and tuple(self.perm.shape) != (columns,):
            raise ValueError(f"perm has shape {tuple(self.perm.shape)}; expected ({columns},)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def contiguous_groups(self) -> bool:
        """Whether each group is a contiguous run of original columns (what runtimes' blockwise formats hold)."""
        return self.perm is None

    def group_index(self) -> torch.Tensor:
        """The group of each ORIGINAL column, [K] int64 (GPTQ's `g_idx`)."""
        columns = self.codes.shape[1]
        stored = torch.arange(columns, device=self.codes.device) // (self.grid.group_size or columns)
        if self.perm is None:
            return stored
        g_idx = torch.empty_like(stored)
        g_idx[self.perm] = stored
        return g_idx

    def dequantize(self) -> torch.Tensor:
        """The real weight, float32 [N, K], in the ORIGINAL column order."""
        w = self.grid.dequantize(self.codes.float(), self.scale, self.zero)
        if self.perm is None:
            return w
        original = torch.empty_like(w)
        original[:, self.perm] = w
        return original

    def to(self, device: torch.device | str) -> LowBitWeight:
        perm = None if self.perm is None else self.perm.to(device)
        return LowBitWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.grid, perm)


def _group_error(w: torch.Tensor, approx: torch.Tensor, groups: int, importance: torch.Tensor | None) -> torch.Tensor:
    """Squared error per (row, group), [N, groups], each column weighted by `importance` [K] if given."""
    error = (w - approx).pow(2)
    if importance is not None:
        error = error * importance
    return error.reshape(w.shape[0], groups, -1).sum(dim=2)


def mse_clip(
    w: torch.Tensor,
    grid: Grid,
    *,
    importance: torch.Tensor | None = None,
    steps: int = DEFAULT_SHRINK_STEPS,
    min_shrink: float = DEFAULT_MIN_SHRINK,
) -> torch.Tensor:
    """Per-(row, group) clip factors [N, groups] in [min_shrink, 1] minimizing the squared rounding error of
    `w` [N, K] on `grid`. `importance` [K] (e.g. diag(H), the inputs' second moments) weights each column's
    error; None weights them equally. Ties keep the larger factor (the least clipping)."""
    if not 0 < min_shrink <= 1 or steps < 1:
        raise ValueError(f"clip search from 1.0 to {min_shrink} in {steps} steps: need 0 < min_shrink <= 1 and steps >= 1")
    w = w.float()
    if importance is not None:
        importance = importance.to(device=w.device, dtype=torch.float32)
    groups = grid.groups(w.shape[1])
    best_error = torch.full((w.shape[0], groups), float("inf"), device=w.device)
    best_clip = torch.ones_like(best_error)
    for shrink in torch.linspace(1.0, min_shrink, steps).tolist():
        scale, zero = grid.fit(w, shrink)
        error = _group_error(w, grid.round_trip(w, scale, zero), groups, importance)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, torch.full_like(best_clip, shrink), best_clip)
    return best_clip


def fit_scales(
    w: torch.Tensor, grid: Grid, clip: str | float | torch.Tensor = "minmax", importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [N, groups], for `w` [N, K]: min-max ("minmax"), MSE-searched ("mse", weighted by
    `importance` [K] if given), or given clip factors (a float or [N, groups])."""
    if isinstance(clip, str):
        if clip not in CLIP_MODES:
            raise ValueError(f"clip {clip!r}: expected one of {CLIP_MODES} or clip factors")
        clip = 1.0 if clip == "minmax" else mse_clip(w, grid, importance=importance)
    return grid.fit(w.float(), clip)


def rtn(
    w: torch.Tensor, grid: Grid, clip: str | float | torch.Tensor = "minmax", *, importance: torch.Tensor | None = None
) -> LowBitWeight:
    """Round `w` [N, K] to the nearest point of `grid` (half to even), after min-max or MSE-searched clipping
    (see `fit_scales`). The baseline every other algorithm must beat."""
    w = w.detach().float()
    scale, zero = fit_scales(w, grid, clip, importance)
    codes = grid.quantize(w, scale, zero).to(codes_dtype(grid))
    return LowBitWeight(codes, scale, zero, grid)


class RTN:
    """RTN in the driver's solver shape (`add_batch`, `solve`). It needs no inputs, except for the
    activation-weighted clip search, which uses diag(H) = mean x_k^2 over the batches."""

    def __init__(self, weight: torch.Tensor, grid: Grid, clip: str = "minmax", weighted: bool = False):
        self.W = weight.detach().reshape(weight.shape[0], -1).float()
        self.grid = grid
        self.clip = clip
        self.weighted = weighted
        self.energy = torch.zeros(self.W.shape[1], device=self.W.device)
        self.nsamples = 0

    @property
    def needs_inputs(self) -> bool:
        """Plain RTN needs no calibration pass (the driver skips it)."""
        return self.weighted

    def add_batch(self, inputs: torch.Tensor) -> None:
        if not self.weighted:
            return
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.energy.device, torch.float32)
        self.energy += x.pow(2).sum(dim=0)
        self.nsamples += x.shape[0]

    def solve(self) -> LowBitWeight:
        importance = self.energy / max(self.nsamples, 1) if self.weighted else None
        return rtn(self.W, self.grid, self.clip, importance=importance)
