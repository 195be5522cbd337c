"""A task's content key: what its bundle depends on, hashed, so a rerun skips a cell whose inputs are unchanged.

The key covers the bytes of the model source (a file, a Hugging Face folder, or the module file of a
`module:callable`), of the data and of the factory module, the target profile's TOML, the job keys as written
(recipe, model entry and defaults merged), the scheme and edgeq's version. It is computed in the driver before
anything is sent to a worker, and recorded beside the bundle (`task.json`): a rerun with the same key and the
bundle still in place reuses the recorded result and says so.

Not covered: modules a `module:callable` imports besides its own file, and the installed toolchains' versions
(the manifest records those; a toolchain upgrade wants `--force`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from edgeq import __version__
from edgeq.hashing import sha256_file, sha256_path
from edgeq.sweep.spec import SweepTask

_CONTENT_KEYS = ("source", "data", "factory")  # values whose meaning is a file's bytes, not its name


class Hasher:
    """Content hashes of sources, data and profiles, each file or folder hashed once per sweep."""

    def __init__(self, import_paths: list[str]):
        self._import_paths = import_paths
        self._seen: dict[str, str] = {}

    def inputs(self, task: SweepTask) -> dict:
        """What the task's key is a hash of: JSON-able, and kept in task.json to say what changed on a rerun."""
        from edgeq.targets import load_profile

        values = dict(task.values)
        # the job's values, not the file's: paths there are relative to sweep.toml, the job's are resolved
        contents = {key: self.content(str(getattr(task.job, key))) for key in _CONTENT_KEYS if key in values}
        for key in contents:
            values.pop(key)
        profile = load_profile(task.job.targets[0])
        return {
            "edgeq": __version__,
            "scheme": task.scheme,
            "profile": {"id": profile.id, "sha256": self.content(str(profile.path))},
            "contents": contents,
            "keys": values,
        }

    def content(self, value: str) -> str:
        """sha256 of a path's bytes, or of the module file a `module:callable` reference names."""
        if value not in self._seen:
            self._seen[value] = self._hash(value)
        return self._seen[value]

    def _hash(self, value: str) -> str:
        path = Path(value)
        if path.exists():
            return sha256_path(path)
        module = value.rsplit(":", 1)[0]
        if module.endswith(".py"):  # file.py:callable: that file's bytes (a missing one: the task will say so)
            return sha256_file(Path(module)) if Path(module).is_file() else "missing:" + value
        with _importable(self._import_paths):
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            return "unresolved:" + value  # the task itself reports the import error
        return sha256_file(Path(spec.origin))


def task_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def changed(old: dict, new: dict) -> list[str]:
    """Which parts of a task's inputs differ from the recorded ones, for the rerun message."""
    parts = []
    for name in sorted(set(old) | set(new)):
        if isinstance(old.get(name), dict) and isinstance(new.get(name), dict):
            parts += [f"{name}.{key}" for key in sorted(set(old[name]) | set(new[name])) if old[name].get(key) != new[name].get(key)]
        elif old.get(name) != new.get(name):
            parts.append(name)
    return parts


@contextmanager
def _importable(paths: list[str]):
    added = [p for p in paths if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for item in added:
            if item in sys.path:
                sys.path.remove(item)


__all__ = ["Hasher", "changed", "task_key"]
