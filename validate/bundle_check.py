"""`edgeq validate BUNDLE`: re-run a bundle's artifact on its golden inputs. numpy + the runtime only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.bundle import read_golden
from edgeq.errors import SourceError, UsageError
from edgeq.hashing import sha256_path
from edgeq.validate.budget import BudgetSyntaxError, parse_budget
from edgeq.validate.check import run_and_compare
from edgeq.validate.drift import DriftReport, Status
from edgeq.validate.verdict import Verdict, verdict_of


@dataclass
class BundleCheck:
    bundle: Path
    manifest: dict
    report: DriftReport
    budget: str
    verdict: Verdict
    violations: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code


def check_bundle(bundle: Path, budget_text: str | None = None) -> BundleCheck:
    """Verify checksums, run the golden inputs, compare with the golden FP32 outputs, hold the budget."""
    bundle = Path(bundle)
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise SourceError(f"{bundle}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        artifact = bundle / manifest["artifact"]["file"]
        golden = bundle / manifest["golden"]["file"]
        expected = {artifact: manifest["artifact"]["sha256"], golden: manifest["golden"]["sha256"]}
        runtime = manifest["target"]["runtime"]
        settings = manifest.get("runtime_settings", {})
        outputs = manifest["signature"]["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SourceError(f"{manifest_path}: malformed manifest ({exc})") from exc
    for path, digest in expected.items():
        if not path.exists():
            raise SourceError(f"{bundle}: {path.name} is missing")
        actual = sha256_path(path)
        if actual != digest:
            raise SourceError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}...: the file was "
                "changed after edgeq wrote it; refusing to validate it"
            )
    try:
        budget = parse_budget(budget_text if budget_text is not None else manifest.get("budget", {}).get("terms", ""))
    except BudgetSyntaxError as exc:
        raise UsageError(f"--budget: {exc}") from exc
    inputs, references = read_golden(golden)
    report, _ = run_and_compare(artifact, runtime, settings, inputs, references, outputs)
    violations = budget.violations(report) if report.status == Status.VALIDATED else []
    return BundleCheck(bundle, manifest, report, str(budget), verdict_of(report, violations), violations)
