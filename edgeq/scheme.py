"""Schemes as typed configs: what a short scheme name (`-p int4-weight`) and its options (`--algo`,
`--group-size`, per-layer blocks in edgeq.toml) mean, as one small frozen value the plan records.

bits x granularity (group size or per channel) x symmetry x algorithm x activation mode x palette. The names
users type stay short (targets.Precision); `scheme_for` maps a name plus options onto a Scheme, and the
profile's capabilities are checked against it once (targets.resolve).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edgeq.targets import Precision


class Algorithm(StrEnum):
    RTN = "rtn"  # round to nearest, with MSE-searched clipping
    GPTQ = "gptq"  # Frantar et al. 2022
    AWQ = "awq"  # Lin et al. 2023: scales folded where exact, then round-to-nearest with AWQ's clip search
    AWQ_GPTQ = "awq+gptq"  # AWQ's folded scales, then GPTQ on the folded weights
    KMEANS = "kmeans"  # palettes (lut*-weight)


AWQ_ALGORITHMS = (Algorithm.AWQ, Algorithm.AWQ_GPTQ)  # fold per-input-channel scales into the model converted


class Activations(StrEnum):
    FLOAT = "float"
    DYNAMIC = "dynamic"  # quantized at run time (int8)
    STATIC = "static"  # calibrated ranges


GROUP_SIZES = (32, 64, 128)  # blockwise formats every runtime here holds (TFLite: a multiple of 32 dividing K)


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int | None  # None: per output channel
    symmetric: bool
    algorithm: Algorithm
    activations: Activations
    palette: bool = False  # non-uniform look-up table (k-means) instead of an affine grid

    def __post_init__(self):
        if self.palette and self.algorithm != Algorithm.KMEANS:
            raise ValueError("palettes are made by k-means")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group size {self.group_size}: expected a positive number of input channels")

    def describe(self) -> dict:
        return {
            "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
            "algorithm": self.algorithm.value, "activations": self.activations.value, "palette": self.palette,
        }


LOW_BIT = {
    Precision.INT4_WEIGHT: (4, Activations.FLOAT, False),
    Precision.INT3_WEIGHT: (3, Activations.FLOAT, False),
    Precision.INT2_WEIGHT: (2, Activations.FLOAT, False),
    Precision.INT4_DYNAMIC: (4, Activations.DYNAMIC, False),
    Precision.LUT2_WEIGHT: (2, Activations.FLOAT, True),
    Precision.LUT3_WEIGHT: (3, Activations.FLOAT, True),
    Precision.LUT4_WEIGHT: (4, Activations.FLOAT, True),
    Precision.LUT6_WEIGHT: (6, Activations.FLOAT, True),
    Precision.LUT8_WEIGHT: (8, Activations.FLOAT, True),
}
# Defaults measured on all-MiniLM-L6-v2 (issue 10's table): GPTQ beats round-to-nearest at every bit width.
DEFAULT_ALGORITHM = Algorithm.GPTQ
DEFAULT_GROUP_SIZE = 32


def scheme_for(
    precision: Precision, *, algorithm: str | None = None, group_size: int | None = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> Scheme:
    """The Scheme a low-bit scheme name means with these options (`group_size` None: per channel)."""
    bits, activations, palette = LOW_BIT[precision]
    if palette:
        return Scheme(bits, group_size, symmetric, Algorithm.KMEANS, activations, palette=True)
    chosen = Algorithm(algorithm) if algorithm else DEFAULT_ALGORITHM
    if chosen == Algorithm.KMEANS:
        raise ValueError(f"{precision} is an affine scheme; k-means makes palettes (lut{bits}-weight)")
    return Scheme(bits, group_size, symmetric, chosen, activations)
