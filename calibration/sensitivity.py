"""Sensitivity sweep and fallback: one bad layer must not sink a whole artifact.

The sweep simulates the plan in PyTorch (run-time activation quantization included) on calibration samples,
never on the validation samples the artifact is judged on. For every layer with quantized activations it
measures the plan with that layer alone quantized and with all layers but that one. The fallback then
relaxes the layers whose removal helps most, one at a time, until the budget holds or the cap on relaxed
layers is reached. Relaxed means one step up in precision: where the target runs static layers as integer
islands and has a fast run-time-quantized kernel (TFLite: the hybrid FULLY_CONNECTED), a static layer's input
is quantized per call instead (int8 weights and speed kept, no static output range); elsewhere activations
back to float with the int8 weights kept (so the size barely moves); for weight-only plans, the layer back to float.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from edgeq.calibration.collect import Sample, run_module
from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.apply import apply_plan, quantizable_layers
from edgeq.compress.qdq import WeightForm, keep_dequantized
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.validate.budget import Budget
from edgeq.validate.drift import DriftReport, compare
from edgeq.validate.token_mask import token_masks

SWEEP_SAMPLES = 16  # enough to rank layers; the sweep costs 2 forward passes per layer over these


@dataclass
class LayerSensitivity:
    fqn: str
    alone: float  # mean cosine vs FP32 with only this layer quantized (lower: more sensitive)
    all_but: float  # mean cosine vs FP32 with every layer but this one quantized (higher: more sensitive)

    def to_json(self) -> dict:
        return {"layer": self.fqn, "cosine_only_this_quantized": round(self.alone, 6), "cosine_all_but_this": round(self.all_but, 6)}


@dataclass
class Fallback:
    plan: QuantPlan
    sweep: list[LayerSensitivity]  # most sensitive first
    relaxed: list[str] = field(default_factory=list)
    holds: bool = False  # the budget holds in simulation with the relaxed layers
    before: float = 0.0  # simulated mean cosine of the full plan
    after: float = 0.0  # ... and of the final plan
    cap: int = 0

    def to_json(self) -> dict:
        return {
            "relaxed_layers": self.relaxed,
            "budget_holds_in_simulation": self.holds,
            "simulated_cosine_before": round(self.before, 6),
            "simulated_cosine_after": round(self.after, 6),
            "max_relaxed_layers": self.cap,
            "samples": "calibration",
            "sweep": [s.to_json() for s in self.sweep],
        }


def relaxable(layer: LayerPlan) -> bool:
    return layer.activation is not None or layer.dynamic_activation is not None or layer.weight is not None


def relax(layer: LayerPlan, module: nn.Module, scale_dtype: str, dynamic: QDtype | None = None) -> LayerPlan:
    """The layer one step up in precision: with `dynamic` (the target's run-time activation type), a static layer
    quantizes its input per call instead (same smoothed weight codes, no static input/output ranges); otherwise
    float activations with plain int8 weights, or float altogether."""
    if layer.activation is None and layer.dynamic_activation is None:
        return LayerPlan(layer.fqn, layer.op, reason="kept float by --auto-fallback (sensitivity sweep)")
    if dynamic is not None and layer.activation is not None and layer.op == OpKind.LINEAR:
        # The static bias correction answered the static ranges' error, so it goes with them.
        return LayerPlan(layer.fqn, layer.op, layer.weight, layer.weight_codes, dynamic_activation=dynamic,
                         smooth=layer.smooth, reason="activations quantized per call by --auto-fallback (sensitivity sweep)")
    quant, codes = quantize_weight_per_channel(module.weight, QDtype.INT8, 0, scale_dtype)  # no SmoothQuant: nothing to smooth for
    return LayerPlan(layer.fqn, layer.op, quant, codes, reason="activations kept float by --auto-fallback (sensitivity sweep)")


def simulate(module: nn.Module, plan: QuantPlan, samples: list[Sample], input_names: list[str], output_names: list[str]) -> list[dict]:
    """Outputs of `plan` applied to `module` in PyTorch, run-time activation quantization included."""
    quantized = keep_dequantized(apply_plan(module, plan, WeightForm.CODES, simulate_dynamic=True))
    return run_module(quantized, samples, input_names, output_names, "sensitivity: simulating")


def sensitivity_fallback(
    module: nn.Module,
    plan: QuantPlan,
    samples: list[Sample],
    input_names: list[str],
    output_names: list[str],
    budget: Budget,
    max_fraction: float,
    scale_dtype: str,
    dynamic: QDtype | None = None,
) -> Fallback:
    """Sweep, then relax the most sensitive layers until `budget` holds in simulation (at most max_fraction of them).
    `dynamic`: the run-time activation type static layers relax to (targets.resolve.dynamic_fallback); None: float."""
    samples = samples[:SWEEP_SAMPLES]
    references = run_module(module, samples, input_names, output_names, "sensitivity: FP32 reference")
    modules = dict(quantizable_layers(module))
    masks = token_masks(samples, references, output_names)  # judged where the artifact's budget is: real tokens

    def drift(candidate: QuantPlan) -> DriftReport:
        outputs = simulate(module, candidate, samples, input_names, output_names)
        return compare(references, outputs, output_names, "pytorch simulation", masks)

    def score(report: DriftReport) -> float:
        return float(np.mean([o.cosine for o in report.outputs]))

    candidates = [fqn for fqn, layer in plan.layers.items() if not layer.is_float and relaxable(layer)]
    full = drift(plan)
    result = Fallback(plan, [], before=score(full), after=score(full), cap=int(max_fraction * len(candidates)))
    result.holds = not budget.violations(full)
    if result.holds or result.cap == 0:
        return result
    for fqn in candidates:
        only = QuantPlan(plan.scheme, plan.target, {fqn: plan.layers[fqn]})
        all_but = copy.copy(plan)
        all_but.layers = {**plan.layers, fqn: relax(plan.layers[fqn], modules[fqn], scale_dtype, dynamic)}
        result.sweep.append(LayerSensitivity(fqn, score(drift(only)), score(drift(all_but))))
    result.sweep.sort(key=lambda s: (-s.all_but, s.alone))
    current = copy.deepcopy(plan)
    for entry in result.sweep[: result.cap]:
        current.layers[entry.fqn] = relax(current.layers[entry.fqn], modules[entry.fqn], scale_dtype, dynamic)
        result.relaxed.append(entry.fqn)
        report = drift(current)
        result.after = score(report)
        if not budget.violations(report):
            result.holds = True
            break
    current.notes.append(
        f"--auto-fallback relaxed {len(result.relaxed)} of {len(candidates)} layers "
        f"(simulated cosine {result.before:.5f} -> {result.after:.5f}; budget {'holds' if result.holds else 'still broken'})"
    )
    result.plan = current
    return result
