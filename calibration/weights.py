"""Weight quantization decided in PyTorch: per-channel symmetric round-to-nearest.

The codes are part of the plan (an algorithm such as GPTQ may round differently), so they are stored,
not recomputed by converters.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeq.plan import PerChannel, QDtype, TensorQuant, symmetric_zero_point


def quantize_weight_per_channel(weight: torch.Tensor, dtype: QDtype = QDtype.INT8, axis: int = 0) -> tuple[TensorQuant, np.ndarray]:
    """Symmetric per-channel scales max|w| / qmax along every axis but `axis`; returns (quant, codes).

    The symmetric range is [-qmax, qmax] (-127..127 for int8), the convention of TFLite and ONNX Runtime's
    per-channel kernels; an all-zero channel gets scale 1 so it stays exactly zero.
    """
    values = weight.detach().float().cpu().numpy()
    reduce = tuple(d for d in range(values.ndim) if d != axis)
    amax = np.abs(values).max(axis=reduce)
    scale = np.where(amax > 0, amax / dtype.qmax, 1.0).astype(np.float32)
    zero = np.full(scale.shape, symmetric_zero_point(dtype), dtype=np.int32)
    quant = TensorQuant(dtype, PerChannel(axis), True, scale, zero)
    return quant, quant.quantize(values)
