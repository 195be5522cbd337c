"""Static activation numbers: one calibration pass with an observer on each quantized layer's input (after
SmoothQuant's division, exactly what the artifact's quantize op will see) and, when the target wants integer
results, on its output; full-integer targets also observe their tensor points (model inputs, outputs of the
leaf modules between layers) in the same pass."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.calibration.collect import Sample, called_modules, watch
from edgeq.calibration.observers import activation_quant, make_observer
from edgeq.compress.apply import QUANTIZABLE
from edgeq.compress.qdq import smooth_inverse
from edgeq.plan import INPUT_PREFIX, LayerPlan, QDtype, TensorQuant

# Leaf modules that change no value (eval mode), so their output needs no point of its own.
_PASSTHROUGH = (nn.Identity, nn.Dropout)


def tensor_points(module: nn.Module, example_inputs: tuple, input_names: list[str]) -> list[str]:
    """The tensor points of a full-integer target: every float model input ("input:<name>") and the output of
    every leaf module the example forward calls that is not a quantizable layer (whose own q/dq covers it),
    when that output is a float tensor. Functional ops in a forward (torch.mean, F.relu, x.flatten) have no
    module to hook, so they get no point: their consumers' q/dq, if any, are all that quantizes them."""
    points = [INPUT_PREFIX + name for name, x in zip(input_names, example_inputs) if x.is_floating_point()]

    def leaf_between_layers(_fqn: str, child: nn.Module) -> bool:
        return not any(child.children()) and not isinstance(child, (*QUANTIZABLE, *_PASSTHROUGH))

    return points + called_modules(module, example_inputs, leaf_between_layers)


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
    tensors: list[str] = (),
) -> dict[str, TensorQuant]:
    """Set `activation` (and `output`) of every layer in `layers` from the calibration samples, in place;
    returns the quantization of each tensor point in `tensors` (see `tensor_points`)."""
    inputs = {fqn: make_observer(observer, dtype, symmetric) for fqn in layers}
    outputs = {fqn: make_observer(observer, dtype, symmetric) for fqn in layers} if quantize_outputs else {}
    points = {key: make_observer(observer, dtype, symmetric) for key in tensors}
    inverse = {fqn: smooth_inverse(layer.smooth) for fqn, layer in layers.items() if layer.smooth is not None}

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if fqn in inputs:
            inputs[fqn].observe(x * inverse[fqn] if fqn in inverse else x)  # the same float multiply as compress.qdq.Smooth
        if fqn in outputs:
            outputs[fqn].observe(y)
        if fqn in points:
            points[fqn].observe(y)

    def record_inputs(sample) -> None:  # model inputs: the samples themselves, in the same pass (one load each)
        for name in input_names:
            if INPUT_PREFIX + name in points:
                points[INPUT_PREFIX + name].observe(np.asarray(sample[name], dtype=np.float32))

    watch(module, set(layers) | set(points), samples, input_names, record, f"calibration: {observer} ranges", record_inputs)
    for fqn, layer in layers.items():
        layer.activation = activation_quant(*inputs[fqn].range(), dtype, symmetric, scale_dtype)
        if fqn in outputs:
            layer.output = activation_quant(*outputs[fqn].range(), dtype, symmetric, scale_dtype)
    return {key: activation_quant(*observed.range(), dtype, symmetric, scale_dtype) for key, observed in points.items()}
