"""edgeq: PyTorch models to ONNX Runtime, TFLite and Core ML artifacts, each proved in its real runtime."""

__version__ = "0.1.0"
