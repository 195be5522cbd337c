"""JUnit XML for device labs: a case per output, failures for budget breaks, skips for runtimes that cannot run."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from edgeq.validate.budget import parse_budget
from edgeq.validate.drift import DriftReport, Status, compare
from edgeq.validate.junit import Suite, junit_suites_xml, junit_xml


def _report(noise: float) -> DriftReport:
    rng = np.random.default_rng(0)
    reference = [{"logits": rng.standard_normal(10), "features": rng.standard_normal(8)} for _ in range(4)]
    candidate = [{"logits": r["logits"], "features": r["features"] + noise * rng.standard_normal(8)} for r in reference]
    return compare(reference, candidate, ["logits", "features"], "onnxruntime 1.32 CPUExecutionProvider")


def test_each_output_is_a_case_and_a_budget_break_is_a_failure():
    report = _report(noise=1.0)
    violations = parse_budget("cosine>=0.99").violations(report)
    suite = ET.fromstring(junit_xml("tiny_mlp onnx int8-dynamic", report, violations, 1.5)).find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("errors") == "0"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["output logits"].find("failure") is None
    failure = cases["output features"].find("failure")
    assert failure is not None and "cosine" in failure.get("message")
    assert "SQNR" in cases["output logits"].find("system-out").text


def test_a_runtime_that_cannot_run_is_skipped_not_passed():
    report = DriftReport(Status.NOT_EXECUTED, executor="none", reason="Core ML prediction runs only on macOS")
    suite = ET.fromstring(junit_xml("m coreml fp16", report, [])).find("testsuite")
    assert suite.get("skipped") == "1" and suite.find("testcase/skipped").get("message").startswith("Core ML")
    failed = DriftReport(Status.ERROR, executor="litert", reason="Didn't find op for builtin opcode")
    assert ET.fromstring(junit_xml("m tflite", failed, [])).find("testsuite").get("errors") == "1"


def test_several_artifacts_are_several_testsuites_with_totals_and_properties():
    failed = DriftReport(Status.ERROR, executor="none", reason="refused: model.onnx: sha256 does not match")
    suites = [
        Suite("m/onnx/fp32", _report(noise=0.0), [], 0.5, {"latency_p50_ms": "0.05"}),
        Suite("m/tflite/fp32", _report(noise=1.0), parse_budget("cosine>=0.99").violations(_report(noise=1.0)), 0.25),
        Suite("m/onnx/fp16", failed),
    ]
    root = ET.fromstring(junit_suites_xml(suites))
    assert [s.get("name") for s in root.findall("testsuite")] == ["m/onnx/fp32", "m/tflite/fp32", "m/onnx/fp16"]
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("time")) == ("5", "1", "1", "0.750")
    first = root.find("testsuite")
    assert first.find("properties/property").attrib == {"name": "latency_p50_ms", "value": "0.05"}
    assert root.findall("testsuite")[1].find("properties") is None
    assert root.findall("testsuite")[2].find("testcase/error").get("message").startswith("refused")
