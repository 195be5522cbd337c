"""Latency beside drift, and quantized artifacts held against their target's FP32 artifact."""

from __future__ import annotations

import json

import numpy as np

import pytest

from edgeq.validate.latency import measure, speed_summary, summarize
from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX
from tests.test_cli import run


def test_percentiles_of_a_known_timing_sequence():
    seconds = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    latency = summarize(seconds, warmup=3)
    assert (latency.median_ms, latency.p90_ms, latency.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert latency.runs == 100 and latency.warmup == 3
    assert set(latency.to_json()) == {"median_ms", "p90_ms", "p99_ms", "runs", "warmup", "host", "threads", "interleaved_with"}
    with pytest.raises(ValueError):
        summarize([], warmup=0)


def _fake_clock(step_s: float):
    """A clock that advances `step_s` per reading: each timed call takes exactly `step_s`."""
    now = [0.0]

    def clock():
        now[0] += step_s
        return now[0]

    return clock


def test_timed_runs_adapt_to_the_artifact_speed():
    calls = []
    slow = measure(lambda: calls.append(1), clock=_fake_clock(0.5))  # 0.5 s a run: the 10-run floor
    assert slow.runs == 10 and len(calls) == 3 + 10 and slow.median_ms == pytest.approx(500)
    medium = measure(lambda: None, clock=_fake_clock(0.02))  # stop once 1 s is spent
    assert medium.runs == 50
    fast = measure(lambda: None, clock=_fake_clock(1e-5))  # the 200-run ceiling
    assert fast.runs == 200


def test_interleaved_rounds_alternate_and_stop_together():
    from edgeq.validate.latency import measure_interleaved

    order = []
    first, second = measure_interleaved([lambda: order.append("a"), lambda: order.append("b")], labels=["b", "a"],
                                        warmup=1, clock=_fake_clock(0.1), threads=1)
    assert order[:2] == ["a", "b"] and order[2:6] == ["a", "b", "b", "a"]  # warm-up each, then rounds, order flipped
    assert first.runs == second.runs == 10 and first.interleaved_with == "b" and second.threads == 1
    assert first.method == "1 thread, warm, interleaved with b"


def test_interleaved_rounds_of_several_calls_change_neighbours():
    from edgeq.validate.latency import measure_interleaved

    order = []
    measure_interleaved([lambda name=name: order.append(name) for name in "abc"], warmup=0, clock=_fake_clock(0.1))
    rounds = [tuple(order[i:i + 3]) for i in range(0, len(order), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every call once a round
    followers = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert len(set(rounds)) > 2 and {("a", "b"), ("b", "a")} <= followers  # not one fixed or merely reversed order


def test_speed_is_said_in_words():
    assert speed_summary(0.5) == "2.0x faster than FP32"
    assert speed_summary(1.4) == "0.7x: slower than FP32 on this machine"
    assert "no faster" in speed_summary(1.02)
    assert speed_summary(None) == "-"


def _convert(tmp_path, precisions: str):
    result = run(
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", precisions, "--out", str(tmp_path), "--samples", "4"
    )
    assert result.exit_code == 0, result.output
    return result


def _validation(tmp_path, precision: str) -> dict:
    return json.loads((tmp_path / "tiny_mlp" / "onnx" / precision / "manifest.json").read_text())["validation"]


@ONNX
def test_fp16_alone_is_held_against_a_temporary_fp32_artifact(tmp_path):
    result = _convert(tmp_path, "fp16")
    assert sorted(p.name for p in (tmp_path / "tiny_mlp" / "onnx").iterdir()) == ["fp16"]  # no fp32 published

    validation = _validation(tmp_path, "fp16")
    assert validation["latency"]["runs"] >= 10 and validation["latency"]["median_ms"] > 0
    assert validation["latency_reason"] is None
    fp32 = validation["fp32_artifact"]
    assert fp32["source"] == "temporary" and fp32["reason"] is None and fp32["latency"]["runs"] >= 10
    assert fp32["conversion_drift"]["outputs"][0]["cosine"] > 0.99999  # the exporter and runtime alone
    quantization = validation["vs_fp32_artifact"]
    assert quantization["status"] == "validated" and quantization["samples"] == 4
    assert quantization["outputs"][0]["cosine"] > 0.9999  # fp16 against the FP32 artifact: tiny
    assert validation["latency_vs_fp32"] > 0
    report = json.loads((tmp_path / "tiny_mlp" / "onnx" / "fp16" / "report.json").read_text())
    assert report["validation"]["vs_fp32_artifact"] == quantization
    assert validation["latency"]["threads"] == 1 and validation["latency"]["interleaved_with"] == "the FP32 artifact"
    assert fp32["latency"]["interleaved_with"] == "the quantized artifact" and fp32["latency"]["runs"] == validation["latency"]["runs"]
    assert validation["speed_vs_fp32"].startswith(f"{1 / validation['latency_vs_fp32']:.1f}x")
    text = " ".join(result.output.split())
    assert "art. cos" in text and "for FP32 (medians; 1 thread, warm, interleaved with the FP32 artifact)" in text


@ONNX
def test_requested_fp32_is_converted_first_and_reused(tmp_path):
    _convert(tmp_path, "fp16,fp32")
    fp32, fp16 = _validation(tmp_path, "fp32"), _validation(tmp_path, "fp16")
    assert fp32["vs_fp32_artifact"] is None and fp32["fp32_artifact"] is None and fp32["latency"]["runs"] >= 10
    reference = fp16["fp32_artifact"]
    assert reference["source"] == "bundle"  # the fp32 bundle's outputs, not a second FP32 conversion
    manifest = json.loads((tmp_path / "tiny_mlp" / "onnx" / "fp32" / "manifest.json").read_text())
    assert reference["sha256"] == manifest["artifact"]["sha256"]
    assert reference["conversion_drift"] == {k: fp32[k] for k in reference["conversion_drift"]}
    # timed again beside fp16, round by round (the fp32 bundle's own figure was measured alone, earlier)
    assert reference["latency"]["interleaved_with"] == "the quantized artifact" and fp32["latency"]["interleaved_with"] is None
    assert fp32["latency"]["threads"] == reference["latency"]["threads"] == 1
    assert fp16["vs_fp32_artifact"]["outputs"][0]["cosine"] > 0.9999


@ONNX
def test_fp32_comes_first_whatever_the_order_asked(tmp_path):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert

    steps = []
    options = ConvertOptions(targets=["onnx"], out=tmp_path, precisions=["fp16", "fp32"], samples=2)
    outcomes = convert(load_model("edgeq.examples:tiny_mlp"), options, on_step=steps.append)
    assert [o.precision for o in outcomes] == ["fp32", "fp16"]
    assert all(o.verdict == Verdict.PASSED for o in outcomes)
    assert not any("temporary FP32" in step for step in steps)
    assert outcomes[1].quantization.fp32.source == "bundle" and outcomes[1].quantization.latency_ratio > 0


@ONNX
def test_a_failing_fp32_helper_does_not_sink_the_quantized_artifact(tmp_path, monkeypatch):
    from edgeq.converters.onnx import OnnxConverter
    from edgeq.errors import ConversionError
    from tests.helpers import convert_source

    original = OnnxConverter.convert

    def fp32_fails(self, request, dest):
        if request.precision == "fp32":
            raise ConversionError("target onnx: simulated exporter failure on the FP32 helper")
        return original(self, request, dest)

    monkeypatch.setattr(OnnxConverter, "convert", fp32_fails)
    outcome = convert_source("edgeq.examples:tiny_mlp", "onnx", "fp16", tmp_path)
    assert outcome.verdict == Verdict.PASSED and outcome.latency is not None
    validation = json.loads((outcome.path / "manifest.json").read_text())["validation"]
    assert validation["vs_fp32_artifact"]["status"] == "error"
    assert "simulated exporter failure" in validation["vs_fp32_artifact"]["reason"]
    assert "simulated exporter failure" in validation["fp32_artifact"]["reason"]
    assert validation["latency_vs_fp32"] is None and validation["latency"]["runs"] >= 10


def test_a_padded_timing_sample_is_named_with_its_figure():
    """A padded sample's real length is part of what was timed (graphs that skip padded keys run it faster)."""
    from edgeq.validate.latency import Latency, describe_sample

    assert describe_sample({"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.array([[1, 1, 1, 0]])}) == "3 of 4 positions real tokens"
    assert describe_sample({"attention_mask": np.ones((1, 4), np.int64)}) is None  # nothing padded: nothing to say
    assert describe_sample({"pixels": np.zeros((1, 3, 8, 8), np.float32)}) is None
    timed = Latency(1.0, 1.1, 1.2, 10, 3, "host", 1, "the FP32 artifact", "3 of 4 positions real tokens")
    assert timed.method == "1 thread, warm, interleaved with the FP32 artifact, 3 of 4 positions real tokens"
    assert timed.to_json()["sample"] == "3 of 4 positions real tokens" and "sample" not in Latency(1.0, 1.1, 1.2, 10, 3).to_json()
