"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978; the reference code is mit-han-lab/llm-awq, whose
auto_scale.py and auto_clip.py this follows).

A few input channels carry much larger activations than the rest; their weights matter more. AWQ multiplies
the weight's input channels by per-channel scales s before rounding and divides the input by s:
    y = x W^T = (x / s) (W s)^T  ~  (x / s) Q(W s)^T
so the salient channels are rounded on a finer relative grid. s = mean|x|^alpha (the paper's s_X^alpha, Eq. 5),
with alpha in [0, 1] searched on calibration data to minimize the output error
    L(s) = || x W^T - (x / s) Q(W s)^T ||^2,
and s normalized by sqrt(max(s) min(s)) as in the reference code. alpha = 0 gives s = 1: plain round-to-nearest
is always a candidate, so AWQ's output error on the calibration inputs is never worse than RTN's. With
`power_of_two`, every candidate s is rounded to the nearest power of two (in log2) before it is tried: dividing
and multiplying by a power of two is exact in binary floating point and commutes with every rounding, so a
model with such scales folded computes the same float numbers as the original (conversion folds them). Then the
clipping search (the reference's auto_clip): per output channel and group, the range is shrunk by 1, 0.95,
... , 0.55 and the factor with the least error of that group's share of the output is kept.

The 1/s must live in the previous op (fold.py: a LayerNorm, or a linear when what lies between is linear in
it) or in a runtime Mul; all layers that read the same input (q/k/v after one LayerNorm) share one s. With
`search_scales=False` only the clipping search runs (s = 1): the AWQ that needs no fold, for layers whose
input producer cannot absorb a scale.

Output errors are evaluated exactly on every calibration row through the inputs' second moments
H = mean x x^T (K x K, the same statistic GPTQ keeps): || X E^T ||^2 / n = tr(E H E^T) for E = W - Q(W s) / s.
That is the error over all rows with memory independent of their number (the reference keeps a 512-token
subsample instead), and cheaper than the matmul over rows whenever there are more rows than K.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import LowBitWeight, rtn

N_GRID = 20  # the reference's n_grid: alpha in {0, 0.05, ..., 1} (it stops at 0.95; 1 costs one more try)
MAX_SHRINK = 0.5  # the reference's auto_clip max_shrink: clip factors 1, 0.95, ..., 0.55
MIN_SCALE = 1e-4  # the reference's clamp on mean|x|^alpha: a channel that never fires keeps a finite scale
POWER_OF_TWO_OFFSETS = (0.0, 0.25, 0.5, 0.75)  # fractions of an octave tried with power_of_two (see _search_scales)


@dataclass(frozen=True)
class AWQResult:
    """What AWQ decided for one group of layers sharing an input.

    scales: float32 [K], s > 0. The layers hold W s; their input must be divided by s (fold it into the
        previous op, see fold.py).
    weights: one LowBitWeight per layer, of W s (codes, scales, zero points on the grid).
    alpha: the exponent chosen (0: s = 1, plain rounding); clip: per layer, the clip factors [N, groups].
    error, rtn_error: squared output error per calibration row, summed over the layers' outputs
        (tr(E H E^T) for each layer's E), of AWQ and of min-max round-to-nearest on the same grid.
    """

    scales: torch.Tensor
    weights: tuple[LowBitWeight, ...]
    alpha: float
    clip: tuple[torch.Tensor, ...]
    error: float
    rtn_error: float

    def effective_weight(self, index: int = 0) -> torch.Tensor:
        """Layer `index`'s weight as it acts on the UNSCALED input, Q(W s) / s, float32 [N, K]: what a model
        without the fold must hold to compute the same outputs (the runtime Mul by 1/s moved into W)."""
        return self.weights[index].dequantize() / self.scales.to(self.weights[index].scale.device)


class AWQ:
    """AWQ state for one layer, or a group of layers that read the same input (their weights [N_i, K] share
    one per-input-channel scale). Feed inputs with `add_batch`, then `solve`."""

    def __init__(
        self,
        weights: torch.Tensor | Sequence[torch.Tensor],
        grid: Grid,
        *,
        name: str = "layer",
        search_scales: bool = True,
        n_grid: int = N_GRID,
        max_shrink: float = MAX_SHRINK,
        power_of_two: bool = False,
    ):
        weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
        if not weights:
            raise ValueError(f"AWQ on {name}: no weights given")
        self.W = [w.detach().reshape(w.shape[0], -1).float() for w in weights]
        self.columns = self.W[0].shape[1]
        widths = sorted({w.shape[1] for w in self.W})
        if len(widths) > 1:
            raise ValueError(f"AWQ on {name}: layers sharing an input must have the same input width, got {widths}")
        if n_grid < 1 or not 0 <= max_shrink < 1:
            raise ValueError(f"AWQ on {name}: n_grid {n_grid} must be >= 1 and max_shrink {max_shrink} in [0, 1)")
        grid.groups(self.columns)  # refuses a K that is not a multiple of the group size, before any pass
        self.name, self.grid, self.search_scales = name, grid, search_scales
        self.n_grid, self.max_shrink, self.power_of_two = n_grid, max_shrink, power_of_two
        device = self.W[0].device
        dtype = torch.float64 if device.type == "cpu" else torch.float32  # as GPTQ: cheap and near-exact on CPU
        self.H = torch.zeros(self.columns, self.columns, device=device, dtype=dtype)
        self.x_abs = torch.zeros(self.columns, device=device, dtype=dtype)  # running mean |x| per channel
        self.nsamples = 0
        self.result: AWQResult | None = None

    needs_inputs = True

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate mean |x| and H = mean x x^T over the rows of `inputs` [..., K]."""
        x = inputs.detach().reshape(-1, self.columns).to(self.H.device, self.H.dtype)
        count = x.shape[0]
        if count == 0:
            return
        total = self.nsamples + count
        self.x_abs.mul_(self.nsamples / total).add_(x.abs().sum(dim=0) / total)
        self.H.mul_(self.nsamples / total).add_((x.T @ x) / total)
        self.nsamples = total

    def solve(self) -> AWQResult:
        """Search alpha (Eq. 5), then clip factors; see the module docstring."""
        if self.nsamples == 0:
            raise ValueError(f"AWQ on {self.name}: no calibration inputs reached this layer (add_batch was never called)")
        H = self.H
        rtn_error = self._error(torch.ones(self.columns, device=H.device), [None] * len(self.W))
        scales, alpha, error = torch.ones(self.columns, device=H.device), 0.0, rtn_error
        if self.search_scales:
            scales, alpha, error = self._search_scales(rtn_error)
        clip = self._search_clip(scales)
        clipped_error = self._error(scales, clip)
        if clipped_error > error:  # per-group choices ignore cross-group terms: keep the plain ranges if they win
            clip, clipped_error = [None] * len(self.W), error
        clip = [torch.ones(self.grid_shape(w), device=w.device) if c is None else c for w, c in zip(self.W, clip)]
        weights = tuple(rtn(w * scales.to(w.device), self.grid, c) for w, c in zip(self.W, clip))
        self.result = AWQResult(scales.float(), weights, alpha, tuple(clip), clipped_error, rtn_error)
        return self.result

    def summary(self) -> dict[str, float]:
        """After solve: the numbers for reports (the driver keeps them): rows seen, alpha, and the output
        errors of AWQ and RTN with the output's own energy tr(W H W^T) (for relative errors), per row."""
        energy = sum(float(((w.to(self.H.dtype) @ self.H) * w.to(self.H.dtype)).sum()) for w in self.W)
        return {"rows": float(self.nsamples), "alpha": self.result.alpha, "awq": self.result.error,
                "rtn": self.result.rtn_error, "weight": energy}

    def grid_shape(self, w: torch.Tensor) -> tuple[int, int]:
        return (w.shape[0], self.grid.groups(w.shape[1]))

    def _candidate_scales(self, alpha: float, offset: float = 0.0) -> torch.Tensor:
        s = self.x_abs.float().pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        return torch.exp2(torch.round(torch.log2(s) + offset)) if self.power_of_two else s

    def _search_scales(self, rtn_error: float) -> tuple[torch.Tensor, float, float]:
        best = (torch.ones(self.columns, device=self.H.device), 0.0, rtn_error)  # alpha = 0 is s = 1: RTN
        # Powers of two: where log2 s is cut into octaves decides which channels share a scale; a global factor
        # is free (each group's range absorbs it), so shifting the cut by a fraction of an octave is a new candidate.
        offsets = POWER_OF_TWO_OFFSETS if self.power_of_two else (0.0,)
        for step in range(1, self.n_grid + 1):
            alpha = step / self.n_grid
            for offset in offsets:
                s = self._candidate_scales(alpha, offset)
                error = self._error(s, [None] * len(self.W))
                if error < best[2]:
                    best = (s, alpha, error)
        return best

    def _error(self, s: torch.Tensor, clip: Sequence[torch.Tensor | None]) -> float:
        """Sum over the layers of tr(E H E^T), E = W - Q(W s) / s (min-max ranges where clip is None)."""
        total = 0.0
        for w, c in zip(self.W, clip):
            s_w = s.to(w.device)
            q = rtn(w * s_w, self.grid, 1.0 if c is None else c).dequantize() / s_w
            E = (w - q).to(self.H.dtype)
            total += float(((E @ self.H) * E).sum())
        return total

    def _search_clip(self, s: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the clip factors [N, groups] minimizing each group's share of the output error
        (the reference's auto_clip: the error of the group's partial dot products)."""
        columns = self.columns
        size = self.grid.group_size or columns
        groups = columns // size
        s_h = s.to(self.H.device, self.H.dtype)
        scaled_H = self.H / (s_h[:, None] * s_h[None, :])  # the second moments of x / s
        blocks = torch.stack([scaled_H[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(groups)])
        factors = [1 - i / self.n_grid for i in range(max(1, int(self.max_shrink * self.n_grid)))]
        chosen = []
        for w in self.W:
            ws = w * s.to(w.device)
            best_error = torch.full(self.grid_shape(w), float("inf"), device=w.device, dtype=self.H.dtype)
            best_clip = torch.ones(self.grid_shape(w), device=w.device)
            for factor in factors:
                scale, zero = self.grid.fit(ws, factor)
                E = (ws - self.grid.round_trip(ws, scale, zero)).to(self.H.dtype).reshape(w.shape[0], groups, size)
                error = torch.einsum("ngi,gij,ngj->ng", E, blocks.to(E.device), E)
                better = error < best_error  # strict: ties keep the larger factor (less clipping)
                best_error = torch.where(better, error, best_error)
                best_clip = torch.where(better, torch.full_like(best_clip, factor), best_clip)
            chosen.append(best_clip)
        return chosen


def awq_clip_solver(grid: Grid, **options) -> Callable[[str, nn.Module], object]:
    """A solver factory for the layer-by-layer driver (calibration/lowbit/driver.py): AWQ's clipping search
    alone (s = 1), one layer at a time, `solve()` -> LowBitWeight. The scale search needs the layers sharing an
    input together and a fold the driver does not make: run `search_scales` and fold.py first."""

    class _AWQClipLayer(AWQ):
        def solve(self) -> LowBitWeight:  # the driver's no-argument solve, one layer
            return super().solve().weights[0]

    def make(fqn: str, module: nn.Module) -> AWQ:
        weight = module.weight.detach().reshape(module.weight.shape[0], -1)
        return _AWQClipLayer(weight, grid, name=fqn, search_scales=False, **options)

    return make


def search_scales(
    groups: Mapping[str, Sequence[nn.Linear]],
    run: Callable[[], None],
    grid: Grid,
    *,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **options,
) -> dict[str, AWQResult]:
    """AWQ for several groups in one calibration pass: `groups` maps a name (e.g. the producer's FQN) to the
    linears that read that producer's output; `run()` runs the model over the calibration samples once (in
    float, as the reference searches). Each group is fed by a forward pre-hook on its first linear; `rows`
    maps a linear's input [..., K] to the rows to keep (e.g. drop padding tokens), default all.
    Nothing is modified: apply the results with fold.py."""
    solvers = {
        name: AWQ([layer.weight for layer in layers], grid, name=name, **options) for name, layers in groups.items()
    }

    def hook(name):
        def feed(_layer, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            solvers[name].add_batch(rows(x) if rows is not None else x)
        return feed

    handles = [layers[0].register_forward_pre_hook(hook(name), with_kwargs=True) for name, layers in groups.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: solver.solve() for name, solver in solvers.items()}
