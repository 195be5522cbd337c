"""keep_dequantized: PyTorch-only evaluation dequantizes each weight once, with the very same numbers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.qdq import QuantizedWeight, WeightForm, keep_dequantized, quantized_module
from edgeq.plan import LayerPlan, OpKind, QDtype


def test_the_kept_weight_equals_the_dequantized_codes_and_outputs_do_not_move():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    quant, codes = quantize_weight_per_channel(linear.weight, QDtype.INT8, 0, "float32")
    layer = LayerPlan("fc", OpKind.LINEAR, quant, codes)
    plain = quantized_module(linear, layer, WeightForm.CODES).eval()
    kept = keep_dequantized(quantized_module(linear, layer, WeightForm.CODES).eval())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), kept(x))
        weight = next(m for m in kept.modules() if isinstance(m, QuantizedWeight))
        assert weight.evaluated is not None and torch.equal(weight(), plain.weight())
    assert np.array_equal(weight.evaluated.numpy(), quant.dequantize(codes))
