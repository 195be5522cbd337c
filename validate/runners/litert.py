"""Run `.tflite` artifacts in LiteRT (`ai_edge_litert`), or the legacy `tflite_runtime` on numpy-1 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import IOSpec, Runner, RunnerError


def load_interpreter_class():
    """LiteRT's Interpreter; `tflite_runtime` has the same API and is the only one on numpy<2 images."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        import ai_edge_litert

        return Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        import tflite_runtime

        return Interpreter, f"tflite-runtime {getattr(tflite_runtime, '__version__', '?')}"
    except ImportError as exc:
        raise ImportError(
            "no TFLite runtime: install ai-edge-litert (pip install 'edgeq[tflite]'), or tflite-runtime on numpy<2"
        ) from exc


class LiteRTRunner(Runner):
    runtime = "tflite"

    def __init__(self, path: Path, threads: int | None = None, signature: str | None = None):
        interpreter_class, version = load_interpreter_class()
        try:
            self.interpreter = interpreter_class(model_path=str(path), num_threads=threads)
            signatures = self.interpreter.get_signature_list()
            self.signature = signature or next(iter(signatures))
            self.runner = self.interpreter.get_signature_runner(self.signature)
        except Exception as exc:
            raise RunnerError(f"LiteRT could not load {path}: {exc}") from exc
        self.executor = f"{version} (CPU, default delegate, signature {self.signature!r})"
        details = self.runner.get_input_details()
        self.inputs = [
            IOSpec(name, tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]).name) for name, d in details.items()
        ]
        self.outputs = list(signatures[self.signature]["outputs"])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = self.prepare(feeds)
        try:
            result = self.runner(**prepared)
        except Exception as exc:
            raise RunnerError(f"LiteRT failed to run the artifact: {exc}") from exc
        # Copy: the runner's arrays may alias interpreter memory that the next call overwrites.
        return {name: np.array(result[name]) for name in self.outputs}
