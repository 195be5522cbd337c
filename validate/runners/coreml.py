"""Run `.mlpackage` artifacts: Core ML's `MLModel.predict` on macOS, edgeq's MIL reference executor elsewhere.

`executor` picks which runs the artifact:
- "auto" (default): `MLModel.predict` on macOS; off macOS, where Core ML prediction does not exist, edgeq's
  MIL reference executor (numpy; `edgeq.validate.mil`), reported as such and never as Apple's runtime.
- "coreml": `MLModel.predict` only; off macOS the artifact is not executed (NotExecutable).
- "reference": edgeq's MIL reference executor on any OS (e.g. to compare it with Core ML on a Mac).

`compute_units` (a `coremltools.ComputeUnit` name: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL) is where
`MLModel.predict` may run the model. Drift per compute unit comes from one runner per compute unit over the
same inputs. Core ML treats it as a permission, not a placement: with CPU_AND_NE it still runs on the CPU
the ops the Neural Engine does not take. The reference executor has no compute units: it ignores the setting
and its `executor` string says so.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import IOSpec, NotExecutable, Runner, RunnerError

_MLMULTIARRAY_TYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}
# The artifact's record of features Core ML could not name as the model does (converters/coreml_names.py):
# {"inputs": {model name: Core ML name}, "outputs": {...}} in its spec's user metadata.
FEATURE_NAMES_KEY = "edgeq.feature_names"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
EXECUTORS = ("auto", "coreml", "reference")


class CoreMLRunner(Runner):
    runtime = "coreml"

    def __init__(self, path: Path, compute_units: str = "CPU_ONLY", executor: str = "auto"):
        import coremltools as ct

        if compute_units not in COMPUTE_UNITS:
            raise RunnerError(f"compute_units {compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}")
        if executor not in EXECUTORS:
            raise RunnerError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
        # The spec (signature) reads on any OS; only prediction needs macOS.
        try:
            description = ct.utils.load_spec(str(path)).description
        except Exception as exc:
            raise RunnerError(f"coremltools could not read {path}: {exc}") from exc
        # Features Core ML could not name as the model does (`state`): the artifact records its spelling, and
        # the runner speaks the model's names to everyone (validation, golden files, device bundles).
        renamed = read_feature_names(description.metadata.userDefined)
        self._input_names = {core: name for name, core in renamed["inputs"].items()}
        self._output_names = {core: name for name, core in renamed["outputs"].items()}
        self.inputs = [
            IOSpec(
                self._input_names.get(i.name, i.name),
                tuple(int(s) for s in i.type.multiArrayType.shape),
                _MLMULTIARRAY_TYPES.get(i.type.multiArrayType.dataType, "float32"),
            )
            for i in description.input
        ]
        self.outputs = [self._output_names.get(o.name, o.name) for o in description.output]
        self.model = self.reference = None
        self.reason = None  # why nothing can execute the artifact here
        self.failure = None  # why the reference executor cannot execute this artifact
        on_macos = platform.system() == "Darwin"
        if executor == "reference" or (executor == "auto" and not on_macos):
            self._open_reference(path, on_macos)
        elif on_macos:
            try:
                self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
            except Exception as exc:
                raise RunnerError(f"Core ML could not load {path}: {exc}") from exc
            self.executor = f"Core ML via coremltools {ct.__version__} (compute units {compute_units})"
        else:
            self.executor = "none"
            self.reason = (
                f"Core ML prediction (MLModel.predict) runs only on macOS; this is {platform.system()}. "
                "The artifact was converted but not executed here (executor='coreml' was asked for)."
            )

    def _open_reference(self, path: Path, on_macos: bool) -> None:
        """Load the program into the reference executor. A program it cannot run (an unsupported op) is
        reported when run, so the artifact's signature is still recorded."""
        from edgeq.validate.mil import MILError, MILExecutor

        why = "asked for" if on_macos else f"Core ML prediction exists only on macOS; this is {platform.system()}"
        try:
            self.reference = MILExecutor(path)
        except MILError as exc:
            self.executor = f"edgeq MIL reference executor (numpy), not Apple's Core ML runtime ({why})"
            self.failure = f"edgeq's MIL reference executor cannot run {path.name}: {exc}"
            return
        self.executor = f"{self.reference.label}; compute units not applicable ({why})"
        self.untimed = "edgeq's MIL reference executor runs in numpy: its speed says nothing about a device"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.reason is not None:
            raise NotExecutable(self.reason)
        if self.failure is not None:
            raise RunnerError(self.failure)
        prepared = self.prepare(feeds)
        core_ml = {model: core for core, model in self._input_names.items()}
        prepared = {core_ml.get(name, name): array for name, array in prepared.items()}
        if self.reference is not None:
            from edgeq.validate.mil import MILError

            try:
                result = self.reference.run(prepared)
            except MILError as exc:
                raise RunnerError(f"edgeq's MIL reference executor failed on the artifact: {exc}") from exc
        else:
            try:
                result = self.model.predict(prepared)
            except Exception as exc:
                raise RunnerError(f"Core ML failed to run the artifact: {exc}") from exc
        result = {self._output_names.get(name, name): value for name, value in result.items()}
        return {name: np.asarray(result[name]) for name in self.outputs}


def read_feature_names(metadata) -> dict[str, dict[str, str]]:
    """The renamed features an artifact records (its spec's userDefined metadata); empty when none."""
    raw = metadata.get(FEATURE_NAMES_KEY) if metadata is not None else None
    recorded = json.loads(raw) if raw else {}
    return {"inputs": dict(recorded.get("inputs", {})), "outputs": dict(recorded.get("outputs", {}))}
