"""What a device run found, per bundle, and the files it writes: `--json` (documented in the README's
"Device labs" section) and `--junit` (one testsuite per bundle, one test case per output; for a text-generation
bundle one per prompt, with its continuation in `generation`)."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.device.generate import GENERATION_FILE, GenerationResult
from edgeq.device.memory import MemoryUse
from edgeq.errors import EdgeqError
from edgeq.validate.bundle_check import BundleCheck
from edgeq.validate.drift import DriftReport, Status
from edgeq.validate.junit import Suite, junit_suites_xml
from edgeq.validate.latency import host_description

RESULT_SCHEMA = 1
REFUSED = "refused"  # the bundle's files do not match its manifest (or it has none): exit 3
_OVERALL = {3: REFUSED, 5: "validation_failed", 6: "over_budget"}


@dataclass
class BundleRun:
    """One bundle on this device: refused before running (`refused` says why), or checked (`check`)."""

    name: str  # model/target/folder, as in the lab archive's index
    path: str  # where it came from: a folder, or ARCHIVE:model/target/precision
    manifest: dict
    runtime: dict  # runtime.runtime_package(): name, package, version
    budget_source: str  # "manifest", "--budget", or "default" (a text-generation bundle: generate.DEFAULT_BUDGET)
    check: BundleCheck | None = None
    refused: str | None = None
    memory: MemoryUse | None = None
    text_generation: bool = False  # its manifest says task text-generation (edgeq/device/generate.py)
    generation: GenerationResult | None = None  # its greedy loop, when it ran

    @property
    def verdict(self) -> str:
        return REFUSED if self.check is None else self.check.verdict.value

    @property
    def exit_code(self) -> int:
        return 3 if self.check is None else self.check.exit_code

    @property
    def report(self) -> DriftReport:
        if self.check is None:
            return DriftReport(Status.ERROR, executor="none", reason=f"refused: {self.refused}")
        return self.check.report


def exit_code(runs: list[BundleRun]) -> int:
    """A refused bundle (3) outranks a runtime that could not run (5), which outranks over budget (6)."""
    codes = {run.exit_code for run in runs} - {0}
    return next((code for code in (3, 5, 6) if code in codes), 0)


def overall_verdict(runs: list[BundleRun]) -> str:
    code = exit_code(runs)
    if code:
        return _OVERALL[code]
    return "passed" if all(run.verdict == "passed" for run in runs) else "not_validated"


def host() -> dict:
    return {
        "description": host_description(),
        "system": platform.system(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def latency_json(check: BundleCheck | None) -> dict | None:
    if check is None or check.latency is None:
        return None
    latency = check.latency
    return {"p50_ms": latency.median_ms, "p90_ms": latency.p90_ms, "p99_ms": latency.p99_ms, "runs": latency.runs, "warmup": latency.warmup,
            "threads": latency.threads}


def bundle_json(run: BundleRun) -> dict:
    manifest, check, report = run.manifest, run.check, run.report
    artifact, golden = manifest.get("artifact") or {}, manifest.get("golden") or {}
    model, target = manifest.get("model"), manifest.get("target")
    if run.text_generation:  # its manifest: model and target as plain strings, the golden in generation.json
        golden = manifest.get("generation") or {"file": GENERATION_FILE}
        model, target = run.name.split("/")[0], {"id": target}
    return {
        "bundle": run.name,
        "path": run.path,
        "task": "text-generation" if run.text_generation else None,
        "model": model if isinstance(model, str) else (model or {}).get("name"),
        "target": (target or {}).get("id"),
        "precision": manifest.get("precision"),
        "artifact": {"file": artifact.get("file"), "sha256": artifact.get("sha256"), "verified": check is not None},
        "golden": {"file": golden.get("file"), "sha256": golden.get("sha256"), "verified": check is not None},
        "runtime": run.runtime,
        "executor": report.executor,
        "status": REFUSED if check is None else report.status,
        "reason": report.reason,
        "samples": report.samples,
        "drift": report.to_json()["outputs"],
        "budget": {
            "terms": check.budget if check is not None else (manifest.get("budget") or {}).get("terms"),
            "source": run.budget_source,
        },
        "verdict": run.verdict,
        "violations": [] if check is None else list(check.violations),
        "latency": latency_json(check),
        "latency_reason": None if check is None else check.latency_reason,
        "memory": None if run.memory is None else run.memory.to_json(),
        "seconds": None if check is None else round(check.seconds, 4),
        "generation": None if run.generation is None else run.generation.to_json(),
    }


def result_json(source: Path, runs: list[BundleRun], error: EdgeqError | None = None) -> dict:
    """The --json document; `error`: BUNDLE itself was refused (e.g. a path traversal), so no bundle ran."""
    return {
        "schema": RESULT_SCHEMA,
        "tool": "edgeq.device",
        "edgeq": _edgeq_version(),
        "source": str(source),
        "host": host(),
        "verdict": overall_verdict(runs) if error is None else REFUSED,
        "exit_code": exit_code(runs) if error is None else error.exit_code,
        "error": None if error is None else str(error),
        "bundles": [bundle_json(run) for run in runs],
    }


def junit_text(runs: list[BundleRun], refused: tuple[str, str] | None = None) -> str:
    """One testsuite per bundle; `refused` (name, why): BUNDLE itself was refused, one suite with an error."""
    suites = [_suite(run) for run in runs]
    if refused is not None:
        name, why = refused
        suites.append(Suite(name, DriftReport(Status.ERROR, executor="none", reason=f"refused: {why}")))
    if all(run.generation is None for run in runs):
        return junit_suites_xml(suites)
    # a text-generation bundle that ran has a case per prompt; the rest as validate/junit.py writes them
    root = ET.Element("testsuites")
    for index, suite in enumerate(suites):
        generation = runs[index].generation if index < len(runs) else None
        root.append(ET.fromstring(junit_suites_xml([suite]))[0] if generation is None else _generation_suite(suite, generation))
    for total in ("tests", "failures", "errors", "skipped"):
        root.set(total, str(sum(int(node.get(total)) for node in root)))
    root.set("time", f"{sum(suite.seconds for suite in suites):.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _generation_suite(suite: Suite, generation: GenerationResult) -> ET.Element:
    """A testsuite with one case per prompt: failed when it left the golden and the bundle is over budget."""
    over = bool(suite.violations)
    node = ET.Element("testsuite", name=suite.name, tests=str(len(generation.prompts)), errors="0", skipped="0",
                      time=f"{suite.seconds:.3f}")
    properties = ET.SubElement(node, "properties")
    figures = {**generation.metrics(), **generation.speed()}
    for key, value in {**suite.properties, **{k: v for k, v in figures.items() if v is not None}}.items():
        ET.SubElement(properties, "property", name=key, value=str(value))
    failures = 0
    for prompt in generation.prompts:
        case = ET.SubElement(node, "testcase", classname=suite.name, name=f"prompt {prompt.index}",
                             time=f"{prompt.prefill_s + prompt.decode_s:.3f}")
        said = (f"{prompt.matched} of {len(prompt.golden)} golden tokens before the first difference; against FP32 "
                f"{prompt.fp32_matched} of {len(prompt.fp32)}; device tokens {prompt.tokens}")
        if over and not prompt.equal:
            failures += 1
            ET.SubElement(case, "failure", message=f"left the golden continuation at token {prompt.matched}",
                          type="over_budget").text = "\n".join(suite.violations)
        ET.SubElement(case, "system-out").text = said
    node.set("failures", str(failures))
    return node


def _suite(run: BundleRun) -> Suite:
    check = run.check
    properties = {
        "artifact_sha256": (run.manifest.get("artifact") or {}).get("sha256", ""),
        "runtime": run.runtime["name"],
        "runtime_package": f"{run.runtime['package']} {run.runtime['version']}" if run.runtime["package"] else "not installed",
        "executor": run.report.executor,
        "verdict": run.verdict,
    }
    if check is not None:
        properties["budget"] = check.budget or "none"
    for key, value in (latency_json(check) or {}).items():
        if value is not None:  # threads: None where the runtime takes no thread count (Core ML)
            properties[f"latency_{key}"] = value
    if run.memory is not None:
        for key in ("peak_rss_bytes", "rss_increase_bytes"):
            if getattr(run.memory, key) is not None:
                properties[key] = getattr(run.memory, key)
    return Suite(
        run.name, run.report, [] if check is None else check.violations, 0.0 if check is None else check.seconds,
        {key: str(value) for key, value in properties.items()},
    )


def _edgeq_version() -> str:
    import edgeq

    return edgeq.__version__
