"""compare(): per-output drift over samples, top-k only for logits."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.validate.drift import compare, is_logits


def test_compare_reports_every_output_and_logits_agreement():
    rng = np.random.default_rng(0)
    refs = [{"logits": rng.standard_normal((1, 10)), "features": rng.standard_normal((1, 8))} for _ in range(6)]
    cands = [{k: v + 1e-3 * rng.standard_normal(v.shape) for k, v in s.items()} for s in refs]
    report = compare(refs, cands, ["logits", "features"], "test")
    assert report.samples == 6 and [d.name for d in report.outputs] == ["logits", "features"]
    logits, features = report.outputs
    assert logits.top1 == 1.0 and logits.top5 == 1.0 and features.top1 is None
    assert 50 < features.sqnr_db < 70 and features.cosine_min <= features.cosine


def test_shape_mismatch_names_the_output_and_sample():
    with pytest.raises(ValueError, match="output 'y', sample 0"):
        compare([{"y": np.zeros((1, 3))}], [{"y": np.zeros((3,))}], ["y"], "test")


def test_report_json_has_no_infinity():
    report = compare([{"y": np.ones(3)}], [{"y": np.ones(3)}], ["y"], "test")
    assert report.to_json()["outputs"][0]["sqnr_db"] == "inf"


@pytest.mark.parametrize("name, expected", [("logits", True), ("start_logits", True), ("output", False), ("logit", False)])
def test_logits_names(name, expected):
    assert is_logits(name) is expected
