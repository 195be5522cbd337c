"""The model zoo: every architecture converts at fp32, fp16, int8-weight and w8a8 to onnx, tflite and coreml and
validates in the runtime, or is refused with a message naming the target (and op and module where one is at
fault). One convert call per (architecture, runtime) covers the four schemes; 2 validation and 8 calibration
samples keep the whole zoo within minutes.

Each run's cells are held to tests/zoo/matrix.json, which the README's zoo table is rendered from: a cell that
starts passing or starts failing fails here until the matrix is recorded again with
`EDGEQ_ZOO_RECORD=1 .venv/bin/python -m pytest tests/zoo` (then `python tools/readme_zoo.py --write`).
"""

from __future__ import annotations

import importlib
import inspect
import os

import pytest

from tests.conftest import COREML, ONNX, TFLITE
from tests.zoo.matrix import FAILS, PASS, REFUSED, RUNTIMES, SCHEMES, ZOO, cell_of, load_matrix, record_cells, same_cell

RECORD = os.environ.get("EDGEQ_ZOO_RECORD", "") == "1"
ZOO_MODULES = ("tests.zoo.vision", "tests.zoo.sequence", "tests.zoo.huggingface")
NEEDS = {"onnx": ONNX, "tflite": TFLITE, "coreml": COREML}


def _convert(source, runtime, out):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    model = load_model(source)
    # minmax ranges: the MSE search costs more than the whole conversion of a model this small. 8 calibration
    # samples, not 2: with 2 the GRU's static ranges missed its validation inputs' (w8a8 cosine 0.974, 0.995
    # with 8; a forward of these models costs milliseconds).
    options = ConvertOptions(targets=[runtime], out=out, precisions=list(SCHEMES), samples=2,
                             quantize=QuantizeOptions(calibration_samples=8, observer="minmax"))
    return convert(model, options)


@pytest.fixture
def one_timed_run(monkeypatch):
    """Latency is not what the zoo checks: one timed run instead of a second's worth per artifact (that second
    was a third of the zoo's time). The artifact still runs on every validation sample in its runtime."""
    from edgeq.validate import check, latency

    monkeypatch.setattr(check, "measure_runner", lambda runner, sample, **_: latency.measure_runner(
        runner, sample, warmup=0, min_runs=1, max_runs=1, target_s=0.0))


@pytest.mark.parametrize("runtime", [pytest.param(r, marks=NEEDS[r]) for r in RUNTIMES])
@pytest.mark.parametrize("architecture", list(ZOO))
def test_zoo(tmp_path, one_timed_run, architecture, runtime):
    outcomes = _convert(ZOO[architecture], runtime, tmp_path)
    cells = {o.precision: cell_of(o) for o in outcomes}
    assert sorted(cells) == sorted(SCHEMES)
    for scheme, cell in cells.items():
        if cell["outcome"] != PASS:
            assert f"target {runtime}" in cell["reason"] or "over budget" in cell["reason"] or runtime in cell["reason"], (
                f"{architecture} {runtime} {scheme}: the message does not name the target: {cell['reason']}"
            )
    if RECORD:
        record_cells(architecture, runtime, cells)
        return
    recorded = load_matrix().get(architecture, {}).get(runtime, {})
    changed = [
        f"{scheme}: recorded {recorded.get(scheme, {}).get('outcome', 'nothing')} ({recorded.get(scheme, {}).get('reason', '')}), "
        f"now {cell['outcome']} ({cell['reason']})"
        for scheme, cell in cells.items() if not same_cell(recorded.get(scheme, {}), cell)
    ]
    assert not changed, (
        f"{architecture} on {runtime} differs from tests/zoo/matrix.json (the README's zoo table):\n  " + "\n  ".join(changed)
        + "\nre-record with EDGEQ_ZOO_RECORD=1 .venv/bin/python -m pytest tests/zoo, then python tools/readme_zoo.py --write"
    )


def test_every_zoo_factory_has_a_test_entry():
    """A model added to tests/zoo/*.py without a ZOO entry (or an entry naming a missing factory) fails here."""
    factories = set()
    for name in ZOO_MODULES:
        module = importlib.import_module(name)
        factories |= {
            f"{name}:{attr}" for attr, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == name and not attr.startswith("_")
        }
    assert factories == set(ZOO.values()), {"without an entry": factories - set(ZOO.values()), "missing": set(ZOO.values()) - factories}


def test_the_matrix_covers_every_cell_and_fp32_fp16_failures_are_the_recorded_ones():
    """matrix.json has a cell for every architecture, runtime and scheme, each pass, refused or fails."""
    matrix = load_matrix()
    for architecture in ZOO:
        for runtime in RUNTIMES:
            cells = matrix.get(architecture, {}).get(runtime, {})
            assert sorted(cells) == sorted(SCHEMES), f"{architecture} {runtime}: re-record tests/zoo/matrix.json"
            for scheme, cell in cells.items():
                assert cell["outcome"] in (PASS, REFUSED, FAILS)
                assert (cell["outcome"] == PASS) == (cell["reason"] == ""), (architecture, runtime, scheme, cell)
