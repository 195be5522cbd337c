"""Weight quantization decided in PyTorch: per-channel symmetric round-to-nearest.

The codes are part of the plan (an algorithm such as GPTQ may round differently), so they are stored,
not recomputed by converters.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeq.plan import PerChannel, QDtype, TensorQuant, symmetric_zero_point


def quantize_weight_per_channel(
    weight: torch.Tensor | np.ndarray, dtype: QDtype = QDtype.INT8, axis: int = 0, scale_dtype: str = "float32"
) -> tuple[TensorQuant, np.ndarray]:
    """Symmetric per-channel scales max|w| / qmax along every axis but `axis`; returns (quant, codes).

    The symmetric range is [-qmax, qmax] (-127..127 for int8), the convention of TFLite and ONNX Runtime's
    per-channel kernels; an all-zero channel gets scale 1 so it stays exactly zero. With scale_dtype
    float16 the scales are rounded up to the float16 grid (up, so no code leaves the range), because a
    runtime computing in fp16 stores them so and the plan must hold what the artifact holds.
    """
    values = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
    reduce = tuple(d for d in range(values.ndim) if d != axis)
    amax = np.abs(values).max(axis=reduce)
    scale = np.where(amax > 0, amax / dtype.qmax, 1.0).astype(np.float32)
    if scale_dtype == "float16":
        scale = fp16_grid_up(scale)
    zero = np.full(scale.shape, symmetric_zero_point(dtype), dtype=np.int32)
    quant = TensorQuant(dtype, PerChannel(axis), True, scale, zero)
    return quant, quant.quantize(values)


def fp16_grid_up(values: np.ndarray) -> np.ndarray:
    """The smallest float16-representable values >= `values` (kept as float32, positive)."""
    half = values.astype(np.float16)
    below = half.astype(np.float32) < values
    half[below] = np.nextafter(half[below], np.float16(np.inf))
    return np.maximum(half, np.float16(2.0**-14)).astype(np.float32)  # stay in float16's normal range
