"""The search's rules on measured figures written out by hand: the cheapest start, promotion by drift saved per
bit, the path ending when nothing gains, the front, and what a runtime miss asks of the next plan."""

from __future__ import annotations

from types import SimpleNamespace

from edgeq.tune.measure import LayerChoice, Measurements
from edgeq.tune.run import _required_cosine
from edgeq.tune.search import cheapest, front, greedy_path, promotion, sensitivity_rank, trim
from edgeq.validate.budget import parse_budget


def _measurements(layers: dict | None = None) -> Measurements:
    layers = layers or {
        # a sensitive layer: int4 costs it a lot, int8 almost nothing
        "a": {"int4": LayerChoice("int4", 100, 0.95, "int4"), "int8": LayerChoice("int8", 200, 0.9999, "int8"),
              "float": LayerChoice("float", 800, 1.0, "float")},
        # a robust, large one: promoting it buys little per bit
        "b": {"int4": LayerChoice("int4", 400, 0.998, "int4"), "int8": LayerChoice("int8", 800, 0.99995, "int8"),
              "float": LayerChoice("float", 3200, 1.0, "float")},
    }
    measurements = Measurements("int4-weight", ["int4", "int8", "float"], {}, layers, rest_bits=64)

    def simulate(entries):  # drift adds up here: the real search simulates the mix
        cosine = 1 - sum(1 - layers[fqn][value].cosine_alone for fqn, value in entries.items())
        return SimpleNamespace(outputs=[SimpleNamespace(name="y", cosine=cosine, value=lambda metric, c=cosine: c if metric == "cosine" else None,
                                                        positions=None)])

    measurements.simulate = simulate
    measurements.plan_entries = lambda assignment: dict(assignment)
    return measurements


def test_the_search_starts_cheapest_and_promotes_the_most_drift_per_bit_first():
    m = _measurements()
    assert cheapest(m) == {"a": "int4", "b": "int4"}
    assert promotion(m, {"a": "int4", "b": "int4"}) == ("a", "int8")  # 0.05 per 100 bits beats 0.002 per 400
    assert sensitivity_rank(m) == {"a": 1, "b": 2}
    steps = list(greedy_path(m, parse_budget("cosine>=0.999")))
    assert [s.promoted for s in steps[:3]] == [None, ("a", "int4", "int8"), ("b", "int4", "int8")]
    assert [s.holds for s in steps[:3]] == [False, False, True]
    assert steps[1].size_bits == 64 + 200 + 400 and steps[-1].assignment == {"a": "float", "b": "float"}
    assert all(later.size_bits > earlier.size_bits for earlier, later in zip(steps, steps[1:]))


def test_the_front_keeps_what_nothing_beats_on_both_size_and_drift():
    points = [(10, 0.05), (12, 0.01), (11, 0.06), (20, 0.01), (30, 0.0)]
    assert front(points) == [0, 1, 4]


def test_a_runtime_miss_asks_the_next_plan_to_clear_the_budget_by_the_runtimes_factor():
    budget = parse_budget("cosine>=0.99")
    # predicted 0.9917, measured 0.9815: the runtime drifts 2.2x the simulation, so the next needs <= 0.01 / 2.2
    assert abs(_required_cosine(0.9917, 0.9815, budget) - (1 - 0.01 / ((1 - 0.9815) / (1 - 0.9917)))) < 1e-9
    # a runtime that drifts less than simulated still asks for a tenth less drift than the plan that missed
    assert _required_cosine(0.995, 0.996, budget) == 1 - 0.9 * 0.005
    assert _required_cosine(0.999, 0.998, parse_budget("sqnr_db>=40")) == 1 - 0.0005  # other budgets: half the drift


def test_trim_demotes_what_a_later_promotion_made_unnecessary():
    layers = {
        # p is promoted first (the most drift per bit), q only after; once q is int8, p's int4 fits the budget again
        "p": {"int4": LayerChoice("int4", 100, 0.996, "int4"), "int8": LayerChoice("int8", 200, 1.0, "int8")},
        "q": {"int4": LayerChoice("int4", 1000, 0.98, "int4"), "int8": LayerChoice("int8", 2000, 1.0, "int8")},
    }
    m = _measurements(layers)
    budget = parse_budget("cosine>=0.99")
    steps = list(greedy_path(m, budget))
    held = next(s for s in steps if s.holds)
    assert held.assignment == {"p": "int8", "q": "int8"}
    trimmed = trim(m, held, budget)
    assert trimmed.assignment == {"p": "int4", "q": "int8"} and trimmed.holds
    assert trimmed.demoted == [("p", "int8", "int4")] and trimmed.size_bits == held.size_bits - 100
    assert trim(m, held, budget, required=0.999).assignment == held.assignment  # a stricter prediction keeps it
