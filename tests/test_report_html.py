"""report.html: a real run's page (edgeq convert of tiny_convnet, onnx + tflite, fp32 + w8a8) and a page with
per-layer data, checked for escaping, for report.json's documented schema, and in headless Chromium (no
console or page errors, no network, headings present, a screenshot)."""

from __future__ import annotations

import copy
import html
import importlib.util
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.report_html import load_reports, render_html
from tests.conftest import ONNX, TFLITE

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "docs" / "report.schema.json"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


# ---------------------------------------------------------------- fixtures


def _drift(name="logits", cosine=0.99991, sqnr=38.2, top1=1.0):
    return {
        "name": name, "max_abs": 0.0123, "mean_abs": 0.0021, "rel_l2": 0.0123, "sqnr_db": sqnr,
        "cosine": cosine, "cosine_min": 0.9991 if isinstance(cosine, float) else cosine, "top1": top1, "top5": 1.0 if top1 is not None else None,
    }


def layered_report(model="tiny_convnet", target="coreml", precision="w8a8", rows=12, verdict="over_budget") -> dict:
    """A report.json as a Core ML w8a8 run on Linux writes it, with per-layer data (inf, None and NaN
    included), over budget."""
    executor = "edgeq's MIL reference executor (numpy, coremltools 9.0 MIL program)"
    names = [f"encoder.layer.{i // 6}.{part}" for i, part in zip(range(rows), ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"] * rows)]
    layer_rows, previous = [], math.inf
    for i, name in enumerate(names):
        sqnr = 45.0 - 1.3 * i - (9.0 if i in (4, 9) else 0.0)
        layer_rows.append({
            "name": name, "kind": "Linear", "tensor": f"linear_{i}", "sqnr_db": sqnr, "cosine": max(0.0, 1 - 10 ** (-sqnr / 10)),
            "input_sqnr_db": previous, "local_sqnr_db": sqnr + (0.5 if i in (4, 9) else 6.0), "local_method": "isolated",
            "sqnr_lost_db": None if math.isinf(previous) else previous - sqnr, "fused": [],
        })
        previous = sqnr
    layer_rows[0].update(sqnr_db=math.inf, cosine=1.0, local_sqnr_db=math.inf, sqnr_lost_db=None)
    layer_rows[1].update(sqnr_db=None, cosine=None, input_sqnr_db=math.inf, local_sqnr_db=None, sqnr_lost_db=None, local_method="estimated")
    top = [names[4], names[9]] + ([names[-1]] if rows > 10 else [])
    return {
        "model": {"name": model, "task": None, "source": {"kind": "callable", "location": "edgeq.examples:tiny_convnet", "sha256": "ab" * 32}, "parameters": 3530},
        "target": {"id": target, "runtime": "coreml", "hardware": "Apple devices"},
        "precision": precision,
        "artifact": {"file": "model.mlpackage", "sha256": "cd" * 32, "size_bytes": 18234},
        "validation": {
            "status": "validated", "executor": executor, "samples": 8,
            "outputs": [_drift(cosine=0.9981, sqnr=21.4)], "reason": None,
            "data": {"source": "synthetic", "path": None, "samples_found": 16, "samples_used": 16,
                     "split": {"seed": 0, "calibration": 8, "validation": 8}, "preprocess": None, "notes": ["seeded noise"]},
            "latency": None, "latency_reason": "Core ML off macOS is not timed",
            "vs_fp32_artifact": {"status": "validated", "executor": executor, "samples": 8, "outputs": [_drift(cosine=0.9982, sqnr=21.6)], "reason": None},
            "fp32_artifact": {"source": "temporary", "sha256": "ef" * 32, "latency": None, "reason": None,
                              "conversion_drift": {"status": "validated", "executor": executor, "samples": 8, "outputs": [_drift(cosine=1.0, sqnr=math.inf)], "reason": None}},
            "latency_vs_fp32": None,
        },
        "budget": {"terms": "cosine>=0.999", "verdict": verdict, "violations": ["logits: cosine 0.9981 < 0.999"] if verdict == "over_budget" else []},
        "versions": {"edgeq": "0.1.0", "python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0+cpu", "coremltools": "9.0", "runtime": executor},
        "plan": {"scheme": "w8a8", "target": target, "layers": rows, "quantized_layers": rows - 1, "float_layers": [names[0]], "files": ["plan.json", "scales.npz"],
                 "notes": ["activations: int8 per tensor, mse ranges from 8 calibration samples"]},
        "weight_parity": {"checked_layers": rows - 1, "mismatches": [], "missing": [], "removed_as_unused": []},
        "layers": {
            "reference": "FP32 PyTorch", "executor": executor, "samples": 8,
            "rows": layer_rows, "top": top, "unmatched": ["embeddings.dropout"],
            "notes": ["layer tensors are extra outputs of a copy of the graph, run with the artifact's session settings"],
        },
    }


def _write_bundle(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """`edgeq convert` of tiny_convnet for onnx and tflite at fp32 and w8a8: OUT/tiny_convnet/."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(
        main,
        ["convert", "edgeq.examples:tiny_convnet", "-t", "onnx,tflite", "-p", "fp32,w8a8", "--samples", "8",
         "--calibration-samples", "8", "--out", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out / "tiny_convnet", result.output


# ---------------------------------------------------------------- the run's files and the schema


@ONNX
@TFLITE
def test_convert_writes_the_run_reports(real_run):
    model_dir, output = real_run
    html, md = model_dir / "report.html", model_dir / "report.md"
    assert html.is_file() and md.is_file()
    assert str(html) in output and str(md) in output
    page = html.read_text()
    for target in ("onnx", "tflite"):
        for precision in ("fp32", "w8a8"):
            assert f'id="tiny-convnet-{target}-{precision}"' in page
    assert "Conversion drift and quantization drift" in page and "Quantization plans" in page
    assert "SmoothQuant" in page  # the plan's notes travel in report.json
    assert "<code>onnx/w8a8</code>" in page  # bundle paths relative to the page
    summary = md.read_text()
    assert summary.startswith("### edgeq: tiny_convnet") and "| onnx | w8a8 | ✅ passed |" in summary
    assert "| tflite | fp32 | ✅ passed | 1 |" in summary
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp files left


@ONNX
@TFLITE
def test_real_reports_match_the_documented_schema(real_run):
    model_dir, _ = real_run
    schema = json.loads(SCHEMA.read_text())
    files = sorted(model_dir.glob("*/*/report.json"))
    assert len(files) == 4
    for file in files:
        problems = check_schema(json.loads(file.read_text()), schema)
        assert problems == [], f"{file}: {problems}"


def test_per_layer_fixture_matches_the_documented_schema():
    schema = json.loads(SCHEMA.read_text())
    report = json.loads(json.dumps(layered_report()))  # inf -> Infinity -> inf, as a file holds it
    assert check_schema(report, schema) == []
    broken = copy.deepcopy(report)
    del broken["layers"]["rows"][2]["name"]
    broken["budget"]["verdict"] = "fine"
    problems = check_schema(broken, schema)
    assert any("layers.rows[2]" in p and "name" in p for p in problems) and any("budget.verdict" in p for p in problems)


def check_schema(value, schema: dict, root: dict | None = None, where: str = "report") -> list[str]:
    """A small JSON Schema checker: type, enum, required, properties, additionalProperties (schema form),
    items, anyOf, $ref to #/$defs. Enough for docs/report.schema.json, with no extra dependency."""
    root = root or schema
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in schema:
        options = [check_schema(value, option, root, where) for option in schema["anyOf"]]
        if any(not o for o in options):
            return []
        if value is not None and len(options) == 2 and {"type": "null"} in schema["anyOf"]:
            return options[1 - schema["anyOf"].index({"type": "null"})]  # nullable: the non-null form's problems
        return [f"{where}: matches none of anyOf ({'; '.join(min(options, key=len))})"]
    problems = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        checks = {
            "null": value is None, "boolean": isinstance(value, bool), "string": isinstance(value, str),
            "object": isinstance(value, dict), "array": isinstance(value, list),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        }
        if not any(checks[k] for k in kinds):
            return [f"{where}: {type(value).__name__} is not {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        problems += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                problems += check_schema(item, properties[key], root, f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: unexpected {key!r}")
            elif isinstance(extra, dict):
                problems += check_schema(item, extra, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += check_schema(item, schema["items"], root, f"{where}[{index}]")
    return problems


# ---------------------------------------------------------------- rendering


def test_every_text_is_escaped():
    evil = "<script>alert('x')</script>&\"'"
    report = layered_report(model=evil)
    report["validation"]["outputs"][0]["name"] = evil
    report["budget"]["violations"] = [evil]
    report["validation"]["data"]["notes"] = [evil]
    report["layers"]["rows"][4]["name"] = evil
    report["layers"]["top"][0] = evil
    report["plan"]["notes"] = [evil]
    page = render_html([report])
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;&#x27;" in page
    assert "javascript:" not in page.lower()


def test_inf_nan_and_none_render():
    report = layered_report()
    report["validation"]["outputs"] = [_drift("a", cosine=math.nan, sqnr=math.nan, top1=None), _drift("b", cosine=None, sqnr=None), _drift("c", sqnr=math.inf), _drift("d", sqnr="-inf")]
    report["validation"]["latency"] = {"median_ms": None, "p90_ms": "inf", "p99_ms": math.nan, "runs": 0, "warmup": 3, "host": ""}
    page = render_html([report, {"precision": "fp16"}, {}])  # and reports that hold almost nothing
    assert ">inf<" in page and ">NaN<" in page and ">-inf<" in page
    assert "Infinity" not in page and "nan<" not in page


def test_page_is_self_contained():
    page = render_html([layered_report(), layered_report(target="coreml-ane", rows=60, verdict="passed")])
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered and "url(" not in lowered
    assert "src=" not in lowered
    hrefs = [chunk.split('"', 1)[0] for chunk in page.split('href="')[1:]]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"] * page.count("<svg ")  # a namespace, not a fetch
    text = html.unescape(page)
    assert "edgeq's MIL reference executor (numpy" in text and "not Apple's Core ML runtime" in text
    assert page.count("<title") >= 3  # the page and each plot have a title


def test_report_command_renders_existing_bundles(tmp_path):
    _write_bundle(tmp_path / "out" / "m" / "coreml" / "w8a8.rejected", layered_report(model="m"))
    _write_bundle(tmp_path / "out" / "m" / "coreml" / ".w8a8.staging-x", {"model": {"name": "half"}})  # skipped
    html_file, md_file = tmp_path / "r.html", tmp_path / "r.md"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "out" / "m"), "--html", str(html_file), "--markdown", str(md_file)])
    assert result.exit_code == 0, result.output
    assert str(html_file) in result.output and str(md_file) in result.output
    assert "over budget" in html_file.read_text() and "half" not in html_file.read_text()
    assert "| coreml | w8a8 | ❌ over_budget |" in md_file.read_text()
    default = CliRunner().invoke(main, ["report", str(tmp_path / "out" / "m" / "coreml" / "w8a8.rejected")])
    assert default.exit_code == 0, default.output
    assert (tmp_path / "out" / "m" / "coreml" / "w8a8.rejected" / "report.html").is_file()
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 3 and "nothing" in missing.output


# ---------------------------------------------------------------- in a browser


def _chromium() -> str:
    """The Chromium to drive: $EDGEQ_CHROMIUM, /usr/bin/chromium or one on PATH. Missing: skip locally,
    fail on CI (CI installs everything)."""
    reason = None
    if importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed (pip install -c constraints.txt -e '.[dev]')"
    candidates = [os.environ.get("EDGEQ_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    path = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if reason is None and path is None:
        reason = "no Chromium: set EDGEQ_CHROMIUM or install chromium (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _open_in_chromium(pages: list[Path], shots: Path) -> dict[Path, dict]:
    from playwright.sync_api import sync_playwright

    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            for file in pages:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors, external, failed = [], [], []
                page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
                page.on("requestfailed", lambda r, failed=failed: failed.append(r.url))
                page.on("request", lambda r, external=external: not r.url.startswith(("file:", "data:", "about:")) and external.append(r.url))
                page.goto(file.as_uri(), wait_until="load")
                headings = [h.strip() for h in page.locator("h1, h2").all_inner_texts()]
                shot = shots / f"{file.parent.name}-{file.stem}.png"
                page.screenshot(path=str(shot), full_page=True)
                seen[file] = {"errors": errors, "external": external, "failed": failed, "headings": headings, "shot": shot}
                page.close()
        finally:
            browser.close()
    return seen


@ONNX
@TFLITE
def test_pages_render_in_chromium(real_run, tmp_path):
    model_dir, _ = real_run
    layered = tmp_path / "layered"
    layered.mkdir()
    reports = [layered_report(), layered_report(target="coreml-ane", precision="int8-weight", rows=60, verdict="passed"), *load_reports([model_dir])]
    (layered / "report.html").write_text(render_html(reports))
    shots = Path(os.environ.get("EDGEQ_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    seen = _open_in_chromium([model_dir / "report.html", layered / "report.html"], shots)
    for file, found in seen.items():
        assert found["errors"] == [] and found["failed"] == [] and found["external"] == [], (file, found)
        assert found["headings"][0] == "edgeq report: tiny_convnet"
        for heading in ("Summary", "Drift per output", "Conversion drift and quantization drift", "Quantization plans", "Validation data", "Who ran each artifact"):
            assert heading in found["headings"], (file, found["headings"])
        data = found["shot"].read_bytes()
        width, height = _png_size(data)
        assert len(data) > 20_000 and width == 1280 and 900 <= height <= 20_000, (found["shot"], width, height)
    assert "Per-layer drift" in seen[layered / "report.html"]["headings"]
    assert "Per-layer drift" not in seen[model_dir / "report.html"]["headings"]


def test_a_missing_chromium_skips_locally_and_fails_on_ci(monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # no executable anywhere
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        _chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        _chromium()


def test_plan_counts_every_weight_and_names_the_float_ones():
    report = layered_report()
    report["plan"].update(weights=7, quantized_weights=5, quantized_weight_share=0.9512,
                          other_weights={"deconv.weight": "transposed convolution: float"}, float_layers=["head"])
    page = render_html([report])
    assert "5 of 7 (95.1% of the parameter bytes)" in page
    assert "deconv.weight (transposed convolution: float)" in page and "head" in page
