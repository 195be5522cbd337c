"""Run an artifact on validation inputs and compare with reference outputs. numpy + the runtime only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.errors import ValidationError
from edgeq.validate.drift import DriftReport, Status, compare
from edgeq.validate.runners import IOSpec, NotExecutable, RunnerError, open_runner


def run_and_compare(
    path: Path,
    runtime: str,
    settings: dict,
    inputs: list[dict[str, np.ndarray]],
    references: list[dict[str, np.ndarray]],
    output_names: list[str],
) -> tuple[DriftReport, list[IOSpec] | None]:
    """Execute `path` on every input and compare with `references`; also return the artifact's input specs.

    A machine that cannot run the runtime at all gives status not_executed (honest, not a pass); a
    runtime that fails on the artifact gives status error with the runtime's message.
    """
    try:
        runner = open_runner(path, runtime, **settings)
    except ImportError as exc:
        raise ValidationError(f"cannot validate the {runtime} artifact: {exc}") from exc
    except RunnerError as exc:
        return DriftReport(Status.ERROR, executor=runtime, reason=str(exc)), None
    missing = [name for name in output_names if name not in runner.outputs]
    if missing:
        reason = f"the artifact lacks output(s) {', '.join(missing)}; it returns {', '.join(runner.outputs)}"
        return DriftReport(Status.ERROR, executor=runner.executor, reason=reason), runner.inputs
    try:
        candidates = [runner.run(sample) for sample in inputs]
        report = compare(references, candidates, output_names, runner.executor)
    except NotExecutable as exc:
        return DriftReport(Status.NOT_EXECUTED, executor="none", reason=str(exc)), runner.inputs
    except (RunnerError, ValueError) as exc:
        return DriftReport(Status.ERROR, executor=runner.executor, reason=str(exc)), runner.inputs
    return report, runner.inputs


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
        return {"compute_units": options.get("compute_units", "ALL")}
    return {}
