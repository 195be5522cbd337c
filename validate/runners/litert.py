"""Run `.tflite` artifacts in LiteRT (`ai_edge_litert`), or the legacy `tflite_runtime` on numpy-1 images."""

from __future__ import annotations

import sys
import warnings
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

    def __init__(self, path: Path, threads: int | None = None, signature: str | None = None, preserve_tensors: bool = False):
        """`preserve_tensors` keeps every intermediate tensor readable after a run (per-layer drift). That needs
        the builtin kernels: a delegate such as XNNPACK keeps its intermediates to itself."""
        interpreter_class, version = load_interpreter_class()
        debug = {}
        if preserve_tensors:
            resolver = sys.modules[interpreter_class.__module__].OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            debug = {"experimental_preserve_all_tensors": True, "experimental_op_resolver_type": resolver}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": that is what it is used for
                self.interpreter = interpreter_class(model_path=str(path), num_threads=threads, **debug)
            signatures = self.interpreter.get_signature_list()
            self.signature = signature or next(iter(signatures))
            self.runner = self.interpreter.get_signature_runner(self.signature)
        except Exception as exc:
            raise RunnerError(f"LiteRT could not load {path}: {exc}") from exc
        kernels = "builtin kernels, no delegate" if preserve_tensors else "default delegate"
        self.executor = f"{version} (CPU, {kernels}, signature {self.signature!r})"
        details = self.runner.get_input_details()
        self.inputs = [
            IOSpec(name, tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]).name) for name, d in details.items()
        ]
        self.outputs = list(signatures[self.signature]["outputs"])
        # Full-integer models (e.g. for the Edge TPU) take and return quantized tensors: float feeds are
        # quantized, and integer outputs dequantized, on the host with the artifact's own parameters.
        self.input_quant = _affine_params(details, path)
        self.output_quant = _affine_params(self.runner.get_output_details(), path)
        if self.input_quant or self.output_quant:
            described = [f"{n} {details[n]['dtype'].__name__} quantized" for n in self.input_quant]
            described += [f"{n} dequantized" for n in self.output_quant]
            self.executor += f"; integer IO converted on the host with the artifact's own scale/zero point ({', '.join(described)})"

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        specs = {spec.name: spec for spec in self.inputs}
        quantized = {
            name: quantize(feeds[name], scale, zero, np.dtype(specs[name].dtype))
            for name, (scale, zero) in self.input_quant.items()
            if name in feeds and np.issubdtype(np.asarray(feeds[name]).dtype, np.floating)
        }
        return super().prepare({**feeds, **quantized})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = self.prepare(feeds)
        try:
            result = self.runner(**prepared)
        except Exception as exc:
            raise RunnerError(f"LiteRT failed to run the artifact: {exc}") from exc
        # Copy: the runner's arrays may alias interpreter memory that the next call overwrites.
        outputs = {name: np.array(result[name]) for name in self.outputs}
        for name, (scale, zero) in self.output_quant.items():
            outputs[name] = dequantize(outputs[name], scale, zero)
        return outputs


def _affine_params(details: dict, path: Path) -> dict[str, tuple[float, int]]:
    """name -> (scale, zero point) of every quantized integer input/output (ids and other integers have none)."""
    params = {}
    for name, detail in details.items():
        quant = detail.get("quantization_parameters") or {}
        scales = np.asarray(quant.get("scales", []))
        if not np.issubdtype(np.dtype(detail["dtype"]), np.integer) or scales.size == 0:
            continue
        if scales.size != 1:
            raise RunnerError(f"{path}: input/output {name!r} is quantized per channel; edgeq feeds per-tensor IO only")
        params[name] = (float(scales[0]), int(np.asarray(quant["zero_points"])[0]))
    return params


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """What TFLite's QUANTIZE computes: round(x / scale) + zero point (halves away from zero), clamped."""
    scaled = np.asarray(values, dtype=np.float32) / np.float32(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    info = np.iinfo(dtype)
    return np.clip(rounded + zero_point, info.min, info.max).astype(dtype)


def dequantize(codes: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """What TFLite's DEQUANTIZE computes: scale * (q - zero point), as float32."""
    return (scale * (codes.astype(np.int64) - zero_point)).astype(np.float32)
