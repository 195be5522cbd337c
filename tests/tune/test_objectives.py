"""--objective size | latency | balanced: the chosen point minimizes the objective's key among the candidates that
hold the budget, latency measured interleaved in the runtime where it runs here (ONNX Runtime) and estimated
by the profile's cost model where it does not (Core ML off macOS), each figure labelled with its source."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.footprint import LayerStorage, WeightStorage
from edgeq.tune.cost import COST_MODELS, LayerWork, estimate_ms
from edgeq.tune.options import Objective
from edgeq.tune.run import Candidate, _ranking
from tests.conftest import COREML, ONNX

SOURCE = "tests.tune.tiny:build"
SMALL = ["--samples", "8", "--calibration-samples", "16", "--name", "tiny"]


def _candidate(label: str, size_bytes: int, latency_ms: float) -> Candidate:
    outcome = SimpleNamespace(size_bytes=size_bytes, verdict=SimpleNamespace(value="passed"), report=None)
    return Candidate(label, "uniform", "int8-weight", None, None, outcome, 0.0, latency_ms=latency_ms, latency_source="measured")


@pytest.mark.parametrize("objective, label", [(Objective.SIZE, "small"), (Objective.LATENCY, "fast"), (Objective.BALANCED, "middle")])
def test_each_objective_picks_its_own_point(objective, label):
    # small: 1.0 x 3.0 = 3.0; fast: 3.0 x 1.0 = 3.0; middle: 1.5 x 1.5 = 2.25 (size and latency relative to the best)
    passing = [_candidate("small", 1000, 3.0), _candidate("fast", 3000, 1.0), _candidate("middle", 1500, 1.5)]
    assert min(passing, key=_ranking(passing, objective)).label == label


def test_latency_counts_medians_within_a_tenth_as_one_speed_and_takes_the_smaller():
    passing = [_candidate("fastest", 3000, 1.0), _candidate("as fast, smaller", 1000, 1.08), _candidate("slower", 500, 1.2)]
    assert min(passing, key=_ranking(passing, Objective.LATENCY)).label == "as fast, smaller"


def _storage(dtype: str, bits_per_weight: float, weights: int = 4096) -> WeightStorage:
    layer = LayerStorage("fc", "linear", dtype, 8, weights, int(bits_per_weight * weights))
    return WeightStorage("coreml", 16, (layer,))


def test_the_cost_model_counts_what_each_compute_unit_reads():
    work = {"fc": LayerWork(macs=4096, read_share=1.0)}  # batch 1: reading the weight dominates
    ane, cpu, generic = COST_MODELS["coreml-ane"], COST_MODELS["coreml-cpu"], COST_MODELS["coreml"]
    # the Neural Engine decompresses palettes and int8 just in time: fewer stored bits, less time
    assert estimate_ms(_storage("lut4", 4), work, ane) < estimate_ms(_storage("int8", 8), work, ane) < estimate_ms(_storage("float16", 16), work, ane)
    # the CPU decompresses every format at load: compression buys no speed there
    assert estimate_ms(_storage("lut4", 4), work, cpu) == estimate_ms(_storage("int8", 8), work, cpu) == estimate_ms(_storage("float16", 16), work, cpu)
    # per-block int4 is no ANE format: all compute units read it decompressed, slower than int8 read as stored
    assert estimate_ms(_storage("int4", 4.5), work, generic) > estimate_ms(_storage("int8", 8), work, generic)
    # a layer with more work than its weight's bytes is compute-bound
    heavy = {"fc": LayerWork(macs=10**9, read_share=1.0)}
    assert estimate_ms(_storage("int8", 8), heavy, ane) == pytest.approx(2 * 10**9 / (ane.peak_tflops * 1e12) * 1e3)
    assert "estimated, not measured" in ane.describe()


def _tune(tmp_path, target: str, objective: str, uniform: str) -> dict:
    result = CliRunner().invoke(main, ["tune", SOURCE, "-t", target, "--budget", "cosine>=0.99", "--objective", objective,
                                       "-o", str(tmp_path), "--uniform", uniform, *SMALL])
    assert result.exit_code == 0, result.output
    assert f"chosen by {objective}:" in result.output
    report = json.loads((tmp_path / "tiny" / "tune.json").read_text())
    assert report["objective"] == objective
    (target_json,) = report["targets"]
    assert target_json["chosen_by"] == objective
    return target_json


@COREML
def test_latency_on_core_ml_is_estimated_and_changes_the_choice(tmp_path):
    target = _tune(tmp_path, "coreml", "latency", "int8-weight")
    passing = [c for c in target["candidates"] if c["verdict"] == "passed"]
    assert len(passing) >= 2 and all(c["latency_source"] == "estimated" for c in target["candidates"] if c["size_bytes"])
    assert target["latency_method"].startswith("estimated, not measured: roofline of")
    fastest = min(passing, key=lambda c: (c["latency_ms"], c["size_bytes"]))
    smallest = min(passing, key=lambda c: c["size_bytes"])
    assert target["chosen"]["label"] == fastest["label"] and fastest["label"] in target["front_with_latency"]
    # the smallest plan holding the budget has int4 groups, which every Core ML unit reads decompressed (fp16):
    # uniform int8, read as stored, is estimated faster, so the latency objective picks another point than size would
    assert smallest["kind"] == "tuned" and fastest["label"] == "int8-weight"
    markdown = (tmp_path / "tiny" / "tune.md").read_text()
    assert "Chosen by latency." in markdown and "ms (estimated)" in markdown
    assert "The chosen point is the uniform scheme int8-weight" in markdown


@ONNX
def test_balanced_on_onnx_times_the_passing_candidates_together(tmp_path):
    target = _tune(tmp_path, "onnx", "balanced", "int8-weight,int8-dynamic")
    passing = [c for c in target["candidates"] if c["verdict"] == "passed"]
    assert len(passing) >= 2
    # timed again round by round beside each other, not read from validations minutes apart
    assert all(c["latency_source"].startswith("measured on this machine (1 thread, warm, interleaved with") for c in passing)
    assert target["latency_method"].startswith("measured in onnx on this machine")
    smallest, fastest = min(c["size_bytes"] for c in passing), min(c["latency_ms"] for c in passing)

    def product(c):
        return c["size_bytes"] / smallest * c["latency_ms"] / fastest

    assert product(target["chosen"]) <= min(product(c) for c in passing) * (1 + 1e-6)
    assert target["chosen"]["label"] in target["front_with_latency"]  # no candidate beats it on size, latency and drift
