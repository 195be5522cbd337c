"""Where a project sits must not show in what edgeq writes: the same model converted from another folder
(another CI workspace, another venv) gives the same bytes (docs/research/determinism.md).

Two helpers: `recorded_path` for paths a manifest records (the model source, the data), and
`source_file_label` for the source files toolchains cite in artifact metadata (ONNX stack traces).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePosixPath

_REFERENCE = re.compile(r"[\w.]+:[\w.]+")  # package.module:callable, not a path


def recorded_path(location: str | os.PathLike | None) -> str | None:
    """A path as a manifest records it: relative to the working directory when it lies inside it (what one
    types there, and the same wherever the project is checked out), else as given. References such as
    `package.module:callable` and relative paths are kept as the user wrote them."""
    if location is None:
        return None
    text = os.fspath(location)
    if _REFERENCE.fullmatch(text) or not os.path.isabs(text):
        return text
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working directory was removed
        return text
    for candidate in (os.path.abspath(text), os.path.realpath(text)):  # realpath: /tmp -> /private/tmp on macOS
        try:
            relative = Path(candidate).relative_to(here)
        except ValueError:
            continue
        return relative.as_posix() if relative.parts else "."
    return text


def source_file_label(filename: str, modules: dict[str, str] | None = None) -> str:
    """A Python source file named by its import path (`torch/nn/modules/linear.py`, `proj_mod.py`,
    `edgeq/load/wrap.py`), so neither the checkout nor the environment's folder shows. Files that belong to no
    imported module keep only their name; pseudo-files such as `<string>` are kept as they are."""
    if not os.path.isabs(filename):
        return filename
    modules = module_files() if modules is None else modules
    for candidate in (filename, os.path.realpath(filename)):
        if candidate in modules:
            return modules[candidate]
    return os.path.basename(filename)


def module_files() -> dict[str, str]:
    """{absolute file of an imported module: its import path as a relative file name}."""
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path) or name == "__main__":
            continue
        stem = PurePosixPath(*name.split("."))
        label = (stem / os.path.basename(path)) if os.path.basename(path).startswith("__init__.") else stem.with_suffix(Path(path).suffix)
        files[path] = label.as_posix()
        files.setdefault(os.path.realpath(path), label.as_posix())
    return files
