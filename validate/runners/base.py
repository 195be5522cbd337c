"""What every runtime runner offers: named numpy arrays in, named numpy arrays out.

Runners import only numpy and their runtime, so a device needs nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class RunnerError(Exception):
    """The artifact could not be loaded or executed; the message says which and why."""


class NotExecutable(Exception):
    """This machine cannot execute the artifact at all (e.g. Core ML off macOS). Not a failure of the artifact."""


@dataclass(frozen=True)
class IOSpec:
    """An input or output as the artifact itself declares it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class Runner(ABC):
    runtime: str  # onnx | tflite | coreml
    executor: str  # what executed it, for reports: runtime, version, provider/delegate
    inputs: list[IOSpec]
    outputs: list[str]
    untimed: str | None = None  # why timing this runner would mean nothing for a device (None: time it)

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; `feeds` maps every input name to an array of its shape."""

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and shapes and cast to the artifact's dtypes (integer inputs: only when lossless)."""
        expected = {spec.name for spec in self.inputs}
        missing, extra = expected - set(feeds), set(feeds) - expected
        if missing or extra:
            raise RunnerError(
                f"inputs do not match the artifact: missing {sorted(missing)}, unexpected {sorted(extra)}; "
                f"the artifact takes {sorted(expected)}"
            )
        prepared = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            if tuple(array.shape) != tuple(spec.shape) and not _fits_dynamic(array.shape, spec.shape):
                raise RunnerError(f"input {spec.name!r}: shape {array.shape}, the artifact takes {spec.shape}")
            prepared[spec.name] = cast_input(spec.name, array, spec.dtype)
        return prepared


def _fits_dynamic(shape, declared) -> bool:
    """Runtimes report dynamic axes as -1 or 0; any size fits them."""
    return len(shape) == len(declared) and all(d in (-1, 0, None) or d == s for s, d in zip(shape, declared))


def cast_input(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the artifact's dtype. TFLite and Core ML take int32 where PyTorch took int64 (token ids):
    that is lossless while the values fit, and refused when they do not."""
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    if np.issubdtype(array.dtype, np.integer) and np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise RunnerError(f"input {name!r}: values outside {target} range cannot be fed to this artifact")
    return array.astype(target)
