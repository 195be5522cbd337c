"""GPTQ for one layer: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323. Shaped like the authors' `gptq.py`
(IST-DASLab/gptq): feed the layer's inputs (`add_batch`), then `solve`.

The layer minimizes ||W X - Q X||^2 over codes Q on the grid, column by column (Algorithm 1): quantize column j,
and spread its error over the not yet quantized columns through the inverse Hessian,
    Err_j = (W_j - Q_j) / Hinv_jj,        W_{j+1:} -= Err_j * Hinv_{j, j+1:}      (the paper's eq. 3, row form)
with H = 2/n sum x x^T the Hessian of the layer's squared error (eq. 1) and Hinv the upper Cholesky factor of
H^-1 (Step 3, "Cholesky reformulation"). Updates are applied lazily: inside a block of `blocksize` columns at
once, then to the rest with one matrix product (Step 2, "lazy batch-updates").

Options, as in the authors' code:
  percdamp: add percdamp * mean(diag(H)) to diag(H) (numerical stability of H^-1).
  actorder: solve columns by descending diag(H) (the largest inputs first), "act-order".
  static_groups: fit every group's scale up front, on the original weight in the original column order.
      Without it, a group's scale is fitted when its first column comes up, on the already-updated weights,
      and with act-order the groups follow the solving order, which scatters each group over the original
      columns (GPTQ's g_idx). Runtimes' blockwise formats (ONNX MatMulNBits / DequantizeLinear block_size,
      TFLite blockwise int4, Core ML blockwise) need contiguous groups in the original order, so converters
      must use `static_groups=True` with act-order: the result then has groups contiguous in the original
      order and `perm` None (the permutation only changed the solving order).
Pruned weights stay zero: a weight that is exactly 0 when the layer comes (sparsity, edgeq/compress/sparsity.py)
is coded at its group's zero point (real value exactly 0) whatever the updates spread onto it, and its own error
(its updated value) is spread over the columns still to solve like any rounding error, so the compensation
lands on the weights that remain (as SparseGPT's joint prune-and-quantize does); group ranges are fitted with
those weights at 0.
One difference from the authors' code: a group's scale is fitted on its columns' CURRENT values (every earlier
column's error already spread), also when the group reaches past the current block; their code reads the
columns past the block before the block's pending update. This keeps the blocked solve equal to the plain
column-by-column algorithm for every blocksize.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import LowBitWeight, codes_dtype, fit_scales, rtn

DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10: 1% -> 1000% of mean(diag(H)) at most


@contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The solve runs thousands of ops on one column each: on CPU, intra-op threads only add barrier waits
    there (measured on 2 busy cores: 10-40x slower with 2 threads than with 1, and no faster when idle for
    MiniLM-sized layers). add_batch, the big product, keeps the caller's thread count."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class GPTQ:
    """One layer's GPTQ state. `weight` is [N out, K in] (a conv's weight reshaped to [N, C*kh*kw]); `name`
    (the layer's FQN) goes into error messages. H accumulates in float64 on CPU (cheap there, and the
    column-by-column solve stays close to exact arithmetic), float32 on accelerators."""

    def __init__(self, weight: torch.Tensor, name: str = "layer"):
        self.name = name
        self.W = weight.detach().reshape(weight.shape[0], -1)
        self.rows, self.columns = self.W.shape
        dtype = torch.float64 if self.W.device.type == "cpu" else torch.float32
        self.H = torch.zeros(self.columns, self.columns, device=self.W.device, dtype=dtype)
        self.nsamples = 0
        self.loss: float | None = None  # after solve: sum of (W_j - Q_j)^2 / Hinv_jj^2 / 2, the paper's Losses
        self.errors: dict[str, float] = {}  # after a guarded solve: tr(E H E^T) of "gptq" and "rtn", tr(W H W^T)
        self.fell_back = False  # after a guarded solve: whether round-to-nearest was kept
        self.zeros = self.W == 0  # pruned weights: they stay exactly 0 (the module docstring)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate H = 2/n sum x x^T over the rows of `inputs` [..., K] (tokens, or a conv's unfolded
        patches), as a running mean, so any number of batches can come."""
        x = inputs.detach().reshape(-1, self.columns).to(self.H.device, self.H.dtype)
        count = x.shape[0]
        if count == 0:
            return
        self.H *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        x = x * (2 / self.nsamples) ** 0.5
        self.H += x.T @ x

    def solve(
        self,
        grid: Grid,
        *,
        percdamp: float = 0.01,
        blocksize: int = 128,
        actorder: bool = False,
        static_groups: bool = False,
        clip: str = "minmax",
        rtn_guard: bool = True,
    ) -> LowBitWeight:
        """Quantize the layer's weight onto `grid` (see the module docstring for the options). Frees H.

        clip: how each group's range is fitted: "minmax", or "mse" (the RTN clip search on the group's current
            values, each column's error weighted by its input's second moment diag(H)).
        rtn_guard: also round to nearest (same grid and clip) and keep whichever has the smaller layer output
            error tr(E H E^T): at 2 bits, with groups fitted on the updated weights in the natural order, GPTQ's
            error feedback can widen a group's range enough to lose to plain rounding on layers with uneven
            input channels (measured on random correlated layers; act-order, static groups or clip="mse" avoid
            it). `self.errors` holds both errors and `self.fell_back` says which was kept.
        """
        if self.nsamples == 0:
            raise ValueError(f"GPTQ on {self.name}: no calibration inputs reached this layer (add_batch was never called)")
        if blocksize < 1:
            raise ValueError(f"GPTQ on {self.name}: blocksize {blocksize} must be positive")
        grid.groups(self.columns)  # refuses a K that is not a multiple of the group size
        H, self.H = self.H, None
        W = self.W.to(H.dtype).clone()

        dead = torch.diag(H) == 0  # inputs that were always 0: any weight there is free, so make it 0
        H[dead, dead] = 1
        W[:, dead] = 0
        with _one_thread_on_cpu(W.device):
            result = self._solve(W.clone(), H.clone() if rtn_guard else H, grid, percdamp, blocksize, actorder, static_groups, clip)
            if not rtn_guard:
                return result
            rounded = rtn(W, grid, clip, importance=torch.diag(H))
            self.errors = {
                "gptq": self._output_error(W, result, H),
                "rtn": self._output_error(W, rounded, H),
                "weight": float(((W @ H) * W).sum()),  # tr(W H W^T): the output's own energy, for relative errors
            }
        self.fell_back = self.errors["rtn"] < self.errors["gptq"]
        return rounded if self.fell_back else result

    def summary(self) -> dict[str, float]:
        """After solve: the layer's numbers for reports (rows seen, the paper's loss, guarded errors)."""
        return {"rows": float(self.nsamples), "loss": self.loss or 0.0, **self.errors, "fell_back": float(self.fell_back)}

    @staticmethod
    def _output_error(W: torch.Tensor, quantized: LowBitWeight, H: torch.Tensor) -> float:
        """tr(E H E^T) with E = W - Q: the layer's squared output error on the calibration inputs (times 2/n)."""
        E = W - quantized.dequantize().to(W.dtype)
        return float(((E @ H) * E).sum())

    def _solve(self, W, H, grid, percdamp, blocksize, actorder, static_groups, clip) -> LowBitWeight:
        """Algorithm 1 of the paper on W [N, K] (dead columns zeroed) and H (dead diagonal set to 1)."""
        columns = self.columns
        group_size = grid.group_size or columns
        static = None
        if static_groups or grid.group_size is None:  # one fit up front, original order
            static = fit_scales(W, grid, clip, torch.diag(H))

        perm = None
        zeros = self.zeros.to(W.device)
        if actorder:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            zeros = zeros[:, perm]
        # the group each solved column belongs to when groups are static (fitted in the original order)
        group_of = ((perm.cpu() if perm is not None else torch.arange(columns)) // group_size).tolist()

        energy = torch.diag(H).clone()  # the inputs' second moments: the clip search's column weights
        Hinv = self._inverse_hessian_cholesky(H, percdamp)
        del H

        Q = torch.zeros_like(W)
        Losses = torch.zeros_like(W)
        scale = torch.zeros(self.rows, columns // group_size, device=W.device)
        zero = torch.zeros_like(scale)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            self._solve_block(W, W1, Q1, Err1, Losses, Hinv, i1, i2, grid, clip, static, group_of, energy, scale, zero, zeros)
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.loss = Losses.sum().item()

        codes = Q.to(codes_dtype(grid))
        if static is not None:
            scale, zero = static
            if perm is not None:  # groups were fitted in the original order: store codes there too
                codes = codes[:, torch.argsort(perm)]
            perm = None
        return LowBitWeight(codes, scale.float(), zero.float(), grid, perm)

    def _solve_block(self, W, W1, Q1, Err1, Losses, Hinv, i1, i2, grid, clip, static, group_of, energy, scale, zero, zeros):
        """Columns i1..i2 one by one (the paper's inner loop): codes into Q1, scaled errors into Err1; weights
        marked in `zeros` (pruned) take their group's zero point."""
        group_size = grid.group_size or self.columns
        Hinv1 = Hinv[i1:i2, i1:i2]
        group_scale = group_zero = None
        if static is None and i1 % group_size:  # the block starts inside a group fitted in an earlier block
            g = i1 // group_size
            group_scale, group_zero = scale[:, g : g + 1], zero[:, g : g + 1]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                g = group_of[j]
                group_scale, group_zero = static[0][:, g : g + 1], static[1][:, g : g + 1]
            elif j % group_size == 0:  # a new group starts: fit it on its columns' current values
                current = self._current_columns(W, W1, Err1, Hinv, i1, i2, j, j + group_size)
                current = current.masked_fill(zeros[:, j : j + current.shape[1]], 0)  # pruned weights will be 0
                group_scale, group_zero = fit_scales(current, grid, clip, energy[j : j + group_size])
                scale[:, j // group_size] = group_scale[:, 0]
                zero[:, j // group_size] = group_zero[:, 0]
            w = W1[:, i : i + 1]
            q = grid.quantize(w, group_scale, group_zero)  # codes, one column
            q = torch.where(zeros[:, j : j + 1], group_zero.to(q.dtype), q)  # a pruned weight: code = zero point, value 0
            Q1[:, i : i + 1] = q
            d = Hinv1[i, i]
            err = (w - grid.dequantize(q, group_scale, group_zero)) / d
            Losses[:, j] = err[:, 0] ** 2 / 2  # (w - q)^2 / Hinv_jj^2 / 2
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err

    @staticmethod
    def _current_columns(W, W1, Err1, Hinv, i1, i2, start, stop) -> torch.Tensor:
        """Columns [start, stop) of the weight with every quantized column's error spread: those inside the
        current block from W1; those past it from W minus the block's pending lazy update."""
        inside = W1[:, start - i1 : min(stop, i2) - i1]
        if stop <= i2:
            return inside
        pending = Err1[:, : start - i1] @ Hinv[i1:start, i2:stop]
        return torch.cat([inside, W[:, i2:stop] - pending], dim=1)

    def _inverse_hessian_cholesky(self, H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Hinv: the upper Cholesky factor of (H + damp I)^-1. Retries with 10x the dampening when H is not
        numerically positive definite; raises a ValueError naming the layer if that never works."""
        mean_diag = torch.mean(torch.diag(H))
        diagonal = torch.arange(self.columns, device=H.device)
        damp_fraction = percdamp
        for _ in range(DAMPING_RETRIES + 1):
            damped = H.clone()
            damped[diagonal, diagonal] += damp_fraction * mean_diag
            L, info = torch.linalg.cholesky_ex(damped)
            if info.item() == 0:
                Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info.item() == 0 and torch.isfinite(Hinv).all():
                    return Hinv
            damp_fraction *= 10
        raise ValueError(
            f"GPTQ on {self.name}: the Hessian of its inputs ({self.columns}x{self.columns}, {self.nsamples} rows) is "
            f"not positive definite even with dampening {damp_fraction / 10:g} x mean(diag(H)); check the layer's "
            f"calibration inputs for inf/NaN, or use more calibration samples or round-to-nearest for this layer"
        )
