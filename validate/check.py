"""Run an artifact on validation inputs and compare with reference outputs. numpy + the runtime only."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ValidationError
from edgeq.validate.drift import DriftReport, Status, compare
from edgeq.validate.latency import Latency, measure_runner, timing_settings
from edgeq.validate.runners import IOSpec, NotExecutable, RunnerError, open_runner
from edgeq.validate.token_mask import TokenMask, token_masks


@dataclass
class ArtifactRun:
    """What running an artifact on the validation inputs gave: drift, its signature, outputs and latency."""

    report: DriftReport
    signature: list[IOSpec] | None = None  # the artifact's inputs as it declares them
    outputs: list[dict[str, np.ndarray]] | None = None  # per sample, when it ran (the baseline of other artifacts)
    latency: Latency | None = None
    latency_reason: str | None = None  # why latency is None
    seconds: float = 0.0  # wall time of running and comparing the inputs (not of the timing runs)
    masks: dict[str, TokenMask] | None = None  # the token outputs' real positions the comparison used
    untimed: str | None = None  # why timing this artifact's runner would mean nothing (the MIL reference executor)


def run_artifact(
    path: Path,
    runtime: str,
    settings: dict,
    inputs: list[dict[str, np.ndarray]],
    references: list[dict[str, np.ndarray]],
    output_names: list[str],
    timed: bool = True,
    token_outputs: dict[str, str] | None = None,
    **limits,
) -> ArtifactRun:
    """Execute `path` on every input and compare with `references`; then, if `timed`, time it on the first input
    (`limits`: warm-up and run counts, as for `latency.measure`), in the same session when it already runs on the
    timing threads (latency.timing_settings), else in a second one opened with them.

    Token outputs are compared on the positions their attention mask marks real (validate.token_mask):
    `token_outputs` (output -> mask input, as a golden file records them) names them; None decides from shapes.

    A machine that cannot run the runtime at all gives status not_executed (honest, not a pass); a
    runtime that fails on the artifact gives status error with the runtime's message.
    """
    try:
        runner = open_runner(path, runtime, **settings)
    except ImportError as exc:
        raise ValidationError(f"cannot validate the {runtime} artifact: {exc}") from exc
    except RunnerError as exc:
        return _failed(DriftReport(Status.ERROR, executor=runtime, reason=str(exc)))
    missing = [name for name in output_names if name not in runner.outputs]
    if missing:
        reason = f"the artifact lacks output(s) {', '.join(missing)}; it returns {', '.join(runner.outputs)}"
        return _failed(DriftReport(Status.ERROR, executor=runner.executor, reason=reason), runner.inputs)
    start = time.perf_counter()
    try:
        masks = token_masks(inputs, references, output_names, token_outputs)
        candidates = [runner.run(sample) for sample in inputs]
        report = compare(references, candidates, output_names, runner.executor, masks)
    except NotExecutable as exc:
        return _failed(DriftReport(Status.NOT_EXECUTED, executor="none", reason=str(exc)), runner.inputs)
    except (RunnerError, ValueError) as exc:
        return _failed(DriftReport(Status.ERROR, executor=runner.executor, reason=str(exc)), runner.inputs)
    seconds = time.perf_counter() - start
    run = ArtifactRun(report, runner.inputs, candidates, latency_reason=runner.untimed or "not timed", seconds=seconds, masks=masks,
                      untimed=runner.untimed)
    if timed and inputs and runner.untimed is None:
        timing = timing_settings(runtime, settings)  # one thread unless the profile states its threads (latency.py)
        try:
            timer = runner if timing == settings else open_runner(path, runtime, **timing)
            run.latency, run.latency_reason = measure_runner(timer, inputs[0], threads=timing.get("threads"), **limits), None
        except (NotExecutable, RunnerError) as exc:
            run.latency_reason = f"timing failed: {exc}"
    return run


FLOAT_ACCURACY_LEVEL = 1  # MatMulNBits in fp32 math: what is left is the weights' error


@dataclass
class AccuracyLevels:
    """An ONNX artifact with low-bit MatMulNBits run as deployed and at accuracy_level 1, side by side: `weight`
    is level 1 against FP32 PyTorch (the plan's weights alone), `kernel` the deployed outputs against level 1's
    (what the kernel's arithmetic adds: int8 activations at level 4). The budget holds the deployed run."""

    levels: list[int]  # the distinct accuracy_level values of the artifact's MatMulNBits nodes (0: unset)
    weight: DriftReport | None = None
    kernel: DriftReport | None = None  # None: the deployed level computes in fp32 (no kernel error to separate)
    reason: str | None = None  # why a figure is missing

    @property
    def deployed(self) -> int:
        """The level that quantizes most (the highest) among the nodes'."""
        return max(self.levels)

    def to_json(self) -> dict:
        return {
            "deployed": self.deployed,
            "levels": list(self.levels),
            "float_level": FLOAT_ACCURACY_LEVEL,
            "weight_error": None if self.weight is None else self.weight.to_json(),
            "kernel_error": None if self.kernel is None else self.kernel.to_json(),
            "reason": self.reason,
        }


def run_accuracy_levels(path: Path, runtime: str, settings: dict, inputs, references, output_names, deployed: ArtifactRun) -> AccuracyLevels | None:
    """For an ONNX artifact with MatMulNBits nodes: `deployed` (its run at its own levels) beside a run of the
    same bytes at level 1. None for other artifacts. A deployed level that already computes in fp32 (0 or 1)
    needs no second run: its drift is the weights' error."""
    if runtime != "onnx":
        return None
    from edgeq.validate.runners.onnx_levels import FLOAT_LEVELS, matmul_nbits_levels

    try:
        levels = matmul_nbits_levels(path)
    except ImportError:
        return None  # without the onnx package nothing here can read the nodes (a device with only the runtime)
    if not levels:
        return None
    if deployed.report.status != Status.VALIDATED or deployed.outputs is None:
        return AccuracyLevels(levels, reason=f"not compared: the artifact did not run ({deployed.report.reason})")
    if all(level in FLOAT_LEVELS for level in levels):
        return AccuracyLevels(levels, weight=deployed.report, reason="deployed in fp32 math: its drift is the weights' error alone")
    at_float = run_artifact(path, runtime, {**settings, "accuracy_level": FLOAT_ACCURACY_LEVEL}, inputs, references, output_names, timed=False)
    if at_float.report.status != Status.VALIDATED:
        return AccuracyLevels(levels, weight=at_float.report, reason=f"the level-1 run failed: {at_float.report.reason}")
    kernel = compare(at_float.outputs, deployed.outputs, output_names, f"{deployed.report.executor} against level {FLOAT_ACCURACY_LEVEL}", deployed.masks)
    return AccuracyLevels(levels, weight=at_float.report, kernel=kernel)


def _failed(report: DriftReport, signature: list[IOSpec] | None = None) -> ArtifactRun:
    """The artifact did not run through: no outputs, no latency, and the report says why."""
    return ArtifactRun(report, signature, latency_reason=f"not measured: {report.reason}")


def runner_settings(runtime: str, options: dict) -> dict:
    """The runner keyword arguments a target profile's runtime_options ask for (recorded in manifests)."""
    if runtime == "onnx":
        return {
            "providers": list(options.get("providers", ["CPUExecutionProvider"])),
            "optimization": options.get("graph_optimization", "all"),
            "session_config": dict(options.get("session_config", {})),
        }
    if runtime == "tflite":
        return {"threads": options.get("threads")}
    if runtime == "coreml":
        return {"compute_units": options.get("compute_units", "ALL"), "executor": options.get("executor", "auto")}
    return {}


COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # where Core ML may run a model, on a Mac


def per_compute_unit(path: Path, settings: dict, inputs, references, output_names) -> dict | None:
    """On macOS, drift and latency of a Core ML artifact under each compute unit (MLModel.predict on CPU only,
    CPU+GPU, CPU+Neural Engine): the same program can drift differently on the GPU and the Neural Engine
    (fp16 there). None elsewhere: the reference executor has no compute units. Untested off a Mac."""
    import platform

    if platform.system() != "Darwin" or settings.get("executor", "auto") == "reference":
        return None
    runs = {}
    for unit in COMPUTE_UNITS:
        run = run_artifact(path, "coreml", {**settings, "compute_units": unit, "executor": "coreml"}, inputs, references, output_names)
        runs[unit] = {**run.report.to_json(), "latency": None if run.latency is None else run.latency.to_json(), "latency_reason": run.latency_reason}
    return runs
