"""An int4-dynamic ONNX artifact through the pipeline: the manifest's stored bits per weight and bytes by kind, its
ORT accuracy_level, validation at the deployed level 4 and at level 1 (weight error apart from kernel error), and
the terminal, report.json, HTML and Markdown reports showing them. One conversion serves every test here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeq.validate.metrics import sqnr_db
from tests.conftest import ONNX
from tests.test_report_html import ROOT, check_schema

pytestmark = ONNX

SOURCE = "tests.converters.test_onnx_lowbit:sequence_stack"  # up 128->256, ReLU, down 256->64, head 64->8 (kept float)
# up and down at 4 bits + a float32 scale per 32 weights (5 bits each); head's weight and every bias at 32 bits
BITS_PER_WEIGHT = ((256 * 128 + 64 * 256) * 5 + (8 * 64 + 256 + 64 + 8) * 32) / (256 * 128 + 64 * 256 + 8 * 64 + 256 + 64 + 8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions
    from edgeq.validate.verdict import Verdict

    model = load_model(SOURCE)
    options = ConvertOptions(
        targets=["onnx"], out=tmp_path_factory.mktemp("out"), precisions=["int4-dynamic"], samples=3, keep_float=["head"],
        quantize=QuantizeOptions(algorithm="rtn", group_size=32, calibration_samples=2),
    )
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    return model, outcome, json.loads((outcome.path / "manifest.json").read_text())


def test_manifest_records_bits_per_weight_bytes_by_kind_and_the_accuracy_level(run):
    _, outcome, manifest = run
    storage = manifest["artifact"]["storage"]
    assert storage["bits_per_weight"] == round(BITS_PER_WEIGHT, 4)
    assert storage["bytes"] == {
        "quantized_weights": (256 * 128 + 64 * 256) // 2,
        "scales_zero_points_luts": (256 * 128 + 64 * 256) // 32 * 4,
        "float_weights": (8 * 64 + 256 + 64 + 8) * 4,
    }
    layers = {layer["name"]: layer for layer in storage["layers"]}
    assert layers["up"]["bits_per_weight"] == layers["down"]["bits_per_weight"] == 5.0
    assert layers["head"]["dtype"] == "float32" and layers["head"]["bits_per_weight"] == 32.0
    assert manifest["artifact"]["ort_accuracy_level"] == 4
    levels = manifest["validation"]["accuracy_levels"]
    assert (levels["deployed"], levels["levels"], levels["float_level"]) == (4, [4], 1)
    # the budget holds the deployed run: the manifest's own drift is level 4's
    assert manifest["validation"]["outputs"][0]["sqnr_db"] != levels["weight_error"]["outputs"][0]["sqnr_db"]
    assert sorted(p.name for p in outcome.path.iterdir()) == [
        "golden.npz", "manifest.json", "model.onnx", "plan.json", "report.json", "scales.npz",
    ]  # level 1 ran from the artifact's bytes in memory: no second model file
    assert any("bits per weight on the 2 quantized layers (codes, float32 scales)" in note and
               f"{BITS_PER_WEIGHT:.2f} bits per weight over the whole model as onnx stores it" in note for note in outcome.plan_notes)


def test_level_1_separates_the_weights_error_from_the_kernels(run):
    _, _, manifest = run
    levels = manifest["validation"]["accuracy_levels"]
    deployed = manifest["validation"]["outputs"][0]["sqnr_db"]
    weight = levels["weight_error"]["outputs"][0]["sqnr_db"]
    kernel = levels["kernel_error"]["outputs"][0]["sqnr_db"]
    assert "accuracy_level=1 for this run" in levels["weight_error"]["executor"]
    assert weight > deployed  # level 1 drops the int8 activations' error: only the weights' is left
    assert kernel >= 30 and kernel > weight  # on this stack the 4-bit weights err more than the kernel's int8 activations


def test_the_runner_runs_the_same_bytes_at_level_1_exactly(run):
    """Against PyTorch with the plan's dequantized weights, level 1 leaves only fp32 rounding; level 4 adds the
    kernel's int8 activations (measured 127-133 dB and 43 dB in tests/converters/test_onnx_lowbit.py)."""
    from edgeq.converters.onnx_lowbit import dequantized_weights, split_plan
    from edgeq.plan import QuantPlan
    from edgeq.validate.runners.onnx_levels import matmul_nbits_levels
    from edgeq.validate.runners.onnxruntime import OnnxRuntimeRunner

    model, outcome, _ = run
    lowbit, _ = split_plan(QuantPlan.load(outcome.path))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 6, 128)).astype(np.float32)}
    with torch.no_grad():
        reference = dequantized_weights(model.module, lowbit)(torch.from_numpy(feeds["x"]))
    reference = (reference[0] if isinstance(reference, (tuple, list)) else reference).numpy()
    path = outcome.path / "model.onnx"
    deployed = sqnr_db(reference, next(iter(OnnxRuntimeRunner(path).run(feeds).values())))
    at_level_1 = sqnr_db(reference, next(iter(OnnxRuntimeRunner(path, accuracy_level=1).run(feeds).values())))
    assert at_level_1 >= 100 and 30 <= deployed < at_level_1
    assert matmul_nbits_levels(path) == [4]  # the file itself is untouched


