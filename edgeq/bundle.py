"""Bundles on disk: `out/<model>/<target>/<precision>/` written atomically.

Everything is written into a hidden staging folder beside the destination, then moved into place with
renames, so an interrupted or failed run never leaves a half bundle and never touches the previous one.
A bundle that fails its budget or validation is published beside the good one as `<precision>.rejected`,
so the canonical path only ever holds a bundle that passed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REJECTED_SUFFIX = ".rejected"


def bundle_path(out: Path, model: str, target: str, precision: str) -> Path:
    return Path(out) / model / target / precision


@contextmanager
def staging(dest: Path):
    """A fresh hidden folder on the same filesystem as `dest`; removed if the block raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes it private; a published bundle is an ordinary folder
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staged: Path, dest: Path) -> Path:
    """Move a complete staged bundle to `dest`, replacing what was there only once the new one is whole."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "bundle")
    try:
        os.rename(staged, dest)
    except BaseException:
        if old is not None:
            os.rename(old / "bundle", dest)  # put the previous bundle back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a hidden temp file in the same folder and a rename: readers see the
    old file or the new one, never half of one (reports, device results, a bundle's updated report.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it private; these are ordinary files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_golden(path: Path, inputs: list[dict], outputs: list[dict]) -> None:
    """golden.npz: `input/<name>` and `output/<name>` arrays with a leading sample axis (FP32 PyTorch outputs)."""
    arrays = {}
    for name in inputs[0]:
        arrays[f"input/{name}"] = np.stack([sample[name] for sample in inputs])
    for name in outputs[0]:
        arrays[f"output/{name}"] = np.stack([sample[name] for sample in outputs]).astype(np.float32)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_golden(path: Path) -> tuple[list[dict], list[dict]]:
    """The samples of a golden.npz as (inputs, outputs), one dict per sample."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    inputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
    outputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("output/")}
    count = len(next(iter(inputs.values())))
    return (
        [{n: a[i] for n, a in inputs.items()} for i in range(count)],
        [{n: a[i] for n, a in outputs.items()} for i in range(count)],
    )


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
