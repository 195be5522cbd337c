"""SparseGPT for one layer: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv:2301.00774. Shaped like the authors' `sparsegpt.py` (IST-DASLab/sparsegpt,
`fasterprune`): feed the layer's inputs (`add_batch`, the same H = 2/n sum x x^T as GPTQ), then `solve`.

The layer minimizes ||W X - W' X||^2 over weights W' with the requested zeros, column by column like GPTQ
(Algorithm 1 of the paper): a pruned weight is "rounded" to 0 and its error spread over the not yet solved
columns of its row through the inverse Hessian,
    Err_j = (W_j - M_j W_j) / Hinv_jj,        W_{j+1:} -= Err_j * Hinv_{j, j+1:}
so the surviving weights compensate for the ones removed. Which weights go (the mask) is chosen lazily, by
the OBS saliency w^2 / [Hinv]_jj^2 on the weights as updated so far (eq. 5, "adaptive mask selection"):
  unstructured  per block of `blocksize` columns, the `sparsity` share of the block's weights with the least
                saliency (the authors' choice of blocks of 128 columns: masks adapt to the updates without the
                cost of a choice per column);
  N:M           in each row, per group of m consecutive input columns, the m - n of least saliency, chosen when
                the solve reaches the group's first column (the authors' `prunen`/`prunem`).
The authors' code takes a threshold (`<= sorted[k]`), which prunes extra weights on ties; here exactly
round(sparsity x block) weights go per block, so a layer's sparsity is what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeq.calibration.lowbit.gptq import GPTQ, _one_thread_on_cpu


@dataclass(frozen=True)
class PrunedWeight:
    """A pruned layer weight [N out, K in] (float32) and its mask (True where the weight was pruned to 0). It has
    the `dequantize()` the low-bit driver writes back into the model (calibration/lowbit/driver.py)."""

    weight: torch.Tensor
    mask: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.weight

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean())


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the m - n lowest `score` entries of every group of m consecutive columns of [N, K] (K % m == 0):
    N:M sparsity keeps n of every m weights along the input dimension."""
    rows, columns = score.shape
    groups = score.reshape(rows, columns // m, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, columns)


def smallest_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for exactly round(sparsity x numel) entries of least `score` (ties broken by position)."""
    count = int(round(sparsity * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        mask[torch.argsort(score.flatten(), stable=True)[:count]] = True
    return mask.reshape(score.shape)


class SparseGPT(GPTQ):
    """One layer's SparseGPT state: H accumulates like GPTQ's. Either `sparsity` (unstructured, a share in [0, 1))
    or `n` and `m` (N:M along K). `errors` after solve: the layer output errors tr(E H E^T) of SparseGPT and of
    magnitude pruning to the same pattern, and tr(W H W^T) (the output's energy, for relative errors)."""

    def __init__(self, weight: torch.Tensor, name: str = "layer", *, sparsity: float | None = None,
                 n: int | None = None, m: int | None = None):
        super().__init__(weight, name)
        if (sparsity is None) == (n is None or m is None):
            raise ValueError(f"SparseGPT on {name}: give either a sparsity or N:M (n and m)")
        if m is not None and self.columns % m:
            raise ValueError(f"SparseGPT on {name}: {self.columns} input columns are not a multiple of M = {m}")
        self.sparsity, self.n, self.m = sparsity, n, m

    def magnitude_mask(self, W: torch.Tensor) -> torch.Tensor:
        """The same pattern chosen by |w| alone (the baseline SparseGPT must beat)."""
        score = W.abs()
        return nm_mask(score, self.n, self.m) if self.m else smallest_mask(score, self.sparsity)

    def solve(self, *, percdamp: float = 0.01, blocksize: int = 128) -> PrunedWeight:  # type: ignore[override]
        if self.nsamples == 0:
            raise ValueError(f"SparseGPT on {self.name}: no calibration inputs reached this layer (add_batch was never called)")
        if self.m and blocksize % self.m:
            blocksize = max(self.m, blocksize - blocksize % self.m)  # an N:M group never straddles two blocks
        H, self.H = self.H, None
        W = self.W.to(H.dtype).clone()
        dead = torch.diag(H) == 0  # inputs that were always 0: their weights are free, as in GPTQ
        H[dead, dead] = 1
        W[:, dead] = 0
        with _one_thread_on_cpu(W.device):
            Hinv = self._inverse_hessian_cholesky(H.clone(), percdamp)
            pruned, mask = self._prune(W.clone(), Hinv, blocksize)
            magnitude = self.magnitude_mask(W)
            self.errors = {
                "sparsegpt": self._error(W, pruned, H),
                "magnitude": self._error(W, W.masked_fill(magnitude, 0), H),
                "weight": float(((W @ H) * W).sum()),
            }
        return PrunedWeight(pruned.float(), mask)

    def summary(self) -> dict[str, float]:
        return {"rows": float(self.nsamples), "loss": self.loss or 0.0, **self.errors}

    @staticmethod
    def _error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
        E = W - pruned.to(W.dtype)
        return float(((E @ H) * E).sum())

    def _prune(self, W: torch.Tensor, Hinv: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's Algorithm 1 without quantization: W [N, K] pruned in place, and the mask."""
        mask = torch.zeros_like(W, dtype=torch.bool)
        loss = 0.0
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            diag = torch.diag(Hinv1)
            mask1 = mask[:, i1:i2]
            if not self.m:  # unstructured: this block's least salient weights (eq. 5)
                mask1 |= smallest_mask(W1**2 / diag.reshape(1, -1) ** 2, self.sparsity)
            for i in range(i2 - i1):
                if self.m and i % self.m == 0:  # N:M: choose the group's m - n when the solve reaches it
                    score = W1[:, i : i + self.m] ** 2 / diag[i : i + self.m].reshape(1, -1) ** 2
                    mask1[:, i : i + self.m] = nm_mask(score, self.n, self.m)
                w = W1[:, i]
                q = w.masked_fill(mask1[:, i], 0)
                d = Hinv1[i, i]
                err = (w - q) / d
                loss += float((err**2).sum()) / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.loss = loss
        return W.masked_fill(mask, 0), mask


def sparsegpt_solver(sparsity: dict[str, float] | None = None, n: int | None = None, m: int | None = None, **options):
    """The driver's solver factory (calibration/lowbit/driver.py `quantize_layers`): SparseGPT per layer, at
    `sparsity[fqn]` (unstructured) or N:M; `options` are SparseGPT.solve's (percdamp, blocksize)."""
    from edgeq.calibration.lowbit.driver import layer_weight

    class _Layer(SparseGPT):
        def solve(self) -> PrunedWeight:  # the driver's no-argument solve
            return super().solve(**options)

    def make(fqn, module):
        return _Layer(layer_weight(module), name=fqn, sparsity=None if m else sparsity[fqn], n=n, m=m)

    return make
