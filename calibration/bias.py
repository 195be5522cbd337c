"""Bias correction (Nagel et al., 2019): quantized weights and activations shift each output channel's mean.

For every layer with static activations, the calibration samples give the mean error per output channel,
E[y_fp32 - y_quantized], where y_quantized is the layer's quantized form (its plan) applied to the FP32
model's own input. Adding it to the bias removes the shift. It is kept only where it helps: when removing
the mean takes away at least MIN_GAIN of the layer's output error power on the calibration samples (a
channel shift that is noise-sized would just move the bias around).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeq.calibration.collect import Sample, watch
from edgeq.compress.qdq import WeightForm, keep_dequantized, quantized_module
from edgeq.plan import LayerPlan

MIN_GAIN = 0.05


def correct_biases(module: nn.Module, layers: dict[str, LayerPlan], modules: dict[str, nn.Module], samples: list[Sample], input_names: list[str]) -> list[str]:
    """Set `bias_correction` on the layers where it helps; returns their FQNs."""
    quantized = {fqn: keep_dequantized(quantized_module(modules[fqn], layer, WeightForm.CODES).eval()) for fqn, layer in layers.items()}
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        error = (y - quantized[fqn](x)).double()
        axis = -1 if isinstance(modules[fqn], nn.Linear) else 1  # output channels: last axis of a linear, 1 of a conv
        channels = error.movedim(axis, 0).reshape(error.shape[axis], -1)
        sums[fqn] = sums.get(fqn, 0) + channels.sum(dim=1)
        squares[fqn] = squares.get(fqn, 0) + (channels**2).sum(dim=1)
        counts[fqn] = counts.get(fqn, 0) + channels.shape[1]

    watch(module, set(layers), samples, input_names, record, "calibration: bias correction")
    corrected = []
    for fqn, layer in layers.items():
        if fqn not in counts:
            continue
        mean = sums[fqn] / counts[fqn]
        power = float((squares[fqn] / counts[fqn]).sum())
        if power > 0 and float((mean**2).sum()) >= MIN_GAIN * power:
            layer.bias_correction = mean.float().numpy()
            corrected.append(fqn)
    return corrected
