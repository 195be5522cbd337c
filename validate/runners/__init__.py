"""Open the runner for an artifact's runtime. Each runner imports only numpy and its own runtime."""

from __future__ import annotations

from pathlib import Path

from edgeq.validate.runners.base import IOSpec, NotExecutable, Runner, RunnerError

__all__ = ["IOSpec", "NotExecutable", "Runner", "RunnerError", "open_runner"]


def open_runner(path: Path, runtime: str, **settings) -> Runner:
    """A runner for `path`; `settings` are the runtime's session options (providers, threads, ...)."""
    if runtime == "onnx":
        from edgeq.validate.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(Path(path), **settings)
    if runtime == "tflite":
        from edgeq.validate.runners.litert import LiteRTRunner

        return LiteRTRunner(Path(path), **settings)
    if runtime == "coreml":
        from edgeq.validate.runners.coreml import CoreMLRunner

        return CoreMLRunner(Path(path), **settings)
    raise ValueError(f"unknown runtime {runtime!r}")
