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


def shared_factors(activation_absmax: np.ndarray, weights: list[torch.Tensor], alpha: float) -> np.ndarray:
    """One set of factors for linears that read the same tensor (q, k and v): max |W_:,j| over all of their
    weights, as SmoothQuant does for OPT's q/k/v projections. One x / s then serves them all, so the artifact
    quantizes that input once instead of once per layer (converters/onnx_graph_shape.py)."""
    stacked = torch.cat([w.detach().float() for w in weights], dim=0)
    return smooth_factors(activation_absmax, stacked, alpha)


def shared_input_groups(module: torch.nn.Module, fqns: set[str], sample: dict, input_names: list[str]) -> list[list[str]]:
    """The layers of `fqns` grouped by the tensor they read in one forward pass on `sample` (the very same
    tensor object, so the grouping is exact), each group in call order; a layer called on several different
    tensors stays alone."""
    from edgeq.compress.apply import user_fqn

    inputs: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, []).append(args[0])
        return hook

    handles = [child.register_forward_pre_hook(record(user_fqn(fqn))) for fqn, child in module.named_modules() if user_fqn(fqn) in fqns]
    try:
        with torch.no_grad():
            module(*(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor | None, list[str]]] = []
    for name, seen in inputs.items():
        tensor = seen[0] if all(t is seen[0] for t in seen) else None
        group = next((g for t, g in groups if tensor is not None and t is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        else:
            group.append(name)
    return [group for _, group in groups] + [[name] for name in sorted(fqns - set(inputs))]
