"""Static activation numbers: one calibration pass with an observer on each quantized layer's input (after
SmoothQuant's division, exactly what the artifact's quantize op will see) and, when the target wants integer
results, on its output."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.calibration.collect import Sample, watch
from edgeq.calibration.observers import activation_quant, make_observer
from edgeq.plan import LayerPlan, QDtype


def calibrate_activations(
    module: nn.Module,
    layers: dict[str, LayerPlan],
    samples: list[Sample],
    input_names: list[str],
    *,
    dtype: QDtype,
    symmetric: bool,
    observer: str,
    quantize_outputs: bool,
    scale_dtype: str,
) -> None:
    """Set `activation` (and `output`) of every layer in `layers` from the calibration samples, in place."""
    inputs = {fqn: make_observer(observer, dtype, symmetric) for fqn in layers}
    outputs = {fqn: make_observer(observer, dtype, symmetric) for fqn in layers} if quantize_outputs else {}
    inverse = {
        fqn: torch.from_numpy((1.0 / layer.smooth.astype(np.float64)).astype(np.float32))
        for fqn, layer in layers.items()
        if layer.smooth is not None
    }

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        inputs[fqn].observe(x * inverse[fqn] if fqn in inverse else x)  # the same float multiply as compress.qdq.Smooth
        if fqn in outputs:
            outputs[fqn].observe(y)

    watch(module, set(layers), samples, input_names, record, f"calibration: {observer} ranges")
    for fqn, layer in layers.items():
        layer.activation = activation_quant(*inputs[fqn].range(), dtype, symmetric, scale_dtype)
        if fqn in outputs:
            layer.output = activation_quant(*outputs[fqn].range(), dtype, symmetric, scale_dtype)
