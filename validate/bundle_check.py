"""Re-check a bundle: verify checksums, run the golden inputs, compare, hold the budget. numpy + the runtime only.

The one implementation behind `edgeq validate BUNDLE` and the device entry point (`python -m edgeq.device`):
both read the bundle with `read_bundle`, refuse changed files with `verify_checksums` and run it with
`run_bundle` (or all three at once with `check_bundle`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.bundle import read_golden, read_golden_token_outputs
from edgeq.errors import SourceError, UsageError
from edgeq.hashing import sha256_path
from edgeq.validate.budget import Budget, BudgetSyntaxError, parse_budget
from edgeq.validate.check import run_artifact
from edgeq.validate.drift import DriftReport, Status
from edgeq.validate.latency import WARMUP_RUNS, Latency
from edgeq.validate.verdict import Verdict, verdict_of


@dataclass(frozen=True)
class BundleFiles:
    """A bundle as its manifest describes it: the artifact and golden file, and what runs the artifact."""

    path: Path
    manifest: dict
    artifact: Path
    golden: Path
    runtime: str
    settings: dict
    outputs: list[str]

    @property
    def checksums(self) -> dict[Path, str]:
        """The files the manifest records a sha256 for, with that sha256."""
        return {self.artifact: self.manifest["artifact"]["sha256"], self.golden: self.manifest["golden"]["sha256"]}


@dataclass(frozen=True)
class Timing:
    """How to time the artifact after the drift check: `warmup` untimed runs, then `runs` timed ones
    (None: as many as fit in about a second, 10 to 200, as `edgeq convert` does)."""

    warmup: int = WARMUP_RUNS
    runs: int | None = None


@dataclass
class BundleCheck:
    bundle: Path
    manifest: dict
    report: DriftReport
    budget: str
    verdict: Verdict
    violations: list[str] = field(default_factory=list)
    latency: Latency | None = None
    latency_reason: str | None = "not timed"
    seconds: float = 0.0  # wall time of the golden run and comparison (not of the timing runs)

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code


def read_bundle(bundle: Path) -> BundleFiles:
    """Read `bundle/manifest.json`; a folder without one, or with a malformed one, is refused (SourceError)."""
    bundle = Path(bundle)
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise SourceError(f"{bundle}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = BundleFiles(
            path=bundle,
            manifest=manifest,
            artifact=bundle / _plain_name(manifest["artifact"]["file"]),
            golden=bundle / _plain_name(manifest["golden"]["file"]),
            runtime=manifest["target"]["runtime"],
            settings=manifest.get("runtime_settings") or {},
            outputs=list(manifest["signature"]["outputs"]),
        )
        for part in ("artifact", "golden"):
            if not isinstance(manifest[part]["sha256"], str):
                raise TypeError(f"{part}.sha256 is not a string")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{manifest_path}: malformed manifest ({exc})") from exc
    return files


def _plain_name(name: str) -> str:
    """A file name in the bundle folder itself: a manifest never points elsewhere."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a plain name in the bundle folder")
    return name


def verify_checksums(files: BundleFiles) -> None:
    """Refuse (SourceError, exit 3) a bundle whose artifact or golden file is missing or was changed."""
    for path, digest in files.checksums.items():
        if not path.exists():
            raise SourceError(f"{path}: missing from the bundle (its manifest lists it)")
        actual = sha256_path(path)
        if actual != digest:
            raise SourceError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}...: the file was "
                "changed after edgeq wrote it; refusing to validate it"
            )


def bundle_budget(files: BundleFiles, budget_text: str | None = None) -> Budget:
    """`budget_text` (a --budget override) or else the budget the manifest records."""
    if budget_text is not None:
        try:
            return parse_budget(budget_text)
        except BudgetSyntaxError as exc:
            raise UsageError(f"--budget: {exc}") from exc
    try:
        return parse_budget((files.manifest.get("budget") or {}).get("terms", ""))
    except (BudgetSyntaxError, AttributeError) as exc:
        raise SourceError(f"{files.path / 'manifest.json'}: budget.terms: {exc}") from exc


def check_bundle(bundle: Path, budget_text: str | None = None, timing: Timing | None = None) -> BundleCheck:
    """Verify checksums, run the golden inputs, compare with the golden FP32 outputs, hold the budget."""
    files = read_bundle(bundle)
    verify_checksums(files)
    return run_bundle(files, bundle_budget(files, budget_text), timing)


def run_bundle(files: BundleFiles, budget: Budget, timing: Timing | None = None) -> BundleCheck:
    """Run a verified bundle's golden inputs and hold `budget`; with `timing`, time the artifact afterwards.

    A runtime that is not installed raises ValidationError (exit 5), as in `edgeq convert`.
    """
    inputs, references = read_golden(files.golden)
    token_outputs = read_golden_token_outputs(files.golden)  # as convert compared them; none in older bundles
    limits = {} if timing is None else {"warmup": timing.warmup}
    if timing is not None and timing.runs is not None:
        limits.update(min_runs=timing.runs, max_runs=timing.runs)
    # One session for the drift check and the timing: loading is not timed, and the artifact loads once.
    run = run_artifact(files.artifact, files.runtime, files.settings, inputs, references, files.outputs, timed=timing is not None,
                       token_outputs=token_outputs, **limits)
    report = run.report
    violations = budget.violations(report) if report.status == Status.VALIDATED else []
    check = BundleCheck(
        files.path, files.manifest, report, str(budget), verdict_of(report, violations), violations, seconds=run.seconds
    )
    if timing is not None:
        check.latency, check.latency_reason = run.latency, run.latency_reason
    return check
