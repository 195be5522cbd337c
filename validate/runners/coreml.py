"""Run `.mlpackage` artifacts with Core ML's `MLModel.predict`, which exists only on macOS."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import IOSpec, NotExecutable, Runner, RunnerError

_MLMULTIARRAY_TYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}


class CoreMLRunner(Runner):
    runtime = "coreml"

    def __init__(self, path: Path, compute_units: str = "CPU_ONLY"):
        import coremltools as ct

        # The spec (signature) reads on any OS; only prediction needs macOS.
        try:
            description = ct.utils.load_spec(str(path)).description
        except Exception as exc:
            raise RunnerError(f"coremltools could not read {path}: {exc}") from exc
        self.model = None
        if platform.system() == "Darwin":
            try:
                self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
            except Exception as exc:
                raise RunnerError(f"Core ML could not load {path}: {exc}") from exc
            self.executor = f"Core ML via coremltools {ct.__version__} (compute units {compute_units})"
        else:
            self.executor = "none"
        self.inputs = [
            IOSpec(
                i.name,
                tuple(int(s) for s in i.type.multiArrayType.shape),
                _MLMULTIARRAY_TYPES.get(i.type.multiArrayType.dataType, "float32"),
            )
            for i in description.input
        ]
        self.outputs = [o.name for o in description.output]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None:
            raise NotExecutable(
                f"Core ML prediction (MLModel.predict) runs only on macOS; this is {platform.system()}. "
                "The artifact was converted but not executed here."
            )
        prepared = self.prepare(feeds)
        try:
            result = self.model.predict(prepared)
        except Exception as exc:
            raise RunnerError(f"Core ML failed to run the artifact: {exc}") from exc
        return {name: np.asarray(result[name]) for name in self.outputs}
