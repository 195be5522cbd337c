"""ONNX static (w8a8, w8a16) and SmoothQuant'd dynamic int8: calibrated in PyTorch, exact in the artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.load import load_model
from edgeq.pipeline import ConvertOptions, convert
from edgeq.plan import QuantPlan
from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

pytestmark = ONNX


def _convert(source, target, precision, out, **options):
    model = load_model(source)
    (outcome,) = convert(model, ConvertOptions(targets=[target], out=out, precisions=[precision], samples=8, **options))
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    return outcome, json.loads((outcome.path / "manifest.json").read_text())


@pytest.mark.parametrize(("target", "precision"), [("onnx", "w8a8"), ("onnx-x86-avx2", "w8a8"), ("onnx-qnn-htp", "w8a16")])
def test_convnet_static_quantization_validates_with_exact_numbers(tmp_path, target, precision):
    outcome, manifest = _convert("edgeq.examples:tiny_convnet", target, precision, tmp_path)
    assert outcome.report.outputs[0].sqnr_db >= 25  # the bar for a test convnet at w8a8
    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == 4 and parity["mismatches"] == [] and parity["missing"] == []
    plan = QuantPlan.load(outcome.path)
    assert any("BatchNorm folded" in note for note in plan.notes)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(outcome.path / "model.onnx")).graph
    stored = {numpy_helper.to_array(i).tobytes() for i in graph.initializer if not i.dims}
    for layer in plan.quantized():  # every activation scale reaches a QuantizeLinear bit for bit
        assert np.asarray(layer.activation.scale, np.float32).tobytes() in stored, layer.fqn
    quantize_ops = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_ops) >= 4


def test_dynamic_int8_keeps_accuracy_and_records_where_smoothquant_pays(tmp_path):
    outcome, manifest = _convert("edgeq.examples:tiny_mlp", "onnx-x86-avx2", "int8-dynamic", tmp_path)
    plan = QuantPlan.load(outcome.path)
    # each linear's smoothing decision with its measured errors (calibration/smoothquant_select.py)
    note = next(note for note in plan.notes if note.startswith("SmoothQuant kept on"))
    assert all(layer.fqn in note for layer in plan.quantized())
    assert outcome.report.outputs[0].cosine >= 0.999
    assert manifest["weight_parity"]["mismatches"] == []


def test_smoothquant_off_and_observer_choice_reach_the_plan(tmp_path):
    from edgeq.quantize import QuantizeOptions

    options = dict(quantize=QuantizeOptions(observer="minmax", no_smoothquant=True, calibration_samples=8))
    outcome, _ = _convert("edgeq.examples:tiny_mlp", "onnx", "w8a8", tmp_path, **options)
    plan = QuantPlan.load(outcome.path)
    assert all(layer.smooth is None for layer in plan.quantized())
    assert any("minmax ranges from 8 calibration samples" in note for note in plan.notes)
