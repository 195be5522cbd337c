"""edgeq sweep without Ray (--no-ray): the same tasks one by one in-process; a failing task is reported with
its error beside the others; a rerun skips tasks whose bundle exists with the same inputs (content-addressed)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgeq.cli import main
from edgeq.sweep import load_sweep
from edgeq.sweep.run import plan
from tests.conftest import ONNX

MODELS_PY = '''
import torch


def build():
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return model, (torch.randn(1, 8),)


def broken():
    raise RuntimeError("this model cannot be built")


SEED = 0
'''

SWEEP = """
[sweep]
targets = ["onnx"]
schemes = ["fp32"]
out = "out"

[defaults]
samples = 2

[[models]]
source = "models.py:build"
name = "small"

[[models]]
source = "models.py:broken"

[recipes.plain]

[recipes.more]
samples = SAMPLES
"""


def _sweep(tmp_path, samples=3):
    (tmp_path / "sweep.toml").write_text(SWEEP.replace("SAMPLES", str(samples)))
    return CliRunner().invoke(main, ["sweep", "-c", str(tmp_path / "sweep.toml"), "--no-ray"])


def _tasks(tmp_path) -> dict:
    return {t["model"] + "/" + t["recipe"]: t for t in json.loads((tmp_path / "out" / "sweep.json").read_text())["tasks"]}


@ONNX
def test_no_ray_runs_every_task_reports_failures_and_skips_unchanged_ones(tmp_path):
    (tmp_path / "models.py").write_text(MODELS_PY)
    result = _sweep(tmp_path)
    assert result.exit_code == 3, result.output  # the broken model: a source error, beside two good bundles
    tasks = _tasks(tmp_path)
    assert sorted(tasks) == ["broken/more", "broken/plain", "small/more", "small/plain"]
    for name in ("small/plain", "small/more"):
        task = tasks[name]
        assert task["status"] == "passed" and task["attempts"] == 1 and not task["reused"]
        assert (tmp_path / "out" / name / "onnx" / "fp32" / "small" / "onnx" / "fp32" / "model.onnx").is_file()
        assert task["bundle"].endswith("small/onnx/fp32") and task["cosine"] > 0.999
    assert json.loads((tmp_path / "out/small/more/onnx/fp32/small/onnx/fp32/manifest.json").read_text())["validation"]["samples"] == 3
    for name in ("broken/plain", "broken/more"):
        assert tasks[name]["status"] == "failed" and "this model cannot be built" in tasks[name]["error"]
    markdown = (tmp_path / "out" / "sweep.md").read_text()
    assert "[report](small/plain/onnx/fp32/small/report.md)" in markdown and "this model cannot be built" in markdown
    assert 'href="small/more/onnx/fp32/small/report.html"' in (tmp_path / "out" / "sweep.html").read_text()

    # Same inputs: the good tasks are reused, the failed ones (no bundle) run again.
    result = _sweep(tmp_path)
    assert "small/plain/onnx/fp32: skipped (same inputs, bundle in place)" in result.output
    assert "broken/plain/onnx/fp32: runs (previous run left no bundle)" in result.output
    tasks = _tasks(tmp_path)
    assert tasks["small/plain"]["reused"] and tasks["small/more"]["reused"] and tasks["small/plain"]["status"] == "passed"

    # A recipe's key changes: only its tasks would run. The model file changes: every task of that model would.
    # (Planned, not run: the reasons are what is tested, and each run costs conversions.)
    reasons = _reasons(tmp_path, samples=4)
    assert reasons["small/more/onnx/fp32"] == "inputs changed: keys.samples"
    assert reasons["small/plain/onnx/fp32"] == "same inputs, bundle in place"
    (tmp_path / "models.py").write_text(MODELS_PY.replace("SEED = 0", "SEED = 1"))
    assert _reasons(tmp_path)["small/plain/onnx/fp32"] == "inputs changed: contents.source"


def _reasons(tmp_path, samples=3) -> dict:
    (tmp_path / "sweep.toml").write_text(SWEEP.replace("SAMPLES", str(samples)))
    return {item.task.id: item.reason for item in plan(load_sweep(tmp_path / "sweep.toml"))}
