"""The linears that feed a residual add are found from the forward pass (not from their names), and on an
integer-island target (TFLite w8a8) they start as the hybrid kernel, with the reason in the plan."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.plan import QDtype
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import RESIDUAL_HYBRID, Calibration, resolve_plan
from edgeq.targets.resolve_residual import residual_linears


class Blocks(nn.Module):
    """A post-LN block (BERT: LayerNorm(dropout(dense(x)) + x)), a pre-LN block with a layer scale
    (x + gamma * proj(gelu(up(LN(x))))), and a recurrent-style sum of two linears, which is no residual."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn_in, self.attn_out = nn.Linear(16, 16), nn.Linear(16, 16)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.ih, self.hh = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x, h):
        x = self.norm1(self.drop(self.attn_out(torch.relu(self.attn_in(x)))) + x)
        x = x + self.gamma * self.down(nn.functional.gelu(self.up(self.norm2(x))))
        h = torch.tanh(self.ih(x) + self.hh(h))
        return self.head(h)


def _linears(module):
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}


def _inputs():
    return torch.randn(2, 3, 16), torch.randn(2, 3, 16)


def test_residual_linears_follow_the_data_not_the_names():
    module = Blocks().eval()
    assert residual_linears(module, _linears(module), _inputs()) == ["attn_out", "down"]


def test_a_plain_stack_of_linears_has_no_residual_add():
    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    assert residual_linears(module, _linears(module), (torch.randn(1, 8),)) == []


def _plan(target: str):
    module = Blocks().eval()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3, 16)).astype(np.float32), "h": rng.standard_normal((2, 3, 16)).astype(np.float32)}
               for _ in range(4)]
    calibration = Calibration(samples, ["x", "h"], observer="minmax")
    return resolve_plan(module, load_profile(target), Precision.W8A8, [], _inputs(), calibration)


def test_tflite_w8a8_starts_residual_linears_hybrid_with_the_reason():
    plan = _plan("tflite")
    for fqn, layer in plan.layers.items():
        if fqn in ("attn_out", "down"):  # hybrid: int8 weights (smoothed), rows quantized per call, no static ranges
            assert layer.dynamic_activation == QDtype.INT8 and layer.activation is None and layer.output is None
            assert layer.reason == RESIDUAL_HYBRID and layer.weight is not None and layer.smooth is not None
            assert layer.bias_correction is None
        else:  # int8 islands
            assert layer.dynamic_activation is None and layer.activation is not None and layer.output is not None
    (note,) = [n for n in plan.notes if n.startswith(RESIDUAL_HYBRID)]
    assert note == f"{RESIDUAL_HYBRID}: 2 of 7 linear layers (attn_out, down)"


def test_other_targets_keep_every_layer_static():
    for target in ("onnx", "tflite-edgetpu"):  # ORT fuses QDQ MatMuls with float outputs; the Edge TPU is integer-only
        plan = _plan(target)
        assert all(layer.dynamic_activation is None and layer.activation is not None for layer in plan.layers.values())
        assert not any(n.startswith(RESIDUAL_HYBRID) for n in plan.notes)
