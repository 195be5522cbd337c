"""Model source `package.module:callable` (or `path/to/file.py:callable`): a function or class returning an nn.Module.

The callable may return the module alone, or `(module, example_inputs)` where example_inputs is a tensor, a
tuple of tensors or a dict name -> tensor (whose keys name the inputs).
"""

from __future__ import annotations

import re

import torch

from edgeq.errors import SourceError
from edgeq.load.user_code import call_user_function, import_module_of

# `package.module:attr.path` or `path/to/file.py:attr.path`.
CALLABLE_REFERENCE = re.compile(r"^(?P<module>[\w.]+|.+\.py):(?P<attr>[\w.]+)$")


def is_callable_reference(text: str) -> bool:
    return CALLABLE_REFERENCE.match(text) is not None


def resolve_callable(ref: str, what: str | None = None):
    """Import `package.module:attr.path` (or `file.py:attr.path`) and return the object it names.

    Errors inside the module (syntax, an exception at import) become SourceErrors naming its file and line;
    `what` prefixes messages (default: the reference itself)."""
    what = what or repr(ref)
    match = CALLABLE_REFERENCE.match(ref)
    if match is None:
        raise SourceError(f"{what}: expected 'package.module:callable' or 'path/to/file.py:callable'")
    module = import_module_of(ref, what)
    attr_path = match["attr"]
    return attribute(module, attr_path, f"{what}: module {match['module']!r} has no attribute {attr_path!r}")


def attribute(owner, attr_path: str, missing: str):
    """`owner.a.b.c` for attr_path "a.b.c"; SourceError(`missing`) when a part is not there."""
    target = owner
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise SourceError(missing)
        target = getattr(target, part)
    return target


def call_model_factory(ref: str) -> tuple[torch.nn.Module, object | None]:
    """Call the factory `ref` names; return (module, example_inputs or None)."""
    target = resolve_callable(ref)
    if isinstance(target, torch.nn.Module):
        result = target
    elif callable(target):
        result = call_user_function(target, repr(ref))
    else:
        raise SourceError(f"{ref!r} is a {type(target).__name__}, not a callable returning an nn.Module")

    examples = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, examples = result
    if not isinstance(result, torch.nn.Module):
        raise SourceError(
            f"{ref!r} returned {type(result).__name__}; it must return an nn.Module or (module, example_inputs)"
        )
    return result, examples
