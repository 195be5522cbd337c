"""The device side of a lab: validate a bundle, or a lab archive made by `edgeq bundle`, on the device.

    python -m edgeq.device lab.zip --junit result.xml --json result.json
    edgeq-device BUNDLE_DIR --budget "cosine>=0.999"

It imports only the standard library, numpy and the artifact's runtime (onnxruntime; ai-edge-litert or
tflite-runtime; coremltools on macOS), so a device image needs nothing else: `pip install --no-deps edgeq`
plus those. The checks themselves are edgeq.validate.bundle_check's, the same as `edgeq validate`'s.

Modules, one job each: archive (pack and safely unpack lab archives), memory (peak RSS), runtime (which
runtime package and version), results (the JSON and JUnit files), text (what is printed), cli (arguments,
the run, exit codes).
"""
