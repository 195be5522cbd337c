"""The one shape of a converter: `check` every layer first and refuse once, then `convert` to an Artifact."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.load import LoadedModel
from edgeq.plan import QuantPlan
from edgeq.targets import Precision, Runtime, TargetProfile


@dataclass
class Artifact:
    """A converted file (or folder, for .mlpackage) and how it was made."""

    path: Path
    runtime: Runtime
    precision: Precision
    target: str
    converter: dict[str, str]  # package -> version, of the tools that wrote it
    rewrites: list[str] = field(default_factory=list)  # PyTorch rewrites applied first (edgeq.rewrites)
    notes: list[str] = field(default_factory=list)  # e.g. "dynamic axis batch frozen at 1"


@dataclass(frozen=True)
class Refusal:
    """Why a layer (by torch FQN) cannot go to a target, and what would work instead."""

    layer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.reason}" if self.layer else self.reason


@dataclass
class ConversionRequest:
    model: LoadedModel
    profile: TargetProfile
    precision: Precision
    plan: QuantPlan | None = None  # set for quantized schemes: the exact numbers to lower


class Converter(ABC):
    runtime: Runtime
    filename: str  # the artifact's name inside its bundle
    # The schemes this converter lowers today; a profile may list more (what the hardware runs).
    implemented: frozenset[Precision] = frozenset({Precision.FP32, Precision.FP16})

    def check(self, request: ConversionRequest) -> list[Refusal]:
        """Everything this converter cannot do for the request, found before any work. Empty: go ahead."""
        refusals = []
        if request.precision not in request.profile.precisions:
            supported = ", ".join(p.value for p in request.profile.precisions)
            refusals.append(
                Refusal("", f"precision {request.precision} is not supported by target {request.profile.id} ({supported})")
            )
        elif request.precision not in self.implemented:
            done = ", ".join(p.value for p in Precision if p in self.implemented)
            refusals.append(
                Refusal(
                    "",
                    f"target {request.profile.id} runs {request.precision}, but edgeq's {self.runtime} converter "
                    f"does not lower it yet (it lowers {done})",
                )
            )
        return refusals

    @abstractmethod
    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        """Write the artifact at `dest` (the caller makes the write atomic)."""

    @staticmethod
    @abstractmethod
    def versions() -> dict[str, str]:
        """Versions of the packages this converter uses, for the manifest."""
