"""Low-bit weight quantization (2-8 bits) decided in PyTorch: the shared grid, round-to-nearest with clipping,
GPTQ, AWQ and k-means palettes, and the layer-by-layer driver that feeds them calibration inputs."""