def test_reports_show_bits_per_weight_and_both_levels(run, capsys):
    from edgeq.report import print_outcomes
    from edgeq.report_html import load_reports, render_html
    from edgeq.report_markdown import render_markdown

    _, outcome, manifest = run
    report = json.loads((outcome.path / "report.json").read_text())
    assert report["artifact"]["storage"] == manifest["artifact"]["storage"]
    assert report["validation"]["accuracy_levels"] == manifest["validation"]["accuracy_levels"]
    assert check_schema(report, json.loads((ROOT / "docs" / "report.schema.json").read_text())) == []

    print_outcomes([outcome])
    terminal = capsys.readouterr().out
    assert "bits/w" in terminal and f"{BITS_PER_WEIGHT:.2f}" in terminal
    assert f"weights as stored: {BITS_PER_WEIGHT:.2f} bits/weight" in terminal
    assert "bits/weight per layer: 2 int4 layers at 5.00; 1 float32 layer at 32.00; other parameters (328) at 32.00" in terminal
    assert "accuracy_level 4 (deployed) holds the budget; at level 1 (fp32 math: weight error)" in terminal
    assert "kernel error (level 4 against level 1)" in terminal

    page = render_html(load_reports([outcome.path]))
    assert "<th scope=\"col\" class=num>bits/weight</th>" in page and f">{BITS_PER_WEIGHT:.3g}<" in page
    assert "Weight error and kernel error (ORT accuracy_level)" in page and 'href="#accuracy-levels"' in page
    assert "Bits per weight of all 4 layers" in page and "<dt>ORT accuracy_level</dt><dd>4 (int8 activations per block)</dd>" in page

    markdown = render_markdown(load_reports([outcome.path]))
    assert f"{BITS_PER_WEIGHT:.3g} bits/w" in markdown
    assert "- ORT accuracy_level 4 (deployed, budget held here); at level 1 (weight error only) worst cosine" in markdown


def test_per_layer_tables_show_each_layers_bits_per_weight(capsys):
    from edgeq.report import print_layers
    from edgeq.report_html import render_html
    from edgeq.report_markdown import render_markdown
    from edgeq.validate.layer_drift import LayerDrift, LayerReport
    from tests.test_report_html import layered_report

    report = layered_report()
    worst = report["layers"]["top"][0]
    report["artifact"]["storage"] = {"bits_per_weight": 4.61, "weights": 100, "float_bits": 32, "bytes": {},
                                     "layers": [{"name": worst, "bits_per_weight": 4.5}]}
    page = render_html([report])
    assert f'<code class="nowrap">{worst}</code></td><td class=num>5</td>' in page  # rank 1, execution position 5
    assert ">bits/weight</th>" in page.split('id="layers"')[1] and "<td class=num>4.5</td>" in page.split('id="layers"')[1]
    assert f"`{worst}` (Linear): adds noise" in render_markdown([report]) and "4.5 bits/weight" in render_markdown([report])

    layers = LayerReport("FP32 PyTorch", "onnxruntime", 2, [LayerDrift("up", "Linear", "t", 30.0, 0.99, float("inf"), 31.0, "isolated", None)])
    print_layers(layers, "bundle", storage=report["artifact"]["storage"] | {"layers": [{"name": "up", "bits_per_weight": 5.0}]})
    assert "bits/w" in capsys.readouterr().out

