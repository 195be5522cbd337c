"""Full-integer targets through the whole pipeline (`edgeq convert -t tflite-edgetpu -p w8a8`): edgeq's own
calibration quantizes the model inputs and the outputs of the leaf modules between layers (the plan's tensor
points), so every op of the .tflite runs on int8, its inputs and outputs included. The same models at w8a8
on float-IO targets get no tensor points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX, TFLITE
from tests.converters.test_tflite_quantized import op_types
from tests.helpers import convert_source

EDGE_CONVNET = "tests.converters.models:edge_convnet"
MIN_SQNR_DB = 25.0  # the acceptance; measured 43-46 dB on both models and every target
# Integer kernels vs PyTorch fake-quant of the same plan: the int32 bias and fixed-point requantization move
# an output code by a step or two, and the converter fuses some requantizations (conv output, then ReLU)
# into one rounding where PyTorch rounds twice. Measured: 2 steps (edge_convnet), 1 (tiny_convnet).
MAX_QSTEPS = 2.001


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _assert_fully_integer(path) -> list[str]:
    ops = op_types(path)
    floats = [(op, i, o) for op, i, o in ops if {"float32", "float16"} & {*i, *o}]
    assert floats == [], floats
    assert "DEQUANTIZE" not in {op for op, _, _ in ops}
    interpreter = _interpreter(path)
    assert [d["dtype"] for d in interpreter.get_input_details()] == [np.int8]
    assert [d["dtype"] for d in interpreter.get_output_details()] == [np.int8]
    return [op for op, _, _ in ops]


def _fake_quant_drift_qsteps(source: str, bundle) -> float:
    """Largest |artifact - PyTorch simulation of the saved plan| over the golden inputs, in output steps."""
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.fold import fold_batchnorm
    from edgeq.compress.qdq import WeightForm
    from edgeq.load import load_model
    from edgeq.plan import QuantPlan
    from edgeq.validate.runners import open_runner

    loaded = load_model(source)
    plan = QuantPlan.load(bundle)
    folded, _ = fold_batchnorm(loaded.module)
    simulated = apply_plan(folded, plan, WeightForm.QDQ)
    runner = open_runner(bundle / "model.tflite", "tflite")
    step = float(list(plan.layers.values())[-1].output.scale)
    generator = torch.Generator().manual_seed(11)
    worst = 0.0
    for _ in range(8):
        batch = tuple(torch.randn(t.shape, generator=generator) for t in loaded.example_inputs)
        got = runner.run({name: t.numpy() for name, t in zip(loaded.input_names, batch)})
        with torch.no_grad():
            expected = simulated(*batch)
        for name, value in zip(loaded.outputs, expected):
            worst = max(worst, float(np.abs(got[name] - value.numpy()).max()) / step)
    return worst


@TFLITE
def test_cli_edgetpu_w8a8_is_fully_integer(tmp_path):
    from click.testing import CliRunner

    from edgeq.cli import main

    result = CliRunner().invoke(
        main, ["convert", EDGE_CONVNET, "-t", "tflite-edgetpu", "-p", "w8a8", "--out", str(tmp_path), "--samples", "8"]
    )
    assert result.exit_code == 0, result.output
    (manifest_path,) = tmp_path.rglob("manifest.json")
    bundle, manifest = manifest_path.parent, json.loads(manifest_path.read_text())
    assert manifest["budget"]["verdict"] == Verdict.PASSED.value
    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == manifest["plan"]["quantized_layers"] == 4
    assert parity["mismatches"] == [] and parity["missing"] == []
    assert min(o["sqnr_db"] for o in manifest["validation"]["outputs"]) >= MIN_SQNR_DB
    plan = json.loads((bundle / "plan.json").read_text())
    # Input, ReLU, max pool, ReLU6, Hardswish, adaptive pool, flatten: calibrated per tensor, int8 asymmetric.
    assert set(plan["tensors"]) == {"input:image", "features.2", "features.3", "features.6", "features.8", "pool", "flatten"}
    assert plan["inputs"] == ["image"]
    ops = _assert_fully_integer(bundle / "model.tflite")
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "HARD_SWISH", "MEAN", "FULLY_CONNECTED"} <= set(ops)
    assert _fake_quant_drift_qsteps(EDGE_CONVNET, bundle) <= MAX_QSTEPS


@TFLITE
def test_quick_start_convnet_is_fully_integer_on_edgetpu(tmp_path):
    """tiny_convnet's mean is a function in forward(), but it feeds the head's quantized input directly, so
    MEAN runs in int8 too; its Hardswish and ReLU modules get points of their own."""
    outcome = convert_source("edgeq.examples:tiny_convnet", "tflite-edgetpu", "w8a8", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert min(d.sqnr_db for d in outcome.report.outputs) >= MIN_SQNR_DB
    ops = _assert_fully_integer(outcome.path / "model.tflite")
    assert {"HARD_SWISH", "MEAN", "TRANSPOSE", "MAX_POOL_2D"} <= set(ops)
    plan = json.loads((outcome.path / "plan.json").read_text())
    assert "input:pixels" in plan["tensors"] and "features.8" in plan["tensors"]
    assert any("no SmoothQuant" in note for note in plan["notes"])  # its x / s would be a float MUL
    assert _fake_quant_drift_qsteps("edgeq.examples:tiny_convnet", outcome.path) <= MAX_QSTEPS


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE)])
def test_float_io_targets_validate_w8a8_without_tensor_points(tmp_path, target):
    outcome = convert_source(EDGE_CONVNET, target, "w8a8", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert min(d.sqnr_db for d in outcome.report.outputs) >= MIN_SQNR_DB
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["mismatches"] == [] and manifest["weight_parity"]["checked_layers"] == 4
    assert "tensors" not in json.loads((outcome.path / "plan.json").read_text())


def test_tensor_points_wrap_modules_and_quantize_inputs():
    """apply_plan puts each module point after its module (FQNs kept underneath) and the input points at
    the FlatModel boundary; inputs that are not float get no point."""
    from edgeq.calibration.static import tensor_points
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.qdq import OutputQuant, WeightForm
    from edgeq.load import load_model
    from edgeq.plan import PerTensor, QDtype, QuantPlan, TensorQuant

    loaded = load_model(EDGE_CONVNET)
    points = tensor_points(loaded.module, loaded.example_inputs, loaded.input_names)
    assert points == ["input:image", "features.1", "features.2", "features.3", "features.5", "features.6", "features.8", "pool", "flatten"]
    coarse = TensorQuant(QDtype.INT8, PerTensor(), False, np.float32(0.5), np.int32(0))
    plan = QuantPlan("w8a8", "tflite-edgetpu", tensors={"input:image": coarse, "pool": coarse}, inputs=["image"])
    quantized = apply_plan(loaded.module, plan, WeightForm.QDQ)
    assert isinstance(quantized.inner.pool, OutputQuant)
    x = loaded.example_inputs[0]
    with torch.no_grad():
        expected = loaded.module.inner.head(torch.flatten(coarse_round(loaded.module.inner.pool(loaded.module.inner.features(coarse_round(x)))), 1))
        (got,) = quantized(x)
    torch.testing.assert_close(got, expected)
    with pytest.raises(KeyError, match="cannot place"):
        apply_plan(loaded.module, QuantPlan("w8a8", "t", tensors={"input:other": coarse}, inputs=["image"]), WeightForm.QDQ)


def coarse_round(x: torch.Tensor) -> torch.Tensor:
    """int8 codes at scale 0.5, zero point 0."""
    return torch.clamp(torch.round(x / 0.5), -128, 127) * 0.5
