"""sha256 of files, folders and weights, for manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """A file's sha256, or for a folder (e.g. an .mlpackage) the sha256 over its files' relative paths and bytes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode())
        digest.update(b"\0")
        digest.update(bytes.fromhex(sha256_file(item)))
    return digest.hexdigest()


def sha256_state(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, values): identifies weights built in code."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array.float().numpy() if array.is_floating_point() else array.numpy()).tobytes())
    return digest.hexdigest()
