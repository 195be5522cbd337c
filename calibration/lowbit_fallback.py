"""--auto-fallback for low-bit plans: relax the most harmful low-bit layers to int8, then to float, until the
budget holds in a PyTorch simulation on calibration samples (never the validation samples) or the cap
(--fallback-max, a fraction of the low-bit layers) is reached.

Cheap by construction: the plan's codes (GPTQ's, RTN's, k-means') are reused as they are, never recomputed;
the simulation writes each layer's dequantized weight into one copy of the model and swaps weights in and out
between runs (no copy per candidate); each layer's sensitivity is one forward over a few samples with only that
layer quantized (its drift alone: 1 - mean cosine to FP32). Layers are relaxed worst first, each to int8 (per
channel: a quarter of float's size) while the budget still fails; when every layer within the cap is int8
and the budget still fails, they go on to float in the same order. The later layers keep the codes the
driver computed against their low-bit predecessors (a relaxed predecessor only makes their inputs closer to
FP32's).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgeq.calibration.collect import Sample, run_module
from edgeq.calibration.sensitivity import SWEEP_SAMPLES
from edgeq.compress.apply import user_fqn
from edgeq.plan import LayerPlan, QuantPlan
from edgeq.validate.budget import Budget
from edgeq.validate.drift import DriftReport, compare
from edgeq.validate.token_mask import token_masks


def is_lowbit(layer: LayerPlan) -> bool:
    """A layer a low-bit fallback may relax: a palette, or affine codes below 8 bits."""
    return layer.palette is not None or (layer.weight is not None and layer.weight.dtype.bits < 8)


def dequantized(layer: LayerPlan, shape: torch.Size) -> torch.Tensor:
    """The real weight a plan entry holds, float32 in the module's weight `shape`."""
    codes = np.asarray(layer.weight_codes)
    if layer.palette is not None:  # table g serves output channels g*gc .. (g+1)*gc - 1
        rows = codes.shape[0]
        tables = np.repeat(layer.palette, rows // layer.palette.shape[0], axis=0)
        values = np.take_along_axis(tables, codes.reshape(rows, -1).astype(np.int64), axis=1)
    else:
        values = layer.weight.dequantize(codes)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


class Simulation:
    """One copy of the model whose planned layers take, per run, either their FP32 weight or a plan entry's
    dequantized weight (with run-time activation quantization where the entry has it)."""

    def __init__(self, module: nn.Module, fqns: list[str]):
        from edgeq.compress.qdq import DynamicActivationQuant

        self.model = copy.deepcopy(module).eval()
        by_name = {user_fqn(name): child for name, child in self.model.named_modules()}
        self.layers = {fqn: by_name[fqn] for fqn in fqns}
        self.fp32 = {fqn: layer.weight.detach().clone() for fqn, layer in self.layers.items()}
        self.cache: dict[int, torch.Tensor] = {}
        self.dynamic: dict[str, nn.Module | None] = dict.fromkeys(fqns)
        self._quant = DynamicActivationQuant

        def hook(fqn):
            def quantize_input(_layer, args):
                quant = self.dynamic[fqn]
                return None if quant is None else (quant(args[0]), *args[1:])
            return quantize_input

        for fqn, layer in self.layers.items():
            layer.register_forward_pre_hook(hook(fqn))

    def set(self, entries: dict[str, LayerPlan]) -> None:
        """Planned layers named in `entries` take their quantized weights; every other layer its FP32 weight."""
        with torch.no_grad():
            for fqn, layer in self.layers.items():
                entry = entries.get(fqn)
                if entry is None or (entry.weight is None and entry.palette is None):
                    layer.weight.copy_(self.fp32[fqn])
                    self.dynamic[fqn] = None
                    continue
                key = id(entry)
                if key not in self.cache:
                    self.cache[key] = dequantized(entry, layer.weight.shape)
                layer.weight.copy_(self.cache[key])
                self.dynamic[fqn] = self._quant(entry.dynamic_activation) if entry.dynamic_activation is not None else None


@dataclass
class LowBitSensitivity:
    fqn: str
    scheme: str  # what the layer held when it was measured, e.g. "int4 group 32"
    cosine_alone: float  # mean cosine to FP32 with only this layer quantized

    def to_json(self) -> dict:
        return {"layer": self.fqn, "scheme": self.scheme, "cosine_only_this_quantized": round(self.cosine_alone, 6),
                "drift_alone": float(f"{1 - self.cosine_alone:.3g}")}


@dataclass
class LowBitFallback:
    plan: QuantPlan
    sweep: list[LowBitSensitivity]  # most harmful first
    relaxed: dict[str, str] = field(default_factory=dict)  # layer -> "int8" or "float", in the order relaxed
    holds: bool = False
    before: float = 0.0  # simulated mean cosine of the full plan
    after: float = 0.0  # ... and of the final plan
    cap: int = 0
    samples: int = 0
    seconds: float = 0.0  # the sweep and the relaxing, simulation included

    def to_json(self) -> dict:
        return {
            "relaxed_layers": list(self.relaxed),
            "relaxed_to": self.relaxed,
            "budget_holds_in_simulation": self.holds,
            "simulated_cosine_before": round(self.before, 6),
            "simulated_cosine_after": round(self.after, 6),
            "max_relaxed_layers": self.cap,
            "samples": f"{self.samples} held-out calibration samples (not used to fit the codes)",
            "sweep": [s.to_json() for s in self.sweep],
        }


def _described(layer: LayerPlan) -> str:
    if layer.palette is not None:
        return f"{int(layer.palette.shape[1]).bit_length() - 1}-bit palette"
    granularity = layer.weight.granularity.to_json()
    return f"{layer.weight.dtype.value} " + (f"group {granularity['size']}" if granularity["kind"] == "per_group" else "per channel")


def lowbit_fallback(
    module: nn.Module,
    plan: QuantPlan,
    samples: list[Sample],
    input_names: list[str],
    output_names: list[str],
    budget: Budget,
    max_fraction: float,
    int8_entry: Callable[[str, LayerPlan], LayerPlan],
) -> LowBitFallback:
    """Sweep the low-bit layers of `plan` (each alone), then relax the most harmful ones until `budget` holds
    in simulation: first to `int8_entry(fqn, entry)` (the target's int8 form of that layer), then to float,
    at most `max_fraction` of the low-bit layers. The returned plan is a copy; its relaxed layers' reasons say
    what they fell back to and the drift that was measured."""
    started = time.perf_counter()
    samples = samples[:SWEEP_SAMPLES]
    candidates = [fqn for fqn, layer in plan.layers.items() if is_lowbit(layer)]
    quantized = [fqn for fqn, layer in plan.layers.items() if not layer.is_float]
    simulation = Simulation(module, quantized)
    references = run_module(module, samples, input_names, output_names, "fallback: FP32 reference")
    masks = token_masks(samples, references, output_names)  # judged where the artifact's budget is: real tokens

    def drift(entries: dict[str, LayerPlan]) -> DriftReport:
        simulation.set(entries)
        outputs = run_module(simulation.model, samples, input_names, output_names, "fallback: simulating")
        return compare(references, outputs, output_names, "pytorch simulation", masks)

    def score(report: DriftReport) -> float:
        return float(np.mean([o.cosine for o in report.outputs]))

    full = drift(plan.layers)
    result = LowBitFallback(plan, [], before=score(full), after=score(full), cap=int(max_fraction * len(candidates)), samples=len(samples))
    result.holds = not budget.violations(full)
    if result.holds or result.cap == 0:
        result.seconds = time.perf_counter() - started
        return result
    for fqn in candidates:
        result.sweep.append(LowBitSensitivity(fqn, _described(plan.layers[fqn]), score(drift({fqn: plan.layers[fqn]}))))
    result.sweep.sort(key=lambda s: s.cosine_alone)
    current = copy.copy(plan)
    current.layers, current.notes = dict(plan.layers), list(plan.notes)
    chosen = result.sweep[: result.cap]
    steps = [(entry, "int8") for entry in chosen] + [(entry, "float") for entry in chosen]
    for entry, target in steps:
        old = plan.layers[entry.fqn]
        why = (f"--auto-fallback: {target} instead of {entry.scheme} (alone it cost {1 - entry.cosine_alone:.3g} of mean "
               f"cosine on {len(samples)} held-out calibration samples, rank {result.sweep.index(entry) + 1} of {len(candidates)})")
        if target == "int8":
            current.layers[entry.fqn] = int8_entry(entry.fqn, old)
            current.layers[entry.fqn].reason = why
        else:
            current.layers[entry.fqn] = LayerPlan(entry.fqn, old.op, reason=why + "; int8 did not hold the budget")
        result.relaxed[entry.fqn] = target
        report = drift(current.layers)
        result.after = score(report)
        if not budget.violations(report):
            result.holds = True
            break
    counts = {kind: sum(1 for k in result.relaxed.values() if k == kind) for kind in ("int8", "float")}
    current.notes.append(
        f"--auto-fallback relaxed {len(result.relaxed)} of {len(candidates)} low-bit layers ({counts['int8']} to int8, "
        f"{counts['float']} to float; simulated cosine {result.before:.5f} -> {result.after:.5f} on {len(samples)} "
        f"held-out calibration samples; budget {'holds' if result.holds else 'still broken'})"
    )
    result.plan = current
    result.seconds = time.perf_counter() - started
    current.seconds = {**plan.seconds, "fallback": round(result.seconds, 1)}
    return result
