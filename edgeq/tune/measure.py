"""What each per-layer choice costs and gives, measured once per target before any search:

  size       the layer's weight in real bits as the target's runtime stores it (edgeq/footprint.py: codes in
             their containers, scales, zero points, tables), read from the choice's own plan
  drift      the model output's drift with only that layer at that choice and every other layer FP32: one
             forward over held-out calibration samples (never the validation samples), 1 - mean cosine

Each choice's plan is made by the resolve machinery itself (edgeq.quantize.quantization_plan with the
per_layer entry `"*" = CHOICE`): a choice the target cannot hold is refused there, and its reason kept; the
codes are the algorithm's (GPTQ, RTN, k-means) on the calibration samples. The simulation that swaps each
layer's dequantized weight in and out is --auto-fallback's (calibration/lowbit_fallback.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from edgeq.errors import ConversionError, UsageError

FLOAT = "float"


@dataclass
class LayerChoice:
    value: str  # the per_layer value, e.g. "int4:g32"
    bits: int  # the layer's weight as the runtime stores it
    cosine_alone: float  # mean cosine to FP32 with only this layer at this choice
    form: str  # what the plan made of it, e.g. "int4 group 32"

    @property
    def drift_alone(self) -> float:
        return max(0.0, 1.0 - self.cosine_alone)


@dataclass
class Measurements:
    precision: str
    choices: list[str]  # held by the target, in the order given
    excluded: dict[str, str]  # choice -> why the target or the algorithms refuse it
    layers: dict[str, dict[str, LayerChoice]]  # tuned layer -> choice -> its figures
    rest_bits: int  # every parameter the search does not decide (biases, norms, layers no choice quantizes)
    entries: dict[str, dict[str, object]] = field(repr=False, default_factory=dict)  # layer -> choice -> LayerPlan
    simulate: object = field(repr=False, default=None)  # entries -> DriftReport (held-out calibration samples)
    samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # tuned layer -> its weight's elements (bits per weight)

    def size_bits(self, assignment: dict[str, str]) -> int:
        return self.rest_bits + sum(self.layers[fqn][value].bits for fqn, value in assignment.items())

    def plan_entries(self, assignment: dict[str, str]) -> dict:
        return {fqn: self.entries[fqn][value] for fqn, value in assignment.items()}


def describe_entry(entry) -> str:
    if entry.is_float:
        return "float"
    if entry.palette is not None:
        return f"{int(entry.palette.shape[1]).bit_length() - 1}-bit palette"
    granularity = entry.weight.granularity.to_json()
    return f"{entry.weight.dtype.value} " + (f"group {granularity['size']}" if granularity["kind"] == "per_group" else "per channel")


def measure(model, profile, precision, quantize, keep_float: list[str], fitted: list, held_out: list, choices: list[str],
            on_step=lambda _: None) -> Measurements:
    """Plan every choice for every layer (`fitted` calibration samples), then each layer's drift alone at each
    choice on `held_out`. `quantize`: the job's QuantizeOptions (algorithm, group size, device)."""
    from edgeq.calibration.collect import run_module
    from edgeq.calibration.lowbit_fallback import Simulation
    from edgeq.footprint import float_bits_of, weight_storage
    from edgeq.layer_overrides import parse_per_layer
    from edgeq.plan import LayerPlan
    from edgeq.quantize import quantization_plan
    from edgeq.targets import Precision
    from edgeq.validate.budget import Budget
    from edgeq.validate.drift import compare
    from edgeq.validate.token_mask import token_masks

    started = time.perf_counter()
    float_bits = float_bits_of(profile.runtime.value, precision)
    plans, excluded, module, storages = {}, {}, None, {}
    for value in choices:
        if value == FLOAT:
            continue
        on_step(f"{profile.id}: planning every layer at {value}")
        options = dataclasses.replace(quantize, layer_overrides=parse_per_layer({"*": value}, f"edgeq tune choice {value!r}"),
                                      auto_fallback=False)
        try:
            converted, plan, _ = quantization_plan(model, profile, Precision(precision), options, list(keep_float), list(fitted), Budget(()))
        except ConversionError as exc:  # the target or the algorithm cannot hold it: say why, try the others
            excluded[value] = str(exc)
            continue
        module = module if module is not None else converted.module
        plans[value] = plan
        storages[value] = {row.name: row for row in weight_storage(converted.module, plan, profile.runtime.value, float_bits).layers}
    if not plans:
        raise ConversionError(f"target {profile.id}: none of the choices {', '.join(choices)} is held: "
                              + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    held = [c for c in choices if c == FLOAT or c in plans]
    tuned = [fqn for fqn in next(iter(plans.values())).layers if any(not p.layers[fqn].is_float for p in plans.values() if fqn in p.layers)]
    if len(held) < 2 or not tuned:
        raise UsageError(f"target {profile.id}: {precision} leaves nothing to choose (choices held: {', '.join(held)}; "
                         f"layers they quantize: {len(tuned)}); give other --choices or another --precision")
    any_rows = next(iter(storages.values()))
    rest_bits = sum(row.bits for name, row in any_rows.items() if name not in tuned)
    seconds = {"plans": round(time.perf_counter() - started, 1)}

    started = time.perf_counter()
    on_step(f"{profile.id}: each layer's drift alone at each choice on {len(held_out)} held-out calibration samples")
    simulation = Simulation(module, tuned)
    names, outputs = model.input_names, model.outputs
    references = run_module(module, held_out, names, outputs, "tune: FP32 reference")
    masks = token_masks(held_out, references, outputs)

    def simulate(entries: dict):
        simulation.set(entries)
        return compare(references, run_module(simulation.model, held_out, names, outputs, "tune: simulating"), outputs, "pytorch simulation", masks)

    layers: dict[str, dict[str, LayerChoice]] = {}
    entries: dict[str, dict[str, object]] = {}
    weights: dict[str, int] = {}
    for fqn in tuned:
        layers[fqn], entries[fqn] = {}, {}
        elements = max(storages[v][fqn].weights for v in plans if fqn in storages[v])
        weights[fqn] = elements
        for value in held:
            if value == FLOAT:
                entry = LayerPlan(fqn, next(p.layers[fqn].op for p in plans.values() if fqn in p.layers), reason="kept float by edgeq tune")
                layers[fqn][value] = LayerChoice(value, elements * float_bits, 1.0, "float")
                entries[fqn][value] = entry
                continue
            entry = plans[value].layers.get(fqn)
            if entry is None or entry.is_float:  # this layer cannot take it (e.g. a width no group divides)
                continue
            report = simulate({fqn: entry})
            cosine = float(np.mean([o.cosine for o in report.outputs]))
            layers[fqn][value] = LayerChoice(value, storages[value][fqn].bits, cosine, describe_entry(entry))
            entries[fqn][value] = entry
    seconds["sensitivity"] = round(time.perf_counter() - started, 1)
    return Measurements(precision, held, excluded, layers, rest_bits, entries, simulate, len(held_out), seconds, weights)
