"""Example inputs: from what a source provides, or made up from declared `--input` specs."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from edgeq.errors import SourceError, UsageError
from edgeq.signature import Dim, TensorSpec

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def numpy_dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in _TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise SourceError(f"input dtype {dtype} is not supported; use one of {', '.join(_TORCH_DTYPES)}")


def make_example(spec: TensorSpec, seed: int = 0) -> torch.Tensor:
    """A seeded tensor for a declared input: N(0, 1) for floats, zeros for integers and booleans.

    Integer inputs (token ids, indices) have a meaning edgeq cannot guess, so they get zeros, which are
    valid for any embedding table or index; give real values with --data.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(dtype)
    return torch.zeros(spec.shape, dtype=dtype)


def forward_parameter_names(module: torch.nn.Module) -> list[str]:
    """Positional parameter names of `module.forward`, for naming inputs."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]


def resolve_inputs(
    names: list[str],
    examples: list[torch.Tensor] | None,
    declared: list[TensorSpec],
    where: str,
) -> tuple[list[TensorSpec], tuple[torch.Tensor, ...]]:
    """Merge a source's own names/examples with the user's `--input` declarations.

    A declaration replaces the example of the input it names (its shape, dtype and dynamic axes win);
    without examples every input must be declared.
    """
    declared_by_name = {spec.name: spec for spec in declared}
    if examples is None:
        if not declared:
            raise UsageError(
                f"{where} carries no example inputs: declare each input with --input NAME:SHAPE:DTYPE "
                "(e.g. --input x:1x3x32x32:float32)"
            )
        if names and len(declared) != len(names):
            raise UsageError(
                f"{where} takes {len(names)} inputs ({', '.join(names)}) but {len(declared)} --input "
                "were given"
            )
        return list(declared), tuple(make_example(spec, seed=i) for i, spec in enumerate(declared))

    if len(names) < len(examples):
        names = names + [f"input_{i}" for i in range(len(names), len(examples))]
    names = names[: len(examples)]
    unknown = sorted(set(declared_by_name) - set(names))
    if unknown:
        raise UsageError(
            f"--input names {', '.join(unknown)}, which {where} does not take; its inputs are "
            f"{', '.join(names)}"
        )
    specs, tensors = [], []
    for index, (name, example) in enumerate(zip(names, examples)):
        if name in declared_by_name:
            spec = declared_by_name[name]
            tensor = make_example(spec, seed=index)
        else:
            # Converters reject non-contiguous example inputs; a contiguous copy holds the same values.
            tensor = example.detach().contiguous()
            spec = TensorSpec(name, tuple(Dim(int(s)) for s in tensor.shape), numpy_dtype_name(tensor.dtype))
        specs.append(spec)
        tensors.append(tensor)
    return specs, tuple(tensors)


def as_example_list(examples, where: str) -> tuple[list[str], list[torch.Tensor]]:
    """Accept a tensor, a tuple/list of tensors or a dict name -> tensor; return (names, tensors)."""
    if isinstance(examples, torch.Tensor):
        return [], [examples]
    if isinstance(examples, dict):
        return [str(k) for k in examples], list(examples.values())
    if isinstance(examples, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in examples):
        return [], list(examples)
    if isinstance(examples, np.ndarray):
        return [], [torch.from_numpy(examples)]
    raise SourceError(
        f"{where}: example inputs must be a tensor, a tuple of tensors or a dict of tensors, "
        f"not {type(examples).__name__}"
    )
