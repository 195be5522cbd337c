"""Tensor signatures: what a model takes and returns, parsed from `--input name:1x3x224x224:float32`.

A dimension is either a fixed size (`224`) or a named dynamic axis with the size used for the example
input (`batch=1`). Targets that need static shapes freeze a dynamic axis at its example size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgeq.errors import UsageError

# The dtypes a user may declare; the names are numpy's, which is also what the runtimes report.
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")

_DIM = re.compile(r"^(?:(?P<size>\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<example>\d+))$")
_DIM_AT = re.compile(r"\d+|[A-Za-z_][A-Za-z0-9_]*=\d+")


@dataclass(frozen=True)
class Dim:
    """One axis: `size` is the example (and, when `name` is None, the only) size."""

    size: int
    name: str | None = None  # set for a dynamic axis

    @property
    def dynamic(self) -> bool:
        return self.name is not None

    def __str__(self) -> str:
        return f"{self.name}={self.size}" if self.name else str(self.size)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype name of one model input or output."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str = "float32"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The example (static) shape."""
        return tuple(d.size for d in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d.name for i, d in enumerate(self.dims) if d.name}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()},
        }

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in self.dims)}:{self.dtype}"


def parse_input_spec(text: str) -> TensorSpec:
    """Parse `name:1x3x224x224:float32` (dtype optional, default float32; `batch=1` marks a dynamic axis)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise UsageError(
            f"--input {text!r}: expected NAME:SHAPE[:DTYPE], e.g. 'pixels:1x3x224x224:float32' "
            "or 'input_ids:batch=1x128:int64' for a dynamic batch axis"
        )
    name, shape_text = parts[0], parts[1]
    dtype = parts[2] if len(parts) == 3 else "float32"
    if dtype not in DTYPES:
        raise UsageError(f"--input {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    dims = []
    for token in _dim_tokens(shape_text):
        match = _DIM.match(token)
        if not match:
            raise UsageError(
                f"--input {text!r}: dimension {token!r} is neither a size (224) nor a dynamic axis "
                "with its example size (batch=1)"
            )
        if match["size"] is not None:
            dims.append(Dim(int(match["size"])))
        else:
            dims.append(Dim(int(match["example"]), match["name"]))
    if any(d.size <= 0 for d in dims):
        raise UsageError(f"--input {text!r}: every dimension must be at least 1")
    return TensorSpec(name, tuple(dims), dtype)


def _dim_tokens(shape_text: str) -> list[str]:
    """`1x3xseq_max=128` -> ['1', '3', 'seq_max=128']: an `x` separates dimensions except inside an axis name
    (`max_len=64` keeps its x). A piece that is no dimension comes back whole, for the error message."""
    tokens, position = [], 0
    while True:
        match = _DIM_AT.match(shape_text, position)
        if match is None:  # the first piece that is no dimension
            return [*tokens, shape_text[position:].split("x", 1)[0]]
        position = match.end()
        if position < len(shape_text) and shape_text[position] != "x":  # e.g. '3q': report the whole piece
            return [*tokens, match.group() + shape_text[position:].split("x", 1)[0]]
        tokens.append(match.group())
        if position == len(shape_text):
            return tokens
        position += 1


def spec_from_array(name: str, array: np.ndarray) -> TensorSpec:
    """A static spec matching an example array (or a torch tensor converted to numpy)."""
    return TensorSpec(name, tuple(Dim(int(s)) for s in array.shape), str(array.dtype))
