"""Converters, one module per runtime; each imports its toolchain only when used."""

from __future__ import annotations

from edgeq.converters.base import Artifact, ConversionRequest, Converter, Refusal
from edgeq.targets import Runtime

__all__ = ["Artifact", "ConversionRequest", "Converter", "Refusal", "get_converter"]


def get_converter(runtime: Runtime) -> Converter:
    if runtime == Runtime.ONNX:
        from edgeq.converters.onnx import OnnxConverter

        return OnnxConverter()
    if runtime == Runtime.TFLITE:
        from edgeq.converters.tflite import TFLiteConverter

        return TFLiteConverter()
    if runtime == Runtime.COREML:
        from edgeq.converters.coreml import CoreMLConverter

        return CoreMLConverter()
    raise ValueError(f"no converter for runtime {runtime!r}")
