"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights of a linear layer.

Transformer activations have a few channels with values 10-100x the rest; one per-tensor activation scale
then spends most of its codes on them. With a per-input-channel factor s, x @ W^T = (x / s) @ (W * s)^T is
the same function, while x / s has flat channels and W * s stays easy to quantize per output channel.
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha); alpha near 1 moves more difficulty into the weights.
"""

from __future__ import annotations

import numpy as np
import torch

_FLOOR = 1e-5  # channels that never fire (or zero weight columns) keep s = 1


def smooth_factors(activation_absmax: np.ndarray, weight: torch.Tensor, alpha: float) -> np.ndarray:
    """The per-input-channel factors s for a linear layer with weight [out, in]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be within [0, 1], got {alpha}")
    weight_absmax = weight.detach().abs().amax(dim=0).float().numpy()
    act = np.asarray(activation_absmax, dtype=np.float64)
    w = weight_absmax.astype(np.float64)
    usable = (act > _FLOOR) & (w > _FLOOR)
    factors = np.ones_like(act)
    factors[usable] = act[usable] ** alpha / w[usable] ** (1.0 - alpha)
    return np.clip(factors, _FLOOR, 1.0 / _FLOOR).astype(np.float32)


def smoothed_weight(weight: torch.Tensor, factors: np.ndarray) -> np.ndarray:
    """W * s along the input axis: the weight the plan quantizes."""
    return (weight.detach().float().numpy() * factors[None, :]).astype(np.float32)
