"""The search over per-layer choices: start from the cheapest choice of every layer and promote, one layer at a
time, the one whose measured drift falls most per bit it adds, until the budget holds in simulation.

Each step's whole assignment is simulated (one forward over the held-out calibration samples): a layer's drift
alone ranks the promotions, the simulation of the mix decides whether the budget holds (drifts do not simply
add up). The steps form a front of size against predicted drift; the first step that holds is trimmed (layers
demoted back while the mix still holds: greedy promotion overshoots) and converted; when the runtime disagrees,
the caller asks for a step whose prediction clears the budget by the factor the runtime drifted more.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgeq.tune.measure import Measurements


@dataclass
class Step:
    index: int
    assignment: dict[str, str]  # layer -> choice
    size_bits: int  # predicted weight storage (footprint of the measured entries + everything else)
    cosine: float  # predicted mean cosine to FP32 (simulation on held-out calibration samples)
    holds: bool  # the budget holds in the simulation
    violations: list[str] = field(default_factory=list)
    promoted: tuple[str, str, str] | None = None  # (layer, from, to)
    demoted: list[tuple[str, str, str]] = field(default_factory=list)  # trim: (layer, from, to) kept

    @property
    def size_bytes(self) -> int:
        return -(-self.size_bits // 8)

    def to_json(self) -> dict:
        return {
            "step": self.index, "predicted_size_bytes": self.size_bytes, "predicted_cosine": round(self.cosine, 6),
            "predicted_holds": self.holds,
            "promoted": None if self.promoted is None else dict(zip(("layer", "from", "to"), self.promoted)),
            **({"trimmed": [dict(zip(("layer", "from", "to"), d)) for d in self.demoted]} if self.demoted else {}),
        }


def cheapest(measurements: Measurements) -> dict[str, str]:
    """Every layer at its smallest choice (ties: the one with less drift)."""
    return {fqn: min(choices.values(), key=lambda c: (c.bits, c.drift_alone)).value for fqn, choices in measurements.layers.items()}


def promotion(measurements: Measurements, assignment: dict[str, str]) -> tuple[str, str] | None:
    """(layer, choice) whose drift alone falls most per bit added, over every layer and every larger choice with
    less drift; None when no layer can gain."""
    best, found = -1.0, None
    for fqn, choices in measurements.layers.items():
        current = choices[assignment[fqn]]
        for choice in choices.values():
            added = choice.bits - current.bits
            gained = current.drift_alone - choice.drift_alone
            if added <= 0 or gained <= 0:
                continue
            if gained / added > best:
                best, found = gained / added, (fqn, choice.value)
    return found


def greedy_path(measurements: Measurements, budget) -> Iterator[Step]:
    """The steps from the cheapest assignment up, each simulated; ends when no promotion gains."""
    assignment = cheapest(measurements)
    promoted, index = None, 0
    while True:
        yield _simulated(measurements, assignment, budget, index, promoted)
        found = promotion(measurements, assignment)
        if found is None:
            return
        fqn, value = found
        promoted, index = (fqn, assignment[fqn], value), index + 1
        assignment[fqn] = value


def _simulated(measurements: Measurements, assignment: dict[str, str], budget, index: int, promoted=None) -> Step:
    report = measurements.simulate(measurements.plan_entries(assignment))
    violations = budget.violations(report)
    cosine = float(np.mean([o.cosine for o in report.outputs]))
    return Step(index, dict(assignment), measurements.size_bits(assignment), cosine, not violations, violations, promoted)


def trim(measurements: Measurements, step: Step, budget, required: float = -np.inf) -> Step:
    """`step` with layers demoted back where the mix still holds in simulation (and clears `required`): the
    greedy path overshoots, since a layer promoted early may not be needed once a later, larger promotion
    lands. Demotions are tried least drift added per bit saved first, each simulated, at most two per layer."""
    assignment, best = dict(step.assignment), step
    tries = []
    for fqn, value in step.assignment.items():
        now = measurements.layers[fqn][value]
        for choice in measurements.layers[fqn].values():
            saved = now.bits - choice.bits
            if saved > 0:
                tries.append((max(choice.drift_alone - now.drift_alone, 0.0) / saved, fqn, choice.value))
    tries.sort()
    for _, fqn, value in tries[: 2 * len(assignment)]:
        choices = measurements.layers[fqn]
        if choices[value].bits >= choices[assignment[fqn]].bits:  # already demoted as far
            continue
        trial = _simulated(measurements, {**assignment, fqn: value}, budget, step.index, step.promoted)
        if trial.holds and trial.cosine >= required:
            trial.demoted = [*best.demoted, (fqn, assignment[fqn], value)]
            assignment, best = trial.assignment, trial
    return best


def front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, drift) points no other point beats on both (lower is better on both)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    kept, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            kept.append(i)
            best = points[i][1]
    return kept


def sensitivity_rank(measurements: Measurements) -> dict[str, int]:
    """1 for the layer whose cheapest choice drifts most alone, and so on."""
    start = cheapest(measurements)
    order = sorted(measurements.layers, key=lambda fqn: -measurements.layers[fqn][start[fqn]].drift_alone)
    return {fqn: rank + 1 for rank, fqn in enumerate(order)}
