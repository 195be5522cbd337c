"""Atomic bundles: a failure mid-conversion leaves the previous bundle intact and no half bundle behind."""

from __future__ import annotations

import json

import pytest

from edgeq.bundle import publish, staging
from edgeq.manifest import without_timings
from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX
from tests.helpers import convert_source


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@ONNX
def test_failure_mid_conversion_keeps_the_previous_bundle(tmp_path, monkeypatch):
    first = convert_source("edgeq.examples:tiny_mlp", "onnx", "fp32", tmp_path)
    assert first.verdict == Verdict.PASSED
    before = _snapshot(first.path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing golden.npz")

    monkeypatch.setattr("edgeq.pipeline.write_golden", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_source("edgeq.examples:tiny_mlp", "onnx", "fp32", tmp_path)
    assert _snapshot(first.path) == before
    leftovers = [p.name for p in first.path.parent.iterdir() if p.name != "fp32"]
    assert leftovers == [], f"staging folders left behind: {leftovers}"


@ONNX
def test_failed_conversion_never_replaces_a_good_bundle(tmp_path, monkeypatch):
    first = convert_source("edgeq.examples:tiny_mlp", "onnx", "fp32", tmp_path)
    before = _snapshot(first.path)

    def refuse(self, request, dest):
        dest.write_bytes(b"half an artifact")
        from edgeq.errors import ConversionError

        raise ConversionError("target onnx: simulated exporter failure")

    monkeypatch.setattr("edgeq.converters.onnx.OnnxConverter.convert", refuse)
    second = convert_source("edgeq.examples:tiny_mlp", "onnx", "fp32", tmp_path)
    assert second.verdict == Verdict.CONVERSION_FAILED and "simulated" in second.error
    assert _snapshot(first.path) == before
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["fp32"]


@ONNX
def test_reruns_are_deterministic(tmp_path):
    a = convert_source("edgeq.examples:tiny_convnet", "onnx", "fp32", tmp_path / "a")
    b = convert_source("edgeq.examples:tiny_convnet", "onnx", "fp32", tmp_path / "b")
    manifest_a = json.loads((a.path / "manifest.json").read_text())
    manifest_b = json.loads((b.path / "manifest.json").read_text())
    assert manifest_a["artifact"]["sha256"] == manifest_b["artifact"]["sha256"]
    assert manifest_a["validation"]["latency"]["runs"] >= 10  # timed: the one part a rerun does not repeat
    assert without_timings(manifest_a) == without_timings(manifest_b)


def test_publish_replaces_only_a_complete_bundle(tmp_path):
    dest = tmp_path / "m" / "onnx" / "fp32"
    with staging(dest) as stage:
        (stage / "a").write_text("1")
    publish(stage, dest)
    with staging(dest) as stage:
        (stage / "a").write_text("2")
    publish(stage, dest)
    assert (dest / "a").read_text() == "2"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fp32"]
