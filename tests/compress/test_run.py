"""The compression step of `edgeq convert` (edgeq/compress/run.py) with the real stages: figures before and after
each stage, the original model untouched and still the reference, records in plan.json, manifest, report.json,
report.html and report.md; calibration samples drawn for FP32-only runs; qat per quantized plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.compress.run import compress_model, model_figures
from edgeq.compress.spec import CompressionSpecs, parse_lowrank, parse_prune, parse_recover
from edgeq.errors import UsageError
from edgeq.load import load_model
from edgeq.manifest import without_timings
from edgeq.plan import QuantPlan
from tests.test_report_html import ROOT, check_schema


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [{"x": generator.standard_normal((1, 16)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def mlp():
    return load_model("edgeq.examples:tiny_mlp")


def test_lowrank_then_distill_measures_every_stage_and_leaves_the_original(mlp):
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    specs = CompressionSpecs(lowrank=parse_lowrank("rank:0.5"), recover=parse_recover("distill:steps=10,lr=1e-3,batch_size=4"))
    compressed, stages, figures = compress_model(mlp, specs, _samples(8, 0), _samples(3, 1))
    assert all(torch.equal(before[k], v) for k, v in mlp.module.state_dict().items())  # the teacher stays as it was
    assert [s.stage for s in stages] == ["lowrank", "recover"] and compressed.module is stages[-1].module
    first, second = figures["stages"]
    assert first["spec"] == "rank:0.5" and second["spec"] == "distill:steps=10,lr=1e-3,batch_size=4"
    assert first["parameters"]["after"] < first["parameters"]["before"] == model_figures(mlp.module)["parameters"]
    assert first["weight_bytes"]["after"] < first["weight_bytes"]["before"]
    assert second["parameters"]["before"] == second["parameters"]["after"] == first["parameters"]["after"]
    assert [d["name"] for d in first["drift"]] == mlp.outputs and -1 <= first["drift"][0]["cosine"] <= 1
    assert figures["drift_samples"] == 3 and len(figures["seconds"]) == 2
    latency = figures["latency"]
    assert len(latency["median_ms"]) == 2 and latency["median_ms"][0]["after"] == latency["median_ms"][1]["before"]
    assert "1 thread" in latency["method"] or "threads" in latency["method"]


def test_unstructured_pruning_shows_as_zeros(mlp):
    _, _, figures = compress_model(mlp, CompressionSpecs(prune=parse_prune("unstructured:0.5")), [], _samples(2, 1))
    (stage,) = figures["stages"]
    assert stage["zeros_share"]["before"] == 0.0 and stage["zeros_share"]["after"] > 0.25
    assert stage["parameters"]["before"] == stage["parameters"]["after"]  # zeros, not a smaller graph


def test_a_stage_that_needs_data_without_any_is_a_clear_error(mlp):
    specs = CompressionSpecs(lowrank=parse_lowrank("rank:0.5"), recover=parse_recover("distill"))
    with pytest.raises(UsageError, match=r"distill: needs calibration samples and none are available; give --calibration-samples"):
        compress_model(mlp, specs, [], _samples(2, 1))


def test_plan_json_keeps_compression_records(tmp_path):
    records = [{"stage": "prune", "spec": "2:4", "layers": {"fc": {"sparsity": 0.5, "pattern": "2:4"}}, "notes": ["n"], "skipped": {}},
               {"stage": "recover", "spec": "qat", "layers": {}, "notes": [], "skipped": {"head": "float"}}]
    plan = QuantPlan("int8-dynamic", "onnx", compression=records)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    plan.save(first)
    QuantPlan.load(first).save(second)
    assert QuantPlan.load(first).compression == records
    assert (first / "plan.json").read_bytes() == (second / "plan.json").read_bytes()
    plan.compression = []
    plan.save(second)
    assert "compression" not in json.loads((second / "plan.json").read_text())  # plans without compression unchanged


def test_fp32_run_draws_calibration_and_reports_compression(tmp_path):
    """An FP32-only run with --lowrank: calibration samples drawn anyway, the artifact validated against the
    ORIGINAL model (its drift includes the factorization's), a compression section everywhere a report is."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--lowrank", "rank:0.25", "--samples", "3",
        "--calibration-samples", "4", "--budget", "none", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    bundle = out / "tiny_mlp" / "onnx" / "fp32"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["data"]["split"]["calibration"] == 4
    (stage,) = manifest["compression"]["stages"]
    assert stage["stage"] == "lowrank" and stage["layers"] and stage["parameters"]["after"] < stage["parameters"]["before"]
    assert manifest["model"]["parameters"] == stage["parameters"]["after"]
    drift = manifest["validation"]["outputs"][0]
    assert abs(drift["cosine"] - stage["drift"][0]["cosine"]) < 1e-4  # the artifact is held to the original model
    assert without_timings(manifest)["compression"]["latency"] is None
    report = json.loads((bundle / "report.json").read_text())
    assert report["compression"] == manifest["compression"]
    assert check_schema(report, json.loads((ROOT / "docs" / "report.schema.json").read_text())) == []
    html = (out / "tiny_mlp" / "report.html").read_text()
    markdown = (out / "tiny_mlp" / "report.md").read_text()
    assert 'id="compression"' in html and "rank:0.25" in html and f"{stage['parameters']['before']:,} → {stage['parameters']['after']:,}" in html
    assert "**compression (tiny_mlp)**" in markdown and "| lowrank | rank:0.25 |" in markdown
    # per-layer drift afterwards would compare with the uncompressed source: refused, saying what works
    checked = CliRunner().invoke(main, ["validate", str(bundle), "--layers"])
    assert checked.exit_code == 2 and "converted from a compressed model (lowrank rank:0.25)" in checked.output, checked.output


def test_qat_runs_per_quantized_plan_and_is_recorded(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int8-dynamic", "--prune", "unstructured:0.5",
        "--recover", "qat:steps=4,batch_size=2", "--samples", "3", "--calibration-samples", "4", "--budget", "none", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    bundle = out / "tiny_mlp" / "onnx" / "int8-dynamic"
    plan = json.loads((bundle / "plan.json").read_text())
    assert [(r["stage"], r["spec"]) for r in plan["compression"]] == [("prune", "unstructured:0.5"), ("recover", "qat:steps=4,batch_size=2")]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [s["spec"] for s in manifest["compression"]["stages"]] == ["unstructured:0.5", "qat:steps=4,batch_size=2"]
    assert manifest["weight_parity"]["mismatches"] == []
    # zeros stay zeros through QAT, quantization and export (read back from the artifact: codes at their zero point)
    assert manifest["artifact"]["sparsity"]["share"] >= 0.25
    markdown = (out / "tiny_mlp" / "report.md").read_text()
    assert "qat:steps=4,batch_size=2" in markdown and "zeros in the artifact's weights" in markdown


class HardCodedView(torch.nn.Module):
    """conv2's channels feed a view whose sizes are literals: no pruner can follow that."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(y.view(1, 32, 64).mean(-1))


def hard_coded_view():
    torch.manual_seed(0)
    return HardCodedView().eval(), (torch.randn(1, 3, 8, 8),)


def test_a_refusing_stage_ends_the_run_with_exit_4_and_no_bundle(tmp_path):
    result = CliRunner().invoke(main, [
        "convert", "tests.compress.test_run:hard_coded_view", "-t", "onnx,tflite", "-p", "fp32", "--prune", "structured:0.5",
        "--samples", "2", "--calibration-samples", "2", "-o", str(tmp_path),
    ])
    assert result.exit_code == 4, result.output
    assert "refused at layer 'conv2'" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("*.onnx"))


def test_figures_repeat_exactly_apart_from_timings(mlp):
    """Two runs on the same inputs write the same compression records (latency and seconds are timing fields)."""
    specs = CompressionSpecs(prune=parse_prune("unstructured:0.5"), recover=parse_recover("distill:steps=3,batch_size=2"))
    runs = [compress_model(mlp, specs, _samples(4, 0), _samples(2, 1)).figures for _ in range(2)]
    for figures in runs:
        figures.pop("latency"), figures.pop("seconds")
    assert json.dumps(runs[0], sort_keys=True) == json.dumps(runs[1], sort_keys=True)


def test_lora_alone_runs_per_quantized_plan_without_run_level_figures(tmp_path):
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int8-weight", "--recover", "lora:rank=2,steps=3,batch_size=2",
        "--samples", "2", "--calibration-samples", "4", "--budget", "none", "-o", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    assert "compression: measuring" not in result.output
    bundle = tmp_path / "tiny_mlp" / "onnx" / "int8-weight"
    (stage,) = json.loads((bundle / "manifest.json").read_text())["compression"]["stages"]
    assert stage["spec"] == "lora:rank=2,steps=3,batch_size=2" and "parameters" not in stage
    assert [r["spec"] for r in json.loads((bundle / "plan.json").read_text())["compression"]] == [stage["spec"]]
    assert json.loads((bundle / "manifest.json").read_text())["weight_parity"]["mismatches"] == []
