"""Array files: `.npz` (one array per input name) and `.npy` (a single-input model's input), alone or a folder.

Either file holds one sample of the input's shape, or several along a leading sample axis.
Arrays of Python objects are refused from their header, before any data is read: reading them means unpickling,
which edgeq never does for data (np.load(allow_pickle=False) everywhere).
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
        where = f"--data {path}" if row is None else f"--data {path}: sample {row}"
        samples.append({spec.name: conform(np.array(array if row is None else array[row]), spec, where)})
    return SampleSet(samples, SourceKind.NPY, str(data), len(rows))


def from_npz(path: Path, inputs: list[TensorSpec]) -> list[Sample]:
    """Every sample of one `.npz` file: an array per input name, of the input's shape or with a sample axis."""
    _refuse_object_arrays_in_npz(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SourceError(f"--data {path}: not a readable .npz file ({exc}); it may be truncated or damaged") from exc
    if not arrays:
        raise SourceError(f"--data {path}: holds no arrays; save one per input name, e.g. np.savez(path, {inputs[0].name}=array)")
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise SourceError(
            f"--data {path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays) or 'none'} "
            f"(the arrays are matched to the model's inputs by name: {', '.join(spec.name for spec in inputs)})"
        )
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
        {name: conform(array[i], spec, f"--data {path}: sample {i}") for spec, (name, array) in zip(inputs, stacked.items())}
        for i in range(counts.pop())
    ]


def _npy_shape(path: Path) -> tuple[int, ...]:
    """The array's shape from its header alone (object arrays refused before any data is read)."""
    try:
        with open(path, "rb") as handle:
            shape, dtype = _header(handle)
    except (OSError, ValueError, EOFError) as exc:
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise SourceError(f"--data {path}: not a readable .npy file{empty} ({exc or type(exc).__name__})") from exc
    if dtype.hasobject:
        raise _object_arrays(path, None)
    return shape


def _refuse_object_arrays_in_npz(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as handle:
                        _, dtype = _header(handle)
                    if dtype.hasobject:
                        raise _object_arrays(path, member[: -len(".npy")])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise SourceError(
            f"--data {path}: not a readable .npz file{empty} ({exc or type(exc).__name__}); it may be truncated or damaged"
        ) from exc


def _header(handle) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header; reads nothing else."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:  # 3.0 (utf-8 field names) has no public reader; numpy's own is only a private name
        raise ValueError(f".npy format version {version[0]}.{version[1]}; edgeq reads versions 1.0 and 2.0")
    return tuple(shape), dtype


def _object_arrays(path: Path, key: str | None) -> SourceError:
    which = f"array {key!r}" if key else "the array"
    return SourceError(
        f"--data {path}: {which} holds Python objects (dtype=object), which only unpickling could read; edgeq never "
        "unpickles data (a pickle runs code from the file): save numeric arrays, e.g. np.savez(path, x=array.astype(np.float32))"
    )
