"""What every sample source shares: the SampleSet it returns, the seeded selection and the per-input checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from edgeq.errors import SourceError, UsageError
from edgeq.signature import TensorSpec

Sample = dict[str, np.ndarray]


class SourceKind(StrEnum):
    """Where samples came from; the values are what the manifest records."""

    SYNTHETIC = "synthetic"  # made from the model's example inputs
    SENTENCES = "sentences"  # edgeq's built-in sentences, for text models without data
    NPZ = "npz"  # .npz file(s): arrays keyed by input name
    NPY = "npy"  # .npy file(s) for a single-input model
    IMAGES = "images"
    TEXT = "text"  # .txt lines or a .csv/.tsv column, through the tokenizer
    WAV = "wav"
    CALLABLE = "callable"


@dataclass(frozen=True)
class SampleSet:
    """Samples (dict input name -> array of the input's shape) and where they came from."""

    samples: list[Sample]
    kind: SourceKind
    path: str | None = None
    found: int | None = None  # samples the source holds; None for a generator read only as far as needed
    preprocess: dict | None = None  # how raw data became arrays (images, audio, text), as recorded
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self, *, seed: int, validation: int, calibration: int = 0) -> dict:
        """The manifest's record of the source and of the split of its samples (deterministic: reruns match)."""
        return {
            "source": self.kind.value,
            "path": self.path,
            "samples_found": self.found,
            "samples_used": calibration + validation,
            "split": {"seed": seed, "calibration": calibration, "validation": validation},
            "preprocess": self.preprocess,
            "notes": list(self.notes),
        }


def select(found: int, count: int, seed: int) -> list[int]:
    """Indices of a seeded choice of `count` among `found` items, in their original (sorted) order."""
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(found)[:count])


def single_input(inputs: list[TensorSpec], what: str, data: Path | str) -> TensorSpec:
    """The one input a source that holds no names (images, audio, .npy) feeds."""
    if len(inputs) != 1:
        names = ", ".join(spec.name for spec in inputs)
        raise UsageError(
            f"--data {data}: {what} feed a single-input model, and this one has inputs {names}; "
            "give .npz files (one array per input name) or a Python callable (--data module:function)"
        )
    return inputs[0]


def conform(value, spec: TensorSpec, where: str) -> np.ndarray:
    """`value` as an array of `spec`'s shape and dtype; refuses other shapes, casts that change kind, and
    NaN or Inf (no drift figure means anything on them: they are bad data, said as such)."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists, objects numpy cannot take
        raise SourceError(f"{where}: input {spec.name!r} is not an array ({type(exc).__name__}: {exc})") from exc
    if array.dtype == object:
        raise SourceError(f"{where}: input {spec.name!r} holds Python objects, not numbers; give numeric arrays of {spec.dtype}")
    if tuple(array.shape) != spec.shape:
        raise SourceError(f"{where}: input {spec.name!r} has shape {tuple(array.shape)}; expected {spec.shape}")
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise SourceError(
            f"{where}: input {spec.name!r} is {array.dtype}; expected {spec.dtype} (or a dtype of the same kind)"
        )
    with np.errstate(over="ignore"):
        result = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    check_finite(result, spec.name, where, original=array)
    return result


def check_finite(array: np.ndarray, name: str, where: str, original: np.ndarray | None = None) -> None:
    """Refuse NaN and Inf in a float input, naming the first bad element."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    value = array[first]
    source = original[first] if original is not None and original.shape == array.shape else value
    if np.isfinite(source):
        what = f"a value ({source!r}) beyond the range of {array.dtype} at index {first}"
    else:
        kind = "NaN" if np.isnan(value) else "Inf"
        count = int(np.isnan(array).sum() if kind == "NaN" else np.isinf(array).sum())
        what = f"{count} {kind} value(s), the first at index {first}"
    raise SourceError(
        f"{where}: input {name!r} holds {what}; NaN and Inf are bad data (no drift figure means anything on "
        "them, in calibration or validation): clean or drop that sample"
    )
