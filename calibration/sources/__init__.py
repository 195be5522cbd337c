"""Sample sources beyond the single files `edgeq.calibration.data` reads: folders of arrays, images, WAV
audio, and a Python callable. Each module reads one kind; `common` holds what they share."""
