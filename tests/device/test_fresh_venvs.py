"""The device side in FRESH virtual environments: no torch, none of edgeq's dependencies, only numpy and one
runtime, as a device-lab image has them. edgeq itself is installed from its wheel with --no-deps.

Pinned to what the project is tested with (constraints.txt) where it can be: onnxruntime 1.32.0 and
ai-edge-litert 2.3.0 with its pinned numpy 2; tflite-runtime 2.14.0 (its last release with a cp311
manylinux x86_64 wheel) needs numpy 1, so that venv takes numpy 1.26.4 (the last numpy 1 release).
Every child process runs outside the work tree, so it imports the installed edgeq, never the checkout.
Without the package registry these tests skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
import zipfile

import pytest
from click.testing import CliRunner

from edgeq.cli import main as edgeq_main
from tests.device.conftest import flip_byte, run_device

pytestmark = pytest.mark.usefixtures("registry")


def _assert_bare(python, cwd):
    """torch (and edgeq's other dependencies) are not importable; edgeq is the installed wheel, not the work tree."""
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    code = (
        "import importlib.util, edgeq, json;"
        "print(json.dumps([edgeq.__file__, [m for m in ('click', 'rich', 'transformers', 'tensorflow') if importlib.util.find_spec(m)]]))"
    )
    where, present = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60, cwd=cwd).stdout)
    assert "site-packages" in where and present == []


def _validate(python, bundle, tmp_path, runtime: str, package: str, version: str, *, script: bool = False):
    junit, result_json = tmp_path / f"{runtime}.xml", tmp_path / f"{runtime}.json"
    args = [bundle, "--junit", junit, "--json", result_json, "--runs", "10"]
    if script:
        result = subprocess.run([str(python.parent / "edgeq-device"), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    else:
        result = run_device(*args, python=python, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0" and suite.find("testcase/system-out") is not None
    entry = json.loads(result_json.read_text())["bundles"][0]
    assert entry["verdict"] == "passed" and entry["runtime"] == {"name": runtime, "package": package, "version": version}
    assert entry["latency"]["runs"] == 10 and entry["memory"]["peak_rss_bytes"] > 0
    return result


def _refuses_tampered(python, bundle, tmp_path, artifact: str):
    copy = tmp_path / "tampered" / bundle.name
    shutil.copytree(bundle, copy)
    flip_byte(copy / artifact)
    result = run_device(copy, "--junit", tmp_path / "tampered.xml", python=python, cwd=tmp_path)
    assert result.returncode == 3 and f"{copy / artifact}: sha256" in result.stdout
    assert ET.parse(tmp_path / "tampered.xml").getroot().get("errors") == "1"


def _lab(bundle, path):
    result = CliRunner().invoke(edgeq_main, ["bundle", str(bundle), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_tflite_runtime_on_numpy_1(fresh_venv, bundles, tmp_path):
    python = fresh_venv("tflite-runtime", "tflite-runtime==2.14.0", "numpy==1.26.4")
    _assert_bare(python, tmp_path)
    result = _validate(python, bundles["tflite"], tmp_path, "tflite", "tflite-runtime", "2.14.0")
    assert "executed by: tflite-runtime 2.14.0" in result.stdout
    _refuses_tampered(python, bundles["tflite"], tmp_path, "model.tflite")


def test_ai_edge_litert(fresh_venv, bundles, tmp_path):
    python = fresh_venv("ai-edge-litert", "ai-edge-litert==2.3.0", "numpy", constraints=True)
    _assert_bare(python, tmp_path)
    lab = _lab(bundles["tflite"], tmp_path / "lab.zip")
    result = _validate(python, lab, tmp_path, "tflite", "ai-edge-litert", "2.3.0")
    assert "executed by: ai-edge-litert 2.3.0" in result.stdout
    _refuses_tampered(python, bundles["tflite"], tmp_path, "model.tflite")


def test_onnxruntime(fresh_venv, bundles, tmp_path):
    python = fresh_venv("onnxruntime", "onnxruntime==1.32.0", "numpy", constraints=True)
    _assert_bare(python, tmp_path)
    lab = _lab(bundles["onnx"], tmp_path / "lab.zip")
    _validate(python, lab, tmp_path, "onnx", "onnxruntime", "1.32.0", script=True)  # the edgeq-device console script
    _refuses_tampered(python, bundles["onnx"], tmp_path, "model.onnx")
    # a tampered archive too: the device refuses a member whose bytes do not match the index
    changed = tmp_path / "changed.zip"
    with zipfile.ZipFile(lab) as source, zipfile.ZipFile(changed, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("model.onnx") else data)
    result = run_device(changed, python=python, cwd=tmp_path)
    assert result.returncode == 3 and "model.onnx: sha256" in result.stderr
