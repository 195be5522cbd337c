"""report.md: the CI-comment summary (table shape, violations, top offending layers, inf/NaN/None, escaping)."""

from __future__ import annotations

import math
import re

from edgeq.report_markdown import cell, render_markdown
from tests.test_report_html import layered_report


def _cells(line: str) -> list[str]:
    """The cells of a GFM table row, honouring escaped pipes."""
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def _table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [_cells(line) for line in rows]


def _fp32(report: dict) -> dict:
    fp32 = layered_report(precision="fp32", verdict="passed")
    fp32.update(layers=None, plan=None)
    fp32["artifact"]["size_bytes"] = report["artifact"]["size_bytes"] * 4
    fp32["validation"]["latency"] = {"median_ms": 2.0, "p90_ms": 2.5, "p99_ms": 3.0, "runs": 50, "warmup": 3, "host": "x"}
    return fp32


def test_one_table_row_per_artifact_with_the_columns_ci_reads():
    quantized = layered_report()
    quantized["validation"]["latency"] = {"median_ms": 4.0, "p90_ms": 5.0, "p99_ms": 6.0, "runs": 50, "warmup": 3, "host": "x"}
    quantized["validation"]["latency_vs_fp32"] = 2.0
    text = render_markdown([quantized, _fp32(quantized)])
    assert text.startswith("### edgeq: tiny_convnet\n")
    table = _table(text)
    head, rule, *rows = table
    assert head == ["target", "precision", "verdict", "worst cosine", "worst SQNR dB", "size", "p50 ms", "vs FP32"]
    assert all(len(row) == len(head) for row in table)
    assert [row[:3] for row in rows] == [["coreml", "fp32", "✅ passed"], ["coreml", "w8a8", "❌ over_budget"]]  # fp32 first
    assert rows[1][3:] == ["0.9981", "21.4", "18.2 kB", "4", "0.5x: slower than FP32 on this machine, 0.25x size"]
    assert rows[0][7] == "-"


def test_violations_reasons_and_top_three_layers_follow_the_table():
    report = layered_report(rows=20)
    report["layers"]["top"] = [r["name"] for r in report["layers"]["rows"][2:7]]
    text = render_markdown([report])
    details = text.split("\n\n", 2)[2]
    assert "**coreml w8a8**" in details
    assert "- over budget: logits: cosine 0.9981 &lt; 0.999" in details
    assert "not Apple's Core ML runtime" in details
    listed = re.findall(r"^  \d\. `([^`]+)`", details, flags=re.M)
    assert listed == report["layers"]["top"][:3]
    assert "`encoder.layer.0.attention.self.value` (Linear): adds noise at 48.4 dB SQNR, layer SQNR 42.4 dB, 1.3 dB lost" in details


def test_inf_nan_and_none_never_break_the_table():
    report = layered_report(verdict="passed")
    report["layers"] = None
    report["validation"]["outputs"] = [
        {"name": "a", "cosine": None, "sqnr_db": "inf", "cosine_min": None},
        {"name": "b", "cosine": math.inf, "sqnr_db": math.inf},
    ]
    nan = layered_report(target="onnx", verdict="passed")
    nan["validation"]["outputs"][0].update(cosine=math.nan, sqnr_db=float("nan"))
    nan["validation"]["latency"] = {"median_ms": None}
    nan["validation"]["latency_vs_fp32"] = "inf"
    empty = {"target": {"id": "tflite"}, "precision": "w8a8", "budget": {"verdict": "conversion_failed", "violations": []},
             "error": "target tflite refuses w8a8:\n  - features.7: depthwise | int16"}
    table = _table(render_markdown([report, nan, empty, {}]))
    assert all(len(row) == 8 for row in table)
    by_target = {row[0]: row for row in table[2:]}
    assert by_target["coreml"][3:5] == ["inf", "inf"]
    assert by_target["onnx"][3:5] == ["NaN", "NaN"] and by_target["onnx"][6:] == ["-", "-"]
    assert by_target["tflite"][2:] == ["❌ conversion_failed", "-", "-", "-", "-", "-"]
    text = render_markdown([empty])
    assert "- target tflite refuses w8a8: - features.7: depthwise \\| int16" in text


def test_cells_escape_pipes_and_html():
    assert cell("a|b") == "a\\|b"
    assert cell("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert cell("two\nlines") == "two lines" and cell(None) == "-"
    report = layered_report(model="m|<b>")
    report["validation"]["outputs"][0]["name"] = "x|y"
    text = render_markdown([report])
    assert "<b>" not in text and "### edgeq: m\\|&lt;b&gt;" in text
    assert all(len(row) == 8 for row in _table(text))
