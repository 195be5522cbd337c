"""manifest.json and report.json: what a bundle is, where it came from and how far it drifts."""

from __future__ import annotations

import json
import platform

import numpy as np

import edgeq
from edgeq.bundle import size_bytes
from edgeq.hashing import sha256_path
from edgeq.reproducible import recorded_path

MANIFEST_SCHEMA = 1

# The only fields a rerun does not repeat: wall-clock timings of this machine (validation.latency, ...).
TIMING_FIELDS = (
    ("validation", "latency"),
    ("validation", "latency_vs_fp32"),
    ("validation", "speed_vs_fp32"),
    ("validation", "fp32_artifact", "latency"),
    ("validation", "per_compute_unit"),  # macOS only: latencies per Core ML compute unit
    ("plan", "seconds"),  # calibration and fallback wall-clock time
    ("compression", "latency"),  # PyTorch latency before/after each compression stage
    ("compression", "seconds"),  # each compression stage's wall-clock time
)


def build_manifest(*, model, profile, artifact, report, budget, violations, verdict, signature, settings, golden, data_source, plan=None, parity=None, latency=None, latency_reason=None, quantization=None, storage=None, accuracy_levels=None, compression=None) -> dict:
    """Everything a build step or a device lab needs to trust the artifact, with no timestamps: reruns
    match except the TIMING_FIELDS, also from another folder (paths inside the working directory are
    recorded relative to it: edgeq.reproducible). `quantization` (a QuantizationDrift) holds a quantized
    artifact against its target's FP32 artifact; None for FP32 artifacts. `storage` (edgeq.footprint.WeightStorage)
    is the weights as the runtime stores them, in bits per weight; `accuracy_levels` (validate.check.AccuracyLevels)
    the ONNX MatMulNBits artifact's deployed run beside its run at accuracy_level 1. `compression`
    (edgeq.compress.run.compression_section) the prune / low-rank / recover stages with figures before and after."""
    return {
        "schema": MANIFEST_SCHEMA,
        "model": {
            "name": model.name,
            "task": model.task,
            "source": {"kind": model.source.kind, "location": recorded_path(model.source.location), "sha256": model.source.sha256},
            "parameters": sum(p.numel() for p in model.module.parameters()),
        },
        "target": {"id": profile.id, "runtime": profile.runtime.value, "hardware": profile.hardware},
        "precision": artifact.precision.value,
        "artifact": {
            "file": artifact.path.name,
            "sha256": sha256_path(artifact.path),
            "size_bytes": size_bytes(artifact.path),
            # the weights as stored: bits per weight (codes, scales, zero points, LUTs, floats), per layer and in all
            "storage": None if storage is None else storage.to_json(),
            # ONNX low-bit: the accuracy_level its MatMulNBits nodes deploy with (4: int8 activations); else None
            "ort_accuracy_level": None if accuracy_levels is None else accuracy_levels.deployed,
        },
        "signature": {
            "declared_inputs": [spec.to_json() for spec in model.inputs],
            "inputs": [spec.to_json() for spec in signature] if signature else None,
            "outputs": list(model.outputs),
        },
        "versions": {
            "edgeq": edgeq.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            **artifact.converter,
            "runtime": report.executor,
        },
        "plan": None if plan is None else {**plan.summary(), "files": ["plan.json", "scales.npz"]} | ({"seconds": plan.seconds} if plan.seconds else {}),
        "weight_parity": None if parity is None else parity.to_json(),
        "rewrites": list(artifact.rewrites),
        "notes": list(artifact.notes),
        "runtime_settings": settings,
        "validation": {
            **report.to_json(),
            "data": {**data_source, "path": recorded_path(data_source.get("path"))},  # pipeline.describe_data: source, path, samples_found/used, split, preprocess, notes
            "latency": None if latency is None else latency.to_json(),
            "latency_reason": latency_reason,
            "accuracy_levels": None if accuracy_levels is None else accuracy_levels.to_json(),
            **_against_fp32_artifact(quantization),
        },
        "budget": {"terms": str(budget), "verdict": verdict, "violations": violations},
        "compression": compression,
        "golden": {"file": golden.name, "sha256": sha256_path(golden), "samples": report.samples},
    }


def _against_fp32_artifact(quantization) -> dict:
    """vs_fp32_artifact: quantization drift; fp32_artifact: its conversion drift and latency;
    latency_vs_fp32: quantized median / FP32 median (below 1 is faster); speed_vs_fp32: that ratio in the
    words every report uses ("1.6x faster than FP32", validate.latency.speed_summary)."""
    if quantization is None:
        return {"vs_fp32_artifact": None, "fp32_artifact": None, "latency_vs_fp32": None, "speed_vs_fp32": None}
    ratio = quantization.latency_ratio
    return {
        "vs_fp32_artifact": quantization.report.to_json(),
        "fp32_artifact": None if quantization.fp32 is None else quantization.fp32.to_json(),
        "latency_vs_fp32": None if ratio is None else round(ratio, 3),
        "speed_vs_fp32": None if ratio is None else quantization.speed,
    }


def without_timings(manifest: dict) -> dict:
    """A copy of `manifest` with the TIMING_FIELDS blanked: what two runs on the same inputs must share."""
    data = json.loads(json.dumps(manifest))
    for path in TIMING_FIELDS:
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = None
    return data
