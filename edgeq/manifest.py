"""manifest.json and report.json: what a bundle is, where it came from and how far it drifts."""

from __future__ import annotations

import platform
import numpy as np

import edgeq
from edgeq.bundle import size_bytes
from edgeq.hashing import sha256_path

MANIFEST_SCHEMA = 1


def build_manifest(*, model, profile, artifact, report, budget, violations, verdict, signature, settings, golden, data_source, plan=None, parity=None) -> dict:
    """Everything a build step or a device lab needs to trust the artifact, with no timestamps (reruns match)."""
    return {
        "schema": MANIFEST_SCHEMA,
        "model": {
            "name": model.name,
            "task": model.task,
            "source": {"kind": model.source.kind, "location": model.source.location, "sha256": model.source.sha256},
            "parameters": sum(p.numel() for p in model.module.parameters()),
        },
        "target": {"id": profile.id, "runtime": profile.runtime.value, "hardware": profile.hardware},
        "precision": artifact.precision.value,
        "artifact": {
            "file": artifact.path.name,
            "sha256": sha256_path(artifact.path),
            "size_bytes": size_bytes(artifact.path),
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
        "plan": None if plan is None else {**plan.summary(), "files": ["plan.json", "scales.npz"]},
        "weight_parity": None if parity is None else parity.to_json(),
        "rewrites": list(artifact.rewrites),
        "notes": list(artifact.notes),
        "runtime_settings": settings,
        "validation": {**report.to_json(), "data": data_source},
        "budget": {"terms": str(budget), "verdict": verdict, "violations": violations},
        "golden": {"file": golden.name, "sha256": sha256_path(golden), "samples": report.samples},
    }
