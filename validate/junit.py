"""JUnit XML for a lab's CI: one test case per artifact output, failed when it breaks its budget; one
testsuite per artifact.

Standard library only, like the rest of what a device runs: CI systems (GitLab, Jenkins, GitHub test
reporters) read this schema, so a device lab sees drift per output as ordinary test results.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.validate.drift import DriftReport, Status


@dataclass
class Suite:
    """One validated artifact as a JUnit testsuite; `properties` (latency, sha256, ...) go in <properties>."""

    name: str
    report: DriftReport
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    properties: dict[str, str] = field(default_factory=dict)


def junit_xml(suite: str, report: DriftReport, violations: list[str], seconds: float = 0.0) -> str:
    """The JUnit XML text for one validated artifact: a case per output; a skipped case when it did not run."""
    return junit_suites_xml([Suite(suite, report, violations, seconds)])


def junit_suites_xml(suites: list[Suite]) -> str:
    """The JUnit XML text for several artifacts (the bundles of a lab archive): one testsuite each."""
    root = ET.Element("testsuites")
    for suite in suites:
        root.append(_testsuite(suite))
    for total in ("tests", "failures", "errors", "skipped"):
        root.set(total, str(sum(int(node.get(total)) for node in root)))
    root.set("time", f"{sum(suite.seconds for suite in suites):.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _testsuite(suite: Suite) -> ET.Element:
    report, violations, seconds = suite.report, suite.violations, suite.seconds
    cases = []
    if report.status == Status.VALIDATED:
        for output in report.outputs:
            case = ET.Element("testcase", classname=suite.name, name=f"output {output.name}", time=f"{seconds:.3f}")
            broken = [line for line in violations if line.startswith(f"output {output.name!r}:")]
            if broken:
                failure = ET.SubElement(case, "failure", message=broken[0], type="over_budget")
                failure.text = "\n".join(broken)
            ET.SubElement(case, "system-out").text = (
                f"cosine {output.cosine:.7f} (min {output.cosine_min:.7f}), SQNR {output.sqnr_db:.2f} dB, "
                f"max abs {output.max_abs:.3g}; executor {report.executor}; {report.samples} samples"
                + (f"; {note}" if (note := output.positions_note()) else "")
            )
            cases.append(case)
    else:
        case = ET.Element("testcase", classname=suite.name, name="artifact", time=f"{seconds:.3f}")
        kind = "skipped" if report.status == Status.NOT_EXECUTED else "error"
        ET.SubElement(case, kind, message=report.reason or report.status)
        cases.append(case)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    errors = sum(1 for c in cases if c.find("error") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    node = ET.Element(
        "testsuite", name=suite.name, tests=str(len(cases)), failures=str(failures), errors=str(errors),
        skipped=str(skipped), time=f"{seconds:.3f}",
    )
    if suite.properties:
        properties = ET.SubElement(node, "properties")
        for key, value in suite.properties.items():
            ET.SubElement(properties, "property", name=key, value=str(value))
    node.extend(cases)
    return node


def write_junit(path: Path, suite: str, report: DriftReport, violations: list[str], seconds: float = 0.0) -> None:
    Path(path).write_text(junit_xml(suite, report, violations, seconds))
