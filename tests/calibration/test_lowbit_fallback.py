"""--auto-fallback on low-bit plans: the sweep finds a planted sensitive layer (an outlier input column that
sets its per-channel scale, so every other weight rounds to zero at 3 bits), relaxes it to int8 when that holds
the budget in simulation, and on to float when int8's grid is ruined by the outlier too."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.load import load_model
from edgeq.quantize import QuantizeOptions, quantization_plan
from edgeq.targets import Precision, load_profile
from edgeq.validate.budget import parse_budget


class Planted(nn.Module):
    """first -> sensitive -> last; `sensitive` has a large outlier in input column 0, whose input is scaled
    down to nearly nothing: the outlier barely matters to the output but sets every row's scale."""

    def __init__(self, outlier: float):
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.sensitive = nn.Linear(64, 64)
        self.last = nn.Linear(64, 16)
        with torch.no_grad():
            self.sensitive.weight.normal_(0, 0.1)
            self.sensitive.weight[:, 0] = outlier
        self.register_buffer("mask", torch.tensor([0.001] + [1.0] * 63))

    def forward(self, x):
        hidden = torch.relu(self.first(x)) * self.mask
        return self.last(torch.relu(self.sensitive(hidden)))


def mild():  # int3's step (1/3) zeroes the 0.1-sized weights; int8's (1/127) keeps them
    torch.manual_seed(0)
    return Planted(1.0), (torch.randn(4, 64),)


def strong():  # int8's step (300/127) zeroes them too: only float holds
    torch.manual_seed(0)
    return Planted(300.0), (torch.randn(4, 64),)


def samples(count=8):
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 64, generator=generator).numpy()} for _ in range(count)]


def fallback_plan(source: str, budget: str, target: str = "onnx", precision=Precision.INT3_WEIGHT, **options):
    model = load_model(f"tests.calibration.test_lowbit_fallback:{source}")
    options = QuantizeOptions(**{"algorithm": "rtn", "group_size": None, "auto_fallback": True, "fallback_max": 0.34, **options})
    _, plan, fallback = quantization_plan(model, load_profile(target), precision, options, [], samples(), parse_budget(budget))
    return plan, fallback


def test_the_planted_layer_falls_back_to_int8_when_that_holds():
    plan, fallback = fallback_plan("mild", "cosine>=0.98")
    assert [s.fqn for s in fallback.sweep][0] == "sensitive"  # the most harmful alone, measured first
    worst = fallback.sweep[0]
    assert worst.cosine_alone < 0.95 and all(s.cosine_alone > 0.98 for s in fallback.sweep[1:])
    assert fallback.relaxed == {"sensitive": "int8"} and fallback.holds and fallback.cap == 1
    assert fallback.before < 0.95 <= 0.98 <= fallback.after
    layer = plan.layers["sensitive"]
    assert layer.weight.dtype == "int8" and layer.weight.granularity.to_json()["kind"] == "per_channel"
    assert layer.reason.startswith("--auto-fallback: int8 instead of int3 per channel (alone it cost 0.0")
    assert "rank 1 of 3" in layer.reason
    assert plan.layers["first"].weight.dtype == "int3" and plan.layers["last"].weight.dtype == "int3"  # codes kept
    assert "relaxed 1 of 3 low-bit layers (1 to int8, 0 to float" in plan.notes[-1] and "budget holds" in plan.notes[-1]
    report = fallback.to_json()
    assert report["relaxed_to"] == {"sensitive": "int8"} and report["sweep"][0]["drift_alone"] > 0.05


def test_the_planted_layer_goes_on_to_float_when_int8_does_not_hold():
    plan, fallback = fallback_plan("strong", "cosine>=0.98")
    assert fallback.sweep[0].fqn == "sensitive" and fallback.relaxed == {"sensitive": "float"} and fallback.holds
    layer = plan.layers["sensitive"]
    assert layer.is_float and layer.reason.endswith("; int8 did not hold the budget")
    assert "--auto-fallback: float instead of int3 per channel" in layer.reason


def test_nothing_is_relaxed_when_the_budget_holds_or_the_cap_is_zero():
    plan, fallback = fallback_plan("mild", "cosine>=0.5")
    assert fallback.holds and fallback.relaxed == {} and fallback.sweep == []  # no sweep either: nothing to do
    plan, fallback = fallback_plan("mild", "cosine>=0.98", fallback_max=0.0)
    assert not fallback.holds and fallback.relaxed == {} and plan.layers["sensitive"].weight.dtype == "int3"


def test_fallback_keeps_per_layer_choices_and_reuses_the_plan_codes():
    """An int8 entry is not a candidate (only low-bit layers are), and the untouched layers' codes are the
    plan's own, not recomputed."""
    from edgeq.layer_overrides import parse_per_layer

    overrides = parse_per_layer({"first": "int8"}, "--per-layer")
    plan, fallback = fallback_plan("mild", "cosine>=0.98", layer_overrides=overrides, fallback_max=0.5)
    assert [s.fqn for s in fallback.sweep] == ["sensitive", "last"] and fallback.cap == 1
    model = load_model("tests.calibration.test_lowbit_fallback:mild")
    plain = quantization_plan(model, load_profile("onnx"), Precision.INT3_WEIGHT,
                              QuantizeOptions(algorithm="rtn", group_size=None, layer_overrides=overrides), [], samples(), parse_budget(None))[1]
    assert np.array_equal(plan.layers["last"].weight_codes, plain.layers["last"].weight_codes)
    assert plan.layers["first"].weight.dtype == "int8"


def test_int8_fallback_on_tflite_runs_the_hybrid_kernel():
    plan, fallback = fallback_plan("mild", "cosine>=0.98", target="tflite", precision=Precision.INT4_DYNAMIC, group_size=32)
    relaxed = [fqn for fqn, kind in fallback.relaxed.items() if kind == "int8"]
    assert relaxed == ["sensitive"]
    assert plan.layers["sensitive"].dynamic_activation == "int8" and plan.layers["sensitive"].weight.dtype == "int8"
