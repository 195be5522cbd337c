"""Every converter on small models built in code: convert, validate in the real runtime, check the bundle."""

from __future__ import annotations

import json

import pytest

from edgeq.validate.verdict import Verdict
from tests.conftest import COREML, ONNX, TFLITE
from tests.helpers import convert_source

SMALL_MODELS = ["edgeq.examples:tiny_convnet", "edgeq.examples:tiny_mlp"]
# Minimum mean cosine and SQNR against FP32 PyTorch, per precision: FP32 conversion is a graph rewrite,
# FP16 keeps ~3 significant digits.
FLOOR = {"fp32": (0.99999, 60.0), "fp16": (0.999, 30.0)}


def _check_validated(outcome, precision):
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    cosine, sqnr = FLOOR[precision]
    for drift in outcome.report.outputs:
        assert drift.cosine >= cosine and drift.sqnr_db >= sqnr, drift
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["validation"]["status"] == "validated"
    assert manifest["precision"] == precision
    assert manifest["signature"]["inputs"], "the artifact's own signature is recorded"
    return manifest


@ONNX
@pytest.mark.parametrize("source", SMALL_MODELS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_converts_and_validates(tmp_path, source, precision):
    outcome = convert_source(source, "onnx", precision, tmp_path)
    manifest = _check_validated(outcome, precision)
    assert manifest["versions"]["onnx"] and "onnxruntime" in manifest["versions"]["runtime"]


@TFLITE
@pytest.mark.parametrize("source", SMALL_MODELS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tflite_converts_and_validates(tmp_path, source, precision):
    outcome = convert_source(source, "tflite", precision, tmp_path)
    manifest = _check_validated(outcome, precision)
    assert manifest["versions"]["litert-torch"]
    # The artifact keeps the declared (NCHW for the convnet) layout and the model's input names.
    assert [i["shape"] for i in manifest["signature"]["inputs"]] == [
        i["shape"] for i in manifest["signature"]["declared_inputs"]
    ]


@TFLITE
def test_tflite_fp16_halves_the_weights(tmp_path):
    fp32 = convert_source("edgeq.examples:tiny_convnet", "tflite", "fp32", tmp_path)
    fp16 = convert_source("edgeq.examples:tiny_convnet", "tflite", "fp16", tmp_path)
    assert fp16.size_bytes < 0.8 * fp32.size_bytes


@COREML
@pytest.mark.parametrize("source", SMALL_MODELS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_coreml_converts_with_an_honest_validation_status(tmp_path, source, precision):
    import platform

    outcome = convert_source(source, "coreml", precision, tmp_path)
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert (outcome.path / "model.mlpackage" / "Manifest.json").is_file()
    assert manifest["signature"]["inputs"][0]["name"] == manifest["signature"]["declared_inputs"][0]["name"]
    assert manifest["versions"]["coremltools"]
    _check_validated(outcome, precision)
    executor = manifest["validation"]["executor"]
    if platform.system() != "Darwin":  # no MLModel.predict: edgeq's MIL reference executor ran it, and says so
        assert executor.startswith("edgeq MIL reference executor") and "not Apple's Core ML runtime" in executor
        assert manifest["budget"]["verdict"] == "passed"


@COREML
def test_coreml_precision_sets_the_compute_precision(tmp_path):
    import coremltools as ct

    types = {}
    for precision in ("fp32", "fp16"):
        outcome = convert_source("edgeq.examples:tiny_mlp", "coreml", precision, tmp_path)
        program = ct.utils.load_spec(str(outcome.path / "model.mlpackage")).mlProgram
        types[precision] = str(program)
    assert "FLOAT16" in types["fp16"] and "FLOAT16" not in types["fp32"]


@ONNX
def test_onnx_keeps_a_dynamic_batch_axis(tmp_path):
    import numpy as np
    import torch

    from edgeq.examples import tiny_convnet
    from edgeq.signature import parse_input_spec
    from edgeq.validate.runners import open_runner

    outcome = convert_source(
        "edgeq.examples:tiny_convnet", "onnx", "fp32", tmp_path,
        inputs=[parse_input_spec("pixels:batch=1x3x32x32:float32")],
    )
    assert outcome.verdict == Verdict.PASSED
    runner = open_runner(outcome.path / "model.onnx", "onnx")
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = runner.run({"pixels": batch})["logits"]
    module, _ = tiny_convnet()
    with torch.no_grad():
        expected = module(torch.from_numpy(batch))["logits"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@ONNX
def test_onnx_output_names_may_collide_with_graph_values(tmp_path):
    outcome = convert_source("tests.converters.models:colliding_names", "onnx", "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error
    assert [d.name for d in outcome.report.outputs] == ["linear", "add"]


@ONNX
@TFLITE
@COREML
@pytest.mark.parametrize("target", ["onnx", "tflite", "coreml"])
@pytest.mark.parametrize("source", ["tests.converters.models:recurrent", "tests.converters.models:sequence_lstm"])
def test_recurrent_models_convert(tmp_path, target, source):
    outcome = convert_source(source, target, "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error  # Core ML off macOS: the MIL reference executor
    assert outcome.report.outputs[0].sqnr_db > 60


@TFLITE
@COREML
@pytest.mark.parametrize("target", ["tflite", "coreml"])
def test_unconvertible_op_names_op_module_and_target(tmp_path, target):
    outcome = convert_source("tests.converters.models:unconvertible", target, "fp32", tmp_path)
    assert outcome.verdict == Verdict.CONVERSION_FAILED
    assert f"target {target}" in outcome.error
    assert "linalg_det" in outcome.error and "module 'block'" in outcome.error
    assert "Traceback" not in outcome.error
    assert not (tmp_path / "unconvertible").exists() or not any((tmp_path / "unconvertible").rglob("manifest.json"))


@ONNX
@pytest.mark.parametrize("source", SMALL_MODELS)
def test_onnx_int8_weight_carries_the_plan_exactly(tmp_path, source):
    from edgeq.plan import QuantPlan

    outcome = convert_source(source, "onnx", "int8-weight", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == manifest["plan"]["quantized_layers"] > 0
    assert parity["mismatches"] == [] and parity["missing"] == []
    plan = QuantPlan.load(outcome.path)  # plan.json + scales.npz travel in the bundle
    assert len(plan.quantized()) == parity["checked_layers"]
    assert outcome.report.outputs[0].cosine >= 0.999


@ONNX
def test_onnx_int8_dynamic_rewrites_every_linear_and_keeps_parity(tmp_path):
    outcome = convert_source("edgeq.examples:tiny_mlp", "onnx-x86-avx2", "int8-dynamic", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["notes"][0] == "2 linear layers run as dynamic int8 (DynamicQuantizeLinear + MatMulInteger)"
    assert all("Gelu" in note for note in manifest["notes"][1:])  # the graph shaping says what it rewrote
    assert manifest["weight_parity"]["checked_layers"] == 2 and manifest["weight_parity"]["mismatches"] == []
    assert manifest["runtime_settings"]["session_config"] == {"session.x64quantprecision": "1"}
    # With the exact u8s8 path (x64quantprecision) dynamic int8 stays close to FP32 on this MLP.
    assert outcome.report.outputs[0].cosine >= 0.999


@ONNX
def test_int8_dynamic_graph_uses_integer_matmuls(tmp_path):
    import onnx

    outcome = convert_source("edgeq.examples:tiny_mlp", "onnx", "int8-dynamic", tmp_path)
    ops = {node.op_type for node in onnx.load(str(outcome.path / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "DequantizeLinear" not in ops
