"""The `edgeq` command through click's CliRunner: exit codes, messages, bundles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.examples import tiny_mlp
from tests.conftest import ONNX


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_and_targets_import_no_toolchain():
    code = (
        "import sys; from click.testing import CliRunner; from edgeq.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0;"
        "r = CliRunner().invoke(main, ['targets']); assert r.exit_code == 0, r.output;"
        "heavy = {'torch', 'tensorflow', 'coremltools', 'litert_torch', 'onnxruntime', 'onnx', 'transformers'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_targets_lists_and_shows_profiles():
    listing = run("targets")
    assert listing.exit_code == 0 and "onnx" in listing.output and "coreml" in listing.output
    shown = run("targets", "show", "tflite")
    assert shown.exit_code == 0 and 'runtime = "tflite"' in shown.output
    assert run("targets", "show", "nope").exit_code == 2


@ONNX
def test_convert_writes_a_bundle_and_validate_rechecks_it(tmp_path):
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "--out", str(tmp_path), "--samples", "4")
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "tiny_mlp" / "onnx" / "fp32"
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "manifest.json", "golden.npz", "report.json"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["budget"]["verdict"] == "passed" and manifest["budget"]["terms"] == "cosine>=0.9999"
    assert manifest["validation"]["samples"] == 4 and "passed" in result.output

    checked = run("validate", str(bundle))
    assert checked.exit_code == 0 and "passed" in checked.output


@ONNX
def test_tampered_artifact_is_refused(tmp_path):
    assert run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "--out", str(tmp_path), "--samples", "2").exit_code == 0
    artifact = tmp_path / "tiny_mlp" / "onnx" / "fp32" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    result = CliRunner().invoke(main, ["validate", str(artifact.parent)])
    assert result.exit_code == 3 and "does not match the manifest" in result.output


@ONNX
def test_over_budget_exits_6_and_keeps_the_bundle_aside(tmp_path):
    good = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "--out", str(tmp_path), "--samples", "2")
    assert good.exit_code == 0
    result = run(
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp16", "--out", str(tmp_path),
        "--samples", "2", "--budget", "sqnr_db>=200",
    )
    assert result.exit_code == 6, result.output
    rejected = tmp_path / "tiny_mlp" / "onnx" / "fp16.rejected"
    assert "over budget" in result.output and str(rejected) in result.output.replace("\n", "")
    assert json.loads((rejected / "manifest.json").read_text())["budget"]["verdict"] == "over_budget"
    assert not (tmp_path / "tiny_mlp" / "onnx" / "fp16").exists()  # the canonical path only holds passing bundles


def test_usage_errors_exit_2():
    assert run("convert").exit_code == 2
    bad_input = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "--input", "x:1xQ"])
    assert bad_input.exit_code == 2 and "neither a size" in bad_input.output
    bad_budget = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "--budget", "cosine=1"])
    assert bad_budget.exit_code == 2 and "--budget" in bad_budget.output
    bad_target = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-t", "tensorrt"])
    assert bad_target.exit_code == 2 and "known targets" in bad_target.output


def test_bad_source_exits_3(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "missing.pt")])
    assert result.exit_code == 3 and "no such file or folder" in result.output


def test_pickled_model_is_refused_with_exit_3(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp()[0], path)
    result = CliRunner().invoke(main, ["convert", str(path), "-t", "onnx", "--input", "x:1x16"])
    assert result.exit_code == 3
    assert "--trust-pickle" in result.output and "run code" in result.output


@ONNX
def test_trusted_pickle_converts(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp()[0], path)
    result = run("convert", str(path), "-t", "onnx", "--input", "x:1x16", "--trust-pickle", "--out", str(tmp_path / "o"), "--samples", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("target", ["tflite", "coreml"])
def test_conversion_failure_exits_4_naming_the_module(tmp_path, target):
    pytest.importorskip({"tflite": "litert_torch", "coreml": "coremltools"}[target])
    result = CliRunner().invoke(main, ["convert", "tests.converters.models:unconvertible", "-t", target, "--out", str(tmp_path)])
    assert result.exit_code == 4
    assert "module 'block'" in result.output and f"target {target}" in result.output
