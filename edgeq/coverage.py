"""How much of a model a plan quantizes: every weight tensor counted, the float ones listed with a reason.

A weight tensor is a parameter with two or more dimensions (matrices, kernels, tables, packed projections),
in any module, known to edgeq or not; biases, norm scales and other 1-D parameters are no layer of their own but
count in the byte share. Tied parameters count once. The share is of the model's parameter bytes at FP32: what
fraction the plan stores quantized (edgeq.footprint's account, which counts each parameter once).
"""

from __future__ import annotations

from torch import nn

from edgeq.compress.apply import QUANTIZABLE, user_fqn
from edgeq.plan import QuantPlan

_NOT_QUANTIZED = {  # why a module kind edgeq knows stays float
    nn.ConvTranspose1d: "transposed convolutions are not quantized by edgeq (no weight-parity reader for them yet)",
    nn.ConvTranspose2d: "transposed convolutions are not quantized by edgeq (no weight-parity reader for them yet)",
    nn.ConvTranspose3d: "transposed convolutions are not quantized by edgeq (no weight-parity reader for them yet)",
    nn.Conv3d: "3-D convolutions are not quantized by edgeq",
    nn.EmbeddingBag: "nn.EmbeddingBag is not quantized by edgeq",
    nn.Bilinear: "nn.Bilinear is not quantized by edgeq",
}


def account_weights(module: nn.Module, plan: QuantPlan, reasons: dict[str, str] | None = None) -> None:
    """Fill `plan.other_weights` (user parameter name -> why it stays float) with every weight tensor of `module`
    that is no plan layer's weight, and `plan.quantized_share` (fraction of parameter bytes stored quantized).
    `reasons`: known reasons by user parameter name (e.g. a rewrite that could not be applied)."""
    reasons = reasons or {}
    owners = dict(module.named_modules())
    planned = {f"{fqn}.weight": layer for fqn, layer in plan.layers.items()}
    tensors: dict[int, tuple] = {}  # tied parameters: one tensor, every name it goes by
    for name, parameter in module.named_parameters(remove_duplicate=False):
        tensors.setdefault(id(parameter), (name, parameter, []))[2].append(user_fqn(name))
    total = quantized = 0
    other: dict[str, str] = {}
    for name, parameter, names in tensors.values():
        total += parameter.numel()
        layers = [planned[n] for n in names if n in planned]
        if layers:
            quantized += parameter.numel() if any(_stored_quantized(layer) for layer in layers) else 0
        elif parameter.dim() >= 2:
            other[names[0]] = reasons.get(names[0]) or _reason(owners.get(name.rpartition(".")[0]), names[0])
    plan.other_weights = dict(sorted(other.items()))
    plan.quantized_share = quantized / total if total else 0.0


def _stored_quantized(layer) -> bool:
    return layer.weight is not None or layer.palette is not None


def _reason(owner: nn.Module | None, name: str) -> str:
    kind = type(owner).__name__ if owner is not None else "module"
    for known, reason in _NOT_QUANTIZED.items():
        if isinstance(owner, known):
            return reason
    if isinstance(owner, QUANTIZABLE):
        return f"{kind} not executed by the model on its example inputs, so not exported"
    return (f"a parameter of {kind} ({name.rpartition('.')[2]}), read by ops edgeq does not quantize; quantized are the "
            "weights of nn.Linear, nn.Conv1d/2d (grouped and depthwise too) and nn.Embedding, and of nn.GRU/LSTM/RNN, "
            "their cells and nn.MultiheadAttention through their rebuilt nn.Linear layers")
