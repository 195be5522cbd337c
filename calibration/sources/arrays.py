"""Array files: `.npz` (one array per input name) and `.npy` (a single-input model's input), alone or a folder.

Either file holds one sample of the input's shape, or several along a leading sample axis.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edgeq.calibration.sources.common import Sample, SampleSet, SourceKind, conform, select, single_input
from edgeq.errors import SourceError
from edgeq.signature import TensorSpec


def npz_samples(paths: list[Path], inputs: list[TensorSpec], data: Path, count: int, seed: int) -> SampleSet:
    """A seeded choice of `count` samples from `.npz` files read in the (sorted) order given."""
    samples = [sample for path in paths for sample in from_npz(path, inputs)]
    chosen = select(len(samples), count, seed)
    return SampleSet([samples[i] for i in chosen], SourceKind.NPZ, str(data), len(samples))


def npy_samples(paths: list[Path], inputs: list[TensorSpec], data: Path, count: int, seed: int) -> SampleSet:
    """A seeded choice of `count` samples from `.npy` files; only the chosen files are read in full."""
    spec = single_input(inputs, ".npy files", data)
    rows: list[tuple[Path, int | None]] = []  # (file, index on its sample axis or None: the file is one sample)
    for path in paths:
        shape = _npy_shape(path)
        if shape == spec.shape:
            rows.append((path, None))
        elif shape[1:] == spec.shape:
            rows.extend((path, i) for i in range(shape[0]))
        else:
            raise SourceError(
                f"--data {path}: array has shape {shape}; expected {spec.shape} (one sample of input "
                f"{spec.name!r}) or (samples, {', '.join(map(str, spec.shape))})"
            )
    samples = []
    for index in select(len(rows), count, seed):
        path, row = rows[index]
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        samples.append({spec.name: conform(np.array(array if row is None else array[row]), spec, f"--data {path}")})
    return SampleSet(samples, SourceKind.NPY, str(data), len(rows))


def from_npz(path: Path, inputs: list[TensorSpec]) -> list[Sample]:
    """Every sample of one `.npz` file: an array per input name, of the input's shape or with a sample axis."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SourceError(f"--data {path}: not a readable .npz file ({exc})") from exc
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise SourceError(f"--data {path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays) or 'none'}")
    stacked = {}
    for spec in inputs:
        array = arrays[spec.name]
        if tuple(array.shape) == spec.shape:
            array = array[None]
        elif tuple(array.shape[1:]) != spec.shape:
            raise SourceError(
                f"--data {path}: array {spec.name!r} has shape {array.shape}; expected {spec.shape} or "
                f"(samples, {', '.join(map(str, spec.shape))})"
            )
        stacked[spec.name] = array
    counts = {len(a) for a in stacked.values()}
    if len(counts) != 1:
        raise SourceError(f"--data {path}: arrays have different sample counts {sorted(counts)}")
    return [
        {name: conform(array[i], spec, f"--data {path}") for spec, (name, array) in zip(inputs, stacked.items())}
        for i in range(counts.pop())
    ]


def _npy_shape(path: Path) -> tuple[int, ...]:
    """The array's shape from its header (mapped, not read; the map closes when dropped)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except (OSError, ValueError) as exc:
        raise SourceError(f"--data {path}: not a readable .npy file ({exc})") from exc
