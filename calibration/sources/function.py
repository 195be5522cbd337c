"""A Python callable as a sample source: `--data package.module:function` or `--data path/to/file.py:function`.

The function takes no arguments and returns an iterable of samples: each a dict input name -> array, or, in
the inputs' order, a tuple of arrays (a bare array for a single-input model). Arrays may be numpy arrays or
anything `numpy.asarray` takes (CPU torch tensors included), of exactly the input's shape.
A sized result (list, tuple, array) gets the seeded selection; a generator is read only for its first samples.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sized

import numpy as np

from edgeq.calibration.sources.common import Sample, SampleSet, SourceKind, conform, select
from edgeq.errors import SourceError
from edgeq.signature import TensorSpec

_REFERENCE = re.compile(r"^(?P<module>[\w.]+|.+\.py):(?P<attr>[\w.]+)$")


def is_function_reference(text: str) -> bool:
    """`module:function` or `file.py:function` (checked only when no file of that name exists)."""
    return _REFERENCE.match(text) is not None


def function_samples(ref: str, inputs: list[TensorSpec], count: int, seed: int) -> SampleSet:
    from edgeq.load.user_code import call_user_function

    function = _resolve(ref)
    result = call_user_function(function, f"--data {ref}: the function")
    if isinstance(result, Mapping) or not isinstance(result, Iterable):
        raise SourceError(
            f"--data {ref}: returned a {type(result).__name__}; return an iterable of samples "
            "(e.g. a list of dicts input name -> array)"
        )
    notes: tuple[str, ...] = ()
    sized = isinstance(result, Sized)
    # Iterating runs the user's code too (a generator's body): its errors name the user's line.
    items = call_user_function(lambda: list(result if sized else itertools.islice(result, count)), f"--data {ref}: reading its samples")
    if sized:
        found: int | None = len(items)
        chosen = select(len(items), count, seed)
    else:
        found, chosen = None, list(range(len(items)))
        notes = (f"a generator: its first {len(items)} samples were taken",)
    if not items:
        raise SourceError(f"--data {ref}: returned no samples")
    samples = [_sample(items[i], i, inputs, ref) for i in chosen]
    return SampleSet(samples, SourceKind.CALLABLE, ref, found, None, notes)


def _sample(item, index: int, inputs: list[TensorSpec], ref: str) -> Sample:
    where = f"--data {ref}: sample {index}"
    names = [spec.name for spec in inputs]
    if isinstance(item, Mapping):
        missing = [n for n in names if n not in item]
        extra = [str(k) for k in item if k not in names]
        if missing or extra:
            problems = ([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
            raise SourceError(f"{where}: {'; '.join(problems)}; the model's inputs are {', '.join(names)}")
        values = [item[n] for n in names]
    elif isinstance(item, (tuple, list)):
        if len(item) != len(inputs):
            raise SourceError(f"{where}: a tuple of {len(item)} arrays; the model takes {len(inputs)} ({', '.join(names)})")
        values = list(item)
    elif len(inputs) == 1 and (isinstance(item, np.ndarray) or hasattr(item, "__array__")):
        values = [item]
    else:
        raise SourceError(
            f"{where}: a {type(item).__name__}; a sample is a dict input name -> array, or a tuple of arrays "
            f"in input order ({', '.join(names)})"
        )
    return {spec.name: conform(value, spec, where) for spec, value in zip(inputs, values)}


def _resolve(ref: str):
    from edgeq.load.callable import resolve_callable

    if _REFERENCE.match(ref) is None:
        raise SourceError(f"--data {ref!r}: expected package.module:function or path/to/file.py:function")
    # Errors inside the user's module (syntax, an exception at import) name its file and line.
    target = resolve_callable(ref, what=f"--data {ref}")
    if not callable(target):
        raise SourceError(f"--data {ref}: {ref.rpartition(':')[2]} is a {type(target).__name__}, not a function returning samples")
    return target
