"""A tiny BERT (random weights) on padded sentences through `edgeq convert` at int8-dynamic, then `edgeq validate`,
the device validator and the reports: last_hidden_state is judged on the positions attention_mask marks real,
with how many and the all-positions figures beside, everywhere the drift of an output is shown."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

SEQ = 16
SENTENCES = ["edge", "the model", "edgeq proves every artifact", "py torch model it came from .", "every", "the artifact"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert, write_run_reports
    from edgeq.quantize import QuantizeOptions
    from edgeq.signature import parse_input_spec
    from tests.load.test_sources import save_tiny_bert

    work = tmp_path_factory.mktemp("tokens")
    save_tiny_bert(work / "bert")
    specs = [parse_input_spec(f"{name}:1x{SEQ}:int64") for name in ("input_ids", "attention_mask", "token_type_ids")]
    model = load_model(str(work / "bert"), task="feature-extraction", inputs=specs, name="tiny")
    (work / "text.txt").write_text("\n".join(SENTENCES * 2) + "\n")
    options = ConvertOptions(targets=["onnx"], out=work / "out", precisions=["int8-dynamic"], samples=4, data=work / "text.txt",
                             layers=True, quantize=QuantizeOptions(calibration_samples=4))
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    write_run_reports([outcome])
    return outcome


def _masks(bundle_path):
    from edgeq.bundle import read_golden

    inputs, _ = read_golden(bundle_path / "golden.npz")
    return [s["attention_mask"] for s in inputs]


@ONNX
def test_convert_reports_token_drift_on_real_positions(bundle):
    report = json.loads((bundle.path / "report.json").read_text())
    (drift,) = report["validation"]["outputs"]
    masks = _masks(bundle.path)
    real = int(sum(m.sum() for m in masks))
    assert 0 < real < SEQ * len(masks)  # padded batches: some positions are padding
    assert (drift["mask_input"], drift["positions"], drift["positions_total"]) == ("attention_mask", real, SEQ * len(masks))
    assert drift["unmasked"]["cosine"] != drift["cosine"]  # two figures, over different positions
    from tests.test_report_html import SCHEMA, check_schema

    assert check_schema(report, json.loads(SCHEMA.read_text())) == []
    (quant,) = report["validation"]["vs_fp32_artifact"]["outputs"]  # against the FP32 artifact: the same positions
    assert quant["positions"] == real
    notes = report["layers"]["notes"]
    assert any(f"on the {real} of {SEQ * len(masks)} token positions attention_mask marks real" in n for n in notes)
    markdown = (bundle.path.parent.parent / "report.md").read_text()
    html = (bundle.path.parent.parent / "report.html").read_text()
    assert f"on {real} of {SEQ * len(masks)} token positions" in markdown and "padding included" in markdown
    assert f"on {real} of {SEQ * len(masks)} token positions" in html


@ONNX
def test_bundle_check_and_device_compare_what_convert_compared(bundle, tmp_path):
    from click.testing import CliRunner

    from edgeq.bundle import read_golden_token_outputs
    from edgeq.cli import main
    from edgeq.device.cli import main as device_main
    from edgeq.validate.bundle_check import check_bundle

    assert read_golden_token_outputs(bundle.path / "golden.npz") == {"last_hidden_state": "attention_mask"}
    (converted,) = json.loads((bundle.path / "report.json").read_text())["validation"]["outputs"]
    check = check_bundle(bundle.path)
    assert check.verdict == Verdict.PASSED
    (again,) = check.report.outputs
    assert again.positions == converted["positions"] and again.cosine == pytest.approx(converted["cosine"], abs=1e-9)
    cli = CliRunner().invoke(main, ["validate", str(bundle.path)])
    assert cli.exit_code == 0 and f"on {converted['positions']} of {converted['positions_total']} token positions" in cli.output
    result = tmp_path / "device.json"
    assert device_main([str(bundle.path), "--json", str(result)]) == 0
    (device_drift,) = json.loads(result.read_text())["bundles"][0]["drift"]
    assert device_drift["positions"] == converted["positions"] and device_drift["unmasked"] is not None


@ONNX
def test_a_bundle_from_before_token_masks_is_compared_at_every_position(bundle, tmp_path):
    """Its golden file records no token output, and its budget was held on every position: so it is checked."""
    from edgeq.hashing import sha256_path
    from edgeq.validate.bundle_check import check_bundle

    old = tmp_path / "old"
    shutil.copytree(bundle.path, old)
    with np.load(old / "golden.npz") as archive:
        arrays = {k: archive[k] for k in archive.files if not k.startswith("token_mask/")}
    with open(old / "golden.npz", "wb") as handle:
        np.savez(handle, **arrays)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["golden"]["sha256"] = sha256_path(old / "golden.npz")
    (old / "manifest.json").write_text(json.dumps(manifest))
    (converted,) = manifest["validation"]["outputs"]
    (drift,) = check_bundle(old).report.outputs
    assert drift.positions is None and drift.cosine == pytest.approx(converted["unmasked"]["cosine"], abs=1e-9)
