"""The FP32 artifact of a target: the baseline that tells conversion drift from quantization drift.

A quantized artifact's drift against FP32 PyTorch (total drift) has two sources: the exporter and the
runtime (conversion drift: the FP32 artifact against FP32 PyTorch) and the scheme (quantization drift:
the quantized artifact against the FP32 artifact, same runtime, same settings, same samples). Latency is
held against the same FP32 artifact, because int8 is not always faster: the two are timed in interleaved
rounds, on the same threads, in the same process (validate/latency.py), so the ratio survives machine load.
The FP32 artifact of a target is converted at most once per run and kept on disk until the run ends.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
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
from edgeq.validate.latency import Latency, speed_summary, time_artifacts


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
    path: Path | None = None  # the artifact, on disk for the whole run (timed beside each quantized artifact)

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


@dataclass(frozen=True)
class TimingInput:
    """What timing a quantized artifact beside its FP32 artifact needs: the artifact, its runtime and validation
    settings, and the sample both run on (the first validation sample)."""

    path: Path
    runtime: str
    settings: dict
    sample: dict


FP32_LABEL, QUANTIZED_LABEL = "the FP32 artifact", "the quantized artifact"


def compare_with_fp32(fp32_artifact, run: ArtifactRun, output_names: list[str], timing: TimingInput | None = None) -> QuantizationDrift:
    """Quantization drift and latency ratio of `run` against the FP32 artifact `fp32_artifact()` returns.

    With `timing`, the quantized artifact and the FP32 artifact are timed now, interleaved, and `run.latency`
    is set to the quantized figure (alone when there is no FP32 artifact to pair it with); the FP32 figure of
    the pair is the one recorded beside it. `fp32_artifact` is called only when the quantized artifact ran, so
    an artifact this machine cannot execute (Core ML off macOS) costs no extra FP32 conversion.
    """
    if run.outputs is None:
        reason = f"the quantized artifact did not run: {run.report.reason}"
        return QuantizationDrift(DriftReport(run.report.status, run.report.executor, reason=reason))
    fp32 = fp32_artifact()
    if fp32.outputs is None:
        _time_alone(run, timing)
        reason = f"no FP32 artifact outputs to compare with: {fp32.reason}"
        return QuantizationDrift(DriftReport(Status.ERROR, run.report.executor, reason=reason), fp32)
    try:
        report = compare(fp32.outputs, run.outputs, output_names, run.report.executor, run.masks)
    except ValueError as exc:
        report = DriftReport(Status.ERROR, run.report.executor, reason=f"against the FP32 artifact: {exc}")
    if timing is not None and run.untimed is None:
        if fp32.path is not None and fp32.path.exists():
            latencies, why = time_artifacts([timing.path, fp32.path], timing.runtime, timing.settings, timing.sample,
                                            labels=[FP32_LABEL, QUANTIZED_LABEL])
            if latencies is not None:
                run.latency, run.latency_reason = latencies[0], None
                fp32 = dataclasses.replace(fp32, latency=latencies[1])
            else:
                run.latency_reason = why
        else:
            _time_alone(run, timing)
    ratio = None
    if run.latency is not None and fp32.latency is not None and fp32.latency.median_ms > 0:
        ratio = run.latency.median_ms / fp32.latency.median_ms
    return QuantizationDrift(report, fp32, ratio)


def _time_alone(run: ArtifactRun, timing: TimingInput | None) -> None:
    """No FP32 artifact to pair with: the quantized artifact is timed by itself (same threads, warm)."""
    if timing is None or run.untimed is not None or run.latency is not None:
        return
    latencies, why = time_artifacts([timing.path], timing.runtime, timing.settings, timing.sample)
    run.latency, run.latency_reason = (latencies[0], None) if latencies is not None else (None, why)


def from_bundle(report: DriftReport | None, outputs, latency: Latency | None, bundle: Path | None, error: str | None) -> Fp32Artifact:
    """This run's fp32 outcome of the target, reused as the baseline (it was converted first)."""
    sha256 = path = None
    if bundle is not None and (bundle / "manifest.json").is_file():
        recorded = json.loads((bundle / "manifest.json").read_text())["artifact"]
        sha256, path = recorded["sha256"], bundle / recorded["file"]
    reason = None
    if outputs is None:
        reason = error or (report.reason if report is not None else None) or "the fp32 artifact gave no outputs"
        reason = f"the fp32 bundle did not run: {reason}"
    return Fp32Artifact(Source.BUNDLE, report, outputs, latency, sha256, reason, path)


def temporary_fp32_artifact(model, profile: TargetProfile, validation, references, settings: dict, folder: Path) -> Fp32Artifact:
    """Convert `model` to FP32 for `profile`'s runtime into `folder` (kept until the run ends, so quantized
    artifacts are timed beside it), run it, keep what it gave. Not timed here: it is timed in pairs.

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
    folder.mkdir(parents=True, exist_ok=True)
    try:
        artifact = converter.convert(request, folder / converter.filename)
        run = run_artifact(artifact.path, profile.runtime.value, settings, validation, references, model.outputs, timed=False)
    except EdgeqError as exc:
        return Fp32Artifact(Source.TEMPORARY, reason=f"the FP32 artifact could not be made or run: {exc}")
    reason = None if run.outputs is not None else f"the FP32 artifact did not run: {run.report.reason}"
    return Fp32Artifact(Source.TEMPORARY, run.report, run.outputs, None, sha256_path(artifact.path), reason, artifact.path)


class Fp32Baselines:
    """Per target, the FP32 artifact that quantized artifacts are held against: this run's fp32 outcome
    when fp32 was requested for the target (`convert` runs it first), else a temporary one, made once,
    on first need, in a folder deleted when the baselines are closed (use as a context manager)."""

    def __init__(self, model, validation, references, on_step=lambda _: None):
        self.model, self.validation, self.references, self.on_step = model, validation, references, on_step
        self._known: dict[str, Fp32Artifact] = {}
        self._folder: Path | None = None

    def __enter__(self) -> "Fp32Baselines":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the temporary FP32 artifacts."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

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
                if self._folder is None:
                    self._folder = Path(tempfile.mkdtemp(prefix="edgeq-fp32-"))
                folder = self._folder / profile.id
                self._known[profile.id] = temporary_fp32_artifact(self.model, profile, self.validation, self.references, settings, folder)
            return self._known[profile.id]

        return get


def fp32_first(precisions: list[Precision]) -> list[Precision]:
    """fp32 before the rest (otherwise in the given order): its outputs are the others' baseline."""
    return sorted(precisions, key=lambda p: p != Precision.FP32)
