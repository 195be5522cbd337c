"""Run `.onnx` artifacts in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import IOSpec, Runner, RunnerError

# onnxruntime's tensor type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxRuntimeRunner(Runner):
    runtime = "onnx"

    def __init__(
        self,
        path: Path,
        providers: list[str] | None = None,
        optimization: str = "all",
        threads: int = 0,
        session_config: dict[str, str] | None = None,
        accuracy_level: int | None = None,
    ):
        """`accuracy_level`: run every com.microsoft.MatMulNBits node at this level instead of the artifact's
        own (validation's level-1 run: the weights' error without the kernel's; runners/onnx_levels.py)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, str(value))
        wanted = providers or ["CPUExecutionProvider"]
        # A profile names the provider it deploys on (e.g. QNN); where it is not installed, say so and use the rest.
        providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in providers]
        source = str(path)
        if accuracy_level is not None:
            from edgeq.validate.runners.onnx_levels import at_accuracy_level

            try:
                source = at_accuracy_level(path, accuracy_level)
            except (ImportError, ValueError) as exc:
                raise RunnerError(f"cannot run {path.name} at accuracy_level {accuracy_level}: {exc}") from exc
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            raise RunnerError(f"onnxruntime could not load {path}: {exc}") from exc
        config = "".join(f", {k}={v}" for k, v in (session_config or {}).items())
        if accuracy_level is not None:
            config += f", MatMulNBits accuracy_level={accuracy_level} for this run"
        self.executor = f"onnxruntime {ort.__version__} ({', '.join(providers)}, optimization={optimization}{config})"
        if missing:
            self.executor += f"; not installed here: {', '.join(missing)}"
        self.inputs = [
            IOSpec(i.name, tuple(d if isinstance(d, int) else -1 for d in i.shape), _ORT_TYPES.get(i.type, i.type))
            for i in self.session.get_inputs()
        ]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = self.prepare(feeds)
        try:
            values = self.session.run(self.outputs, prepared)
        except Exception as exc:
            raise RunnerError(f"onnxruntime failed to run the artifact: {exc}") from exc
        return dict(zip(self.outputs, values))
