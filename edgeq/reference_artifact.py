"""The FP32 artifact of a target: the baseline that tells conversion drift from quantization drift.

A quantized artifact's drift against FP32 PyTorch (total drift) has two sources: the exporter and the
runtime (conversion drift: the FP32 artifact against FP32 PyTorch) and the scheme (quantization drift:
the quantized artifact against the FP32 artifact, same runtime, same settings, same samples). Latency is
held against the same FP32 artifact, timed on the same machine, because int8 is not always faster.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.converters import ConversionRequest, get_converter
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_path
from edgeq.targets import Precision, TargetProfile
from edgeq.validate.check import ArtifactRun, run_artifact, runner_settings
from edgeq.validate.drift import DriftReport, Status, compare
from edgeq.validate.latency import Latency, speed_summary


class Source:
    BUNDLE = "bundle"  # this run's fp32 bundle of the same target, converted first and reused
    TEMPORARY = "temporary"  # converted into a temporary folder for the comparison, then deleted


@dataclass
class Fp32Artifact:
    """The FP32 artifact of one target, as run on the validation samples."""

    source: str
    report: DriftReport | None = None  # against FP32 PyTorch: the conversion drift
    outputs: list[dict[str, np.ndarray]] | None = None
    latency: Latency | None = None
    sha256: str | None = None
    reason: str | None = None  # why there are no outputs to compare with

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "conversion_drift": None if self.report is None else self.report.to_json(),
            "latency": None if self.latency is None else self.latency.to_json(),
            "reason": self.reason,
        }


@dataclass
class QuantizationDrift:
    """A quantized artifact against its target's FP32 artifact."""

    report: DriftReport  # quantized artifact vs FP32 artifact: the quantization drift
    fp32: Fp32Artifact | None = None  # None when the quantized artifact did not run (nothing to compare)
    latency_ratio: float | None = None  # quantized median / FP32 median: below 1 is faster

    @property
    def speed(self) -> str:
        return speed_summary(self.latency_ratio)


def compare_with_fp32(fp32_artifact, run: ArtifactRun, output_names: list[str]) -> QuantizationDrift:
    """Quantization drift and latency ratio of `run` against the FP32 artifact `fp32_artifact()` returns.

    `fp32_artifact` is called only when the quantized artifact ran, so an artifact this machine cannot
    execute (Core ML off macOS) costs no extra FP32 conversion.
    """
    if run.outputs is None:
        reason = f"the quantized artifact did not run: {run.report.reason}"
        return QuantizationDrift(DriftReport(run.report.status, run.report.executor, reason=reason))
    fp32 = fp32_artifact()
    if fp32.outputs is None:
        reason = f"no FP32 artifact outputs to compare with: {fp32.reason}"
        return QuantizationDrift(DriftReport(Status.ERROR, run.report.executor, reason=reason), fp32)
    try:
        report = compare(fp32.outputs, run.outputs, output_names, run.report.executor, run.masks)
    except ValueError as exc:
        report = DriftReport(Status.ERROR, run.report.executor, reason=f"against the FP32 artifact: {exc}")
    ratio = None
    if run.latency is not None and fp32.latency is not None and fp32.latency.median_ms > 0:
        ratio = run.latency.median_ms / fp32.latency.median_ms
    return QuantizationDrift(report, fp32, ratio)


def from_bundle(report: DriftReport | None, outputs, latency: Latency | None, bundle: Path | None, error: str | None) -> Fp32Artifact:
    """This run's fp32 outcome of the target, reused as the baseline (it was converted first)."""
    sha256 = None
    if bundle is not None and (bundle / "manifest.json").is_file():
        sha256 = json.loads((bundle / "manifest.json").read_text())["artifact"]["sha256"]
    reason = None
    if outputs is None:
        reason = error or (report.reason if report is not None else None) or "the fp32 artifact gave no outputs"
        reason = f"the fp32 bundle did not run: {reason}"
    return Fp32Artifact(Source.BUNDLE, report, outputs, latency, sha256, reason)


def temporary_fp32_artifact(model, profile: TargetProfile, validation, references, settings: dict) -> Fp32Artifact:
    """Convert `model` to FP32 for `profile`'s runtime in a temporary folder, run it, keep what it gave.

    A profile that does not deploy FP32 (Edge TPU, the ANE) still gets one here: it is a reference for
    the comparison, never published. A failure is recorded as the reason, never raised: the quantized
    artifact it would have been compared with stands on its own.
    """
    if Precision.FP32 not in profile.precisions:
        profile = dataclasses.replace(profile, precisions=(*profile.precisions, Precision.FP32))
    converter = get_converter(profile.runtime)
    request = ConversionRequest(model, profile, Precision.FP32)
    refusals = converter.check(request)
    if refusals:
        reason = f"target {profile.id} refuses fp32: " + "; ".join(str(r) for r in refusals)
        return Fp32Artifact(Source.TEMPORARY, reason=reason)
    with tempfile.TemporaryDirectory(prefix="edgeq-fp32-") as folder:
        try:
            artifact = converter.convert(request, Path(folder) / converter.filename)
            run = run_artifact(artifact.path, profile.runtime.value, settings, validation, references, model.outputs)
        except EdgeqError as exc:
            return Fp32Artifact(Source.TEMPORARY, reason=f"the FP32 artifact could not be made or run: {exc}")
        sha256 = sha256_path(artifact.path)
    reason = None if run.outputs is not None else f"the FP32 artifact did not run: {run.report.reason}"
    return Fp32Artifact(Source.TEMPORARY, run.report, run.outputs, run.latency, sha256, reason)


class Fp32Baselines:
    """Per target, the FP32 artifact that quantized artifacts are held against: this run's fp32 outcome
    when fp32 was requested for the target (`convert` runs it first), else a temporary one, made once,
    on first need."""

    def __init__(self, model, validation, references, on_step=lambda _: None):
        self.model, self.validation, self.references, self.on_step = model, validation, references, on_step
        self._known: dict[str, Fp32Artifact] = {}

    def record(self, profile: TargetProfile, outcome) -> None:
        """Keep an fp32 outcome (a pipeline Outcome) of `profile` as that target's baseline."""
        if outcome.precision == Precision.FP32.value:
            self._known[profile.id] = from_bundle(outcome.report, outcome.outputs, outcome.latency, outcome.path, outcome.error)

    def getter(self, profile: TargetProfile):
        """A call that returns `profile`'s FP32 artifact, converting a temporary one the first time."""

        def get() -> Fp32Artifact:
            if profile.id not in self._known:
                self.on_step(f"{profile.id} fp32: converting a temporary FP32 artifact to compare with")
                settings = runner_settings(profile.runtime.value, profile.runtime_options)
                self._known[profile.id] = temporary_fp32_artifact(self.model, profile, self.validation, self.references, settings)
            return self._known[profile.id]

        return get


def fp32_first(precisions: list[Precision]) -> list[Precision]:
    """fp32 before the rest (otherwise in the given order): its outputs are the others' baseline."""
    return sorted(precisions, key=lambda p: p != Precision.FP32)
