"""Which runtime package (and version) runs a bundle's artifact here, read from installed metadata."""

from __future__ import annotations

from importlib import metadata

# Runtime -> the distributions that provide it, in the order edgeq.validate.runners prefers them.
PACKAGES = {
    "onnx": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-qnn", "onnxruntime-directml", "onnxruntime-openvino"),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
    "coreml": ("coremltools",),
}

# What to tell a device that lacks the runtime.
INSTALL_HINTS = {
    "onnx": "pip install onnxruntime numpy",
    "tflite": "pip install ai-edge-litert numpy (or, on numpy<2 images: pip install tflite-runtime 'numpy<2')",
    "coreml": "pip install coremltools numpy (prediction runs on macOS only)",
}


def runtime_package(runtime: str) -> dict:
    """{"name": runtime, "package": distribution or None, "version": its version or None}."""
    for package in PACKAGES.get(runtime, ()):
        try:
            return {"name": runtime, "package": package, "version": metadata.version(package)}
        except metadata.PackageNotFoundError:
            continue
    return {"name": runtime, "package": None, "version": None}
