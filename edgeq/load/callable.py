"""Model source `package.module:callable`: a function (or class) returning an nn.Module.

The callable may return the module alone, or `(module, example_inputs)` where example_inputs is a tensor, a
tuple of tensors or a dict name -> tensor (whose keys name the inputs).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

from edgeq.errors import SourceError


def resolve_callable(ref: str):
    """Import `package.module:attr.path` and return the object it names."""
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise SourceError(f"{ref!r}: expected 'package.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `edgeq convert mypkg.models:build` imports from where it runs, like python -m
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"{ref!r}: cannot import module {module_name!r}: {exc}") from exc
    return attribute(module, attr_path, f"{ref!r}: module {module_name!r} has no attribute {attr_path!r}")


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
        try:
            result = target()
        except Exception as exc:  # the user's code: report it, with where it came from
            raise SourceError(f"{ref!r} raised {type(exc).__name__}: {exc}") from exc
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
