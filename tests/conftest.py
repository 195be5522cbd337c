"""Shared test helpers: skip a test when an optional runtime is not installed, saying which."""

from __future__ import annotations

import importlib.util

import pytest


def requires(*modules: str):
    """Skip unless every module imports; CI installs all extras, so nothing skips there."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (pip install 'edgeq[all]')")


ONNX = requires("onnx", "onnxscript", "onnxruntime")
TFLITE = requires("litert_torch", "ai_edge_litert", "ai_edge_quantizer")
COREML = requires("coremltools")
