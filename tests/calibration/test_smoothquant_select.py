"""Dynamic int8 keeps SmoothQuant only where it lowers the layer's output error (calibration/smoothquant_select.py):
a linear reading an input with an outlier channel stays smoothed, one reading a flat input loses its runtime Mul,
and the decision with its measured errors is in the plan's notes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.calibration.smoothquant_select import dynamic_quantize
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import Calibration, resolve_plan


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.outlier, self.flat = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        scaled = x * torch.where(torch.arange(32) == 5, 60.0, 1.0)  # one channel 60x the rest, as after a LayerNorm
        return self.outlier(scaled) + self.flat(torch.tanh(x))


def _plan(target, alpha=None):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(6)]
    example = (torch.from_numpy(samples[0]["x"]),)
    return resolve_plan(TwoInputs().eval(), load_profile(target), Precision.INT8_DYNAMIC, example_inputs=example,
                        calibration=Calibration(samples, ["x"], smooth_alpha=alpha))


def test_smoothing_kept_only_where_it_lowers_the_dynamic_int8_error():
    for target, alpha in (("onnx", None), ("tflite", 0.7)):  # tflite smooths dynamic int8 only when asked (below)
        plan = _plan(target, alpha)
        assert plan.layers["outlier"].smooth is not None, target
        assert plan.layers["flat"].smooth is None, target
        note = next(n for n in plan.notes if n.startswith("SmoothQuant kept on 1 of 2"))
        assert "outlier: smoothed" in note and "flat: not smoothed" in note


def test_a_per_row_profile_leaves_dynamic_int8_unsmoothed_unless_asked():
    """tflite's dynamic_smoothing = false: XNNPACK's per-row grid makes the run-time Muls cost more than they buy
    (MiniLM: AEQ's speed without them), so no layer is smoothed and the note says how to ask for it."""
    plan = _plan("tflite")
    assert plan.layers["outlier"].smooth is None and plan.layers["flat"].smooth is None
    assert any(n.startswith("no SmoothQuant: target tflite turns it off") and "--smoothquant ALPHA" in n for n in plan.notes)
    assert _plan("onnx").layers["outlier"].smooth is not None  # ORT's per-tensor grid: smoothing pays there


def test_dynamic_quantize_matches_the_runtimes_grids():
    x = torch.tensor([[-1.0, 0.5, 3.0], [0.1, 0.2, 0.3]])
    per_tensor = dynamic_quantize(x, per_row=False)  # ORT DynamicQuantizeLinear: one uint8 range holding 0
    step = 4.0 / 255
    assert torch.allclose(per_tensor, torch.round(x / step + round(1 / step)) * step - round(1 / step) * step)
    per_row = dynamic_quantize(x, per_row=True)  # second row: its own range [0, 0.3]
    assert torch.allclose(per_row[1], x[1], atol=0.3 / 255 / 2 + 1e-7)
    assert not torch.allclose(per_tensor[1], x[1], atol=0.3 / 255 / 2 + 1e-7)
