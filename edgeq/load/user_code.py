"""Code the user names on the command line (`package.module:callable`, `path/to/file.py:callable`): import it,
find the attribute, call it, and turn every failure inside it into a SourceError that points at the user's
file and line instead of a traceback.

Running this code is what the user asked for (they named it); what edgeq owes them is a clear message when it
breaks: a syntax error, an exception at import, an exception when called.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import sysconfig
import traceback
from pathlib import Path

from edgeq.errors import SourceError

# Frames in these folders are Python's or a library's, never the user's own line.
_LIBRARIES = tuple(
    str(Path(sysconfig.get_paths()[key]).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib")
)


def _edgeq_folders() -> tuple[str, ...]:
    """Where edgeq's modules live (its subpackages map to several top-level folders of the source tree)."""
    return tuple(
        {
            str(Path(module.__file__).resolve().parent)
            for name, module in list(sys.modules.items())
            if (name == "edgeq" or name.startswith("edgeq.")) and getattr(module, "__file__", None)
        }
    )


def where_it_failed(exc: BaseException) -> str | None:
    """`file.py, line N: code` of the user's code that raised `exc` (or of the syntax error); None when no
    frame of the traceback is the user's (the failure is inside a library edgeq or the user called)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        return f"{exc.filename}, line {exc.lineno}{text}"
    skipped = _LIBRARIES + _edgeq_folders()
    user = [
        frame for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<") and not str(Path(frame.filename).resolve()).startswith(skipped)
    ]
    if not user:
        return None
    frame = user[-1]
    line = f": {frame.line.strip()}" if frame.line else ""
    return f"{frame.filename}, line {frame.lineno}{line}"


def describe_failure(exc: BaseException) -> str:
    """`SyntaxError: invalid syntax (at x.py, line 3: def f(:)` - the exception's last line and where it came from."""
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    message = (message.strip().splitlines() or [""])[-1].strip()
    prefix = f"{type(exc).__name__}: "
    while message.startswith(prefix):  # TorchScript repeats the exception's name inside its message
        message = message[len(prefix):]
    where = where_it_failed(exc)
    return f"{type(exc).__name__}: {message}" + (f" (at {where})" if where else "")


def import_module_of(ref: str, what: str):
    """Import the module part of `ref` (`package.module:attr` or `path/to/file.py:attr`); `what` prefixes messages."""
    module_ref = ref.rpartition(":")[0]
    if module_ref.endswith(".py"):
        return _import_file(Path(module_ref), what)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `edgeq convert mypkg.models:build` imports from where it runs, like python -m
    try:
        return importlib.import_module(module_ref)
    except ModuleNotFoundError as exc:
        if exc.name and (module_ref == exc.name or module_ref.startswith(exc.name + ".")):
            raise SourceError(
                f"{what}: cannot import module {module_ref!r}: no module named {exc.name!r} (run edgeq from the "
                f"folder that holds it, or install its package; a file can be given as path/to/file.py:name)"
            ) from exc
        raise SourceError(f"{what}: importing {module_ref!r} failed: {describe_failure(exc)}") from exc
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: the user's module must not end edgeq
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise SourceError(f"{what}: importing {module_ref!r} failed: {describe_failure(exc)}") from exc


def _import_file(path: Path, what: str):
    if not path.is_file():
        raise SourceError(f"{what}: no such file {path}")
    # A name unique to the file, so two files called data.py do not replace each other.
    name = "edgeq_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SourceError(f"{what}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise SourceError(f"{what}: importing {path} failed: {describe_failure(exc)}") from exc
    return module


def call_user_function(function, what: str):
    """`function()`, with any exception it raises reported as a SourceError naming the user's line."""
    try:
        return function()
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise SourceError(f"{what} raised {describe_failure(exc)}") from exc
