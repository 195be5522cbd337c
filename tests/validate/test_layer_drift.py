"""Per-layer drift: the runtime's own intermediate tensors against FP32 PyTorch, worst offender first."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.load import load_model
from edgeq.pipeline import ConvertOptions, convert
from edgeq.validate.layer_drift import LayerDrift, LayerReport, local_sqnr_db
from tests.conftest import COREML, ONNX, TFLITE
from tests.validate.layer_models import BAD

RUNTIMES = [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE)]


def test_local_sqnr_is_the_noise_a_layer_adds():
    assert local_sqnr_db(math.inf, 40.0) == pytest.approx(40.0)  # a noise-free input: all of it is the layer's
    assert local_sqnr_db(30.0, 33.0) == math.inf  # better than its input (clipping, pooling): adds none
    # 30 dB in, 27 dB out: the layer added as much noise as it received (10^-3 + 10^-3 = 10^-2.7)
    assert local_sqnr_db(30.0, 30.0 - 10 * math.log10(2)) == pytest.approx(30.0, abs=1e-6)


def test_top_names_the_noisiest_layers_and_json_has_no_infinity():
    def row(name, local):
        return LayerDrift(name, "Linear", name, 20.0, 0.99, math.inf, local, "isolated", None)

    report = LayerReport("FP32 PyTorch", "test", 2, rows=[row("a", 40.0), row("b", math.inf), row("c", 12.0)])
    assert report.top == ["c", "a"]  # a layer adding no noise is never an offender
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["top"] == ["c", "a"] and data["rows"][1]["local_sqnr_db"] == "inf"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_badly_quantized_layer_is_named_first(runtime, tmp_path):
    """Acceptance: one layer quantized badly on purpose (tests/validate/layer_models.py) is the top offender,
    by a wide margin, though every layer after it inherits its noise."""
    result = CliRunner().invoke(
        main,
        ["convert", "tests.validate.layer_models:one_bad_layer", "-t", runtime, "-p", "int8-weight", "--layers",
         "--samples", "8", "-o", str(tmp_path)],
    )
    assert result.exit_code == 6, result.output  # over budget: the bad layer breaks the default budget
    bundle = tmp_path / "one_bad_layer" / runtime / "int8-weight.rejected"
    layers = json.loads((bundle / "report.json").read_text())["layers"]
    assert layers["top"][0] == BAD, layers
    local = {row["name"]: row["local_sqnr_db"] for row in layers["rows"]}
    others = [v for name, v in local.items() if name != BAD and v != "inf"]
    assert local[BAD] < 20 and local[BAD] + 20 < min(others), local
    assert f"layers adding the most noise: {BAD}" in result.output

    # The same from the bundle alone (plus the model it names), as a build step would ask for it.
    layers_file = bundle / "report.json"
    report = json.loads(layers_file.read_text())
    layers_file.write_text(json.dumps({**report, "layers": None}))
    result = CliRunner().invoke(main, ["validate", str(bundle), "--layers"])
    assert result.exit_code == 6, result.output
    assert json.loads(layers_file.read_text())["layers"]["top"][0] == BAD
    assert BAD in result.output


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp32_layers_match_pytorch_tensor_for_tensor(runtime, tmp_path):
    """Every layer's tensor is found and read in torch's layout: an FP32 artifact agrees with PyTorch at
    every layer to float32 precision (a wrong tensor or a wrong transpose would read as noise)."""
    model = load_model("edgeq.examples:tiny_convnet")
    (outcome,) = convert(model, ConvertOptions(targets=[runtime], out=tmp_path, precisions=["fp32"], samples=4, layers=True))
    layers = outcome.layers
    assert layers is not None and len(layers.rows) >= 6
    assert all(row.sqnr_db > 100 for row in layers.rows), [(r.name, r.sqnr_db) for r in layers.rows]
    compared = {row.name for row in layers.rows} | {f for row in layers.rows for f in row.fused} | set(layers.unmatched)
    assert {"features.0", "features.3", "features.7", "features.8", "head"} <= compared
    if runtime == "tflite":  # conv + batchnorm + relu run as one op: one row, named after the conv
        assert any(row.name == "features.0" and row.fused == ["features.1", "features.2"] for row in layers.rows)


@TFLITE
def test_validate_layers_refuses_another_model(tmp_path):
    model = load_model("edgeq.examples:tiny_mlp")
    (outcome,) = convert(model, ConvertOptions(targets=["tflite"], out=tmp_path, precisions=["fp32"], samples=2))
    result = CliRunner().invoke(main, ["validate", str(outcome.path), "--layers", "--model", "edgeq.examples:tiny_convnet"])
    assert result.exit_code == 3, result.output
    assert "is not the" in result.output and "converted from" in result.output


@COREML
def test_validate_layers_refuses_core_ml(tmp_path):
    bundle = tmp_path / "b"
    model = load_model("edgeq.examples:tiny_mlp")
    (outcome,) = convert(model, ConvertOptions(targets=["coreml"], out=tmp_path, precisions=["fp32"], samples=2))
    shutil.copytree(outcome.path, bundle)
    result = CliRunner().invoke(main, ["validate", str(bundle), "--layers"])
    assert result.exit_code == 2, result.output
    assert "onnx and tflite" in result.output
