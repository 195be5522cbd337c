"""The integer grid every low-bit algorithm rounds onto: bits, group size and symmetry, with its scales and
zero points per output channel and group. Torch tensors throughout, so the algorithms run on a GPU too.

A weight `W` of shape [N, K] (out features, in features; a conv's [N, C*kh*kw]) is split along K into groups
of `group_size` columns (`None`: one group of all K, i.e. per output channel). Each (row, group) has a scale
and a zero point: real = scale * (code - zero).
  symmetric:  codes in [-2^(b-1), 2^(b-1) - 1], zero 0, scale = max|w| / (2^(b-1) - 1)
  asymmetric: codes in [0, 2^b - 1], zero = round(-min / scale), scale = (max - min) / (2^b - 1)
A `clip` factor in (0, 1] shrinks the range before the scale is taken (clipping search picks it per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 5, 6, 7, 8)
# The precision a runtime keeps scales in (a profile's scale_dtype) and its machine epsilon: a plan's scales
# are made representable there, so the artifact holds exactly the plan's numbers.
SCALE_DTYPES = {"float32": (torch.float32, 2.0**-23), "float16": (torch.float16, 2.0**-10), "bfloat16": (torch.bfloat16, 2.0**-7)}


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int | None = None  # None: per output channel
    symmetric: bool = True
    scale_dtype: str = "float32"  # scales are rounded up to the nearest value of this type

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits {self.bits}: expected one of {BITS}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype {self.scale_dtype!r}: expected one of {', '.join(SCALE_DTYPES)}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group size {self.group_size}: expected a positive number of input channels")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def groups(self, columns: int) -> int:
        """How many groups K columns make; K must be a multiple of the group size."""
        size = self.group_size or columns
        if columns % size:
            raise ValueError(f"{columns} input channels are not a multiple of the group size {size}")
        return columns // size

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each [N, groups], for weight `w` [N, K]; `clip` is a scalar or [N, groups]."""
        rows, columns = w.shape
        grouped = w.reshape(rows, self.groups(columns), -1).float()
        if self.symmetric:
            top = grouped.abs().amax(dim=2) * clip
            scale = self.representable(top / self.qmax)
            zero = torch.zeros_like(scale)
        else:
            low = grouped.amin(dim=2).clamp(max=0) * clip
            high = grouped.amax(dim=2).clamp(min=0) * clip
            scale = self.representable((high - low) / (self.qmax - self.qmin))
            zero = torch.round(-low / scale).clamp(self.qmin, self.qmax)
        return scale, zero

    def representable(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` rounded up to the nearest value of the grid's scale dtype (up: the range still fits), as
        float32; an all-zero group's scale (0) becomes 1, where any scale is exact."""
        dtype, epsilon = SCALE_DTYPES[self.scale_dtype]
        tiny = torch.finfo(dtype).tiny
        scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
        if dtype == torch.float32:
            return scale
        rounded = scale.to(dtype).float()
        bumped = (scale * (1 + epsilon)).to(dtype).float()
        return torch.where(rounded >= scale, rounded, bumped)

    def nearest_representable(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` rounded to the nearest value of the grid's scale dtype, as float32 (for codes that are given,
        not fitted: the range argument of `representable` does not apply, and nearest halves the error);
        as `representable` where that would leave the dtype's normal range."""
        dtype, _ = SCALE_DTYPES[self.scale_dtype]
        if dtype == torch.float32:
            return self.representable(scale)
        nearest = scale.to(dtype).float()
        up = self.representable(scale)
        return torch.where((nearest > torch.finfo(dtype).tiny) & torch.isfinite(nearest) & (scale > 0), nearest, up)

    def expand(self, params: torch.Tensor, columns: int) -> torch.Tensor:
        """[N, groups] -> [N, K]: each group's value repeated over its columns."""
        if params.shape[1] == columns:  # one column per group (GPTQ's column loop): nothing to repeat
            return params
        return params.repeat_interleave(columns // params.shape[1], dim=1)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float tensor values) of `w` [N, K], round half to even, clamped to the grid."""
        columns = w.shape[1]
        return torch.clamp(torch.round(w / self.expand(scale, columns)) + self.expand(zero, columns), self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        columns = codes.shape[1]
        return (codes - self.expand(zero, columns)) * self.expand(scale, columns)

    def round_trip(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)
