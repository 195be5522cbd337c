"""What `edgeq tune` is asked for, checked before torch or a model loads (a typo costs milliseconds, exit 2).

The per-layer choices and the uniform schemes are written as users write them elsewhere: a choice is a
`per_layer` value (edgeq.layer_overrides: float, int8, int4:g32, int3:g32, lut4, ...), a uniform scheme a
precision with an optional group size (`int4-weight:g128`, `int8-dynamic`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from edgeq.errors import UsageError


class Objective(StrEnum):
    SIZE = "size"  # the smallest artifact that holds the budget
    LATENCY = "latency"  # the fastest: timed in the runtime here, else estimated by the profile's cost model (tune/cost.py)
    BALANCED = "balanced"  # the least product of size and latency, each relative to the best candidate's


# The per-layer ladder tried by default, cheapest first; each target keeps what its profile and the algorithms
# hold (edgeq.tune.choices asks the resolve machinery). int3/int2 are left out: ONNX stores them in a 4-bit
# container (no smaller than int4) and TFLite holds none; give --choices to try them.
DEFAULT_CHOICES = ("int4:g128", "int4:g64", "int4:g32", "int8", "float")
PALETTE_CHOICES = ("lut4", "lut6", "int8", "float")  # targets whose low-bit scheme is palettes (coreml-ane)
UNIFORM_DEFAULT = "auto"  # every 8-bit and 4-bit scheme the target lists, 4-bit at group 32 and 128
MAX_CANDIDATES = 4  # tuned plans converted and validated per target, at most


@dataclass(frozen=True)
class UniformScheme:
    precision: str
    group_size: int | None = None  # None: the scheme's default (--group-size), or not a low-bit scheme

    @property
    def label(self) -> str:
        return self.precision + (f":g{self.group_size}" if self.group_size else "")


@dataclass
class TuneOptions:
    budget: str  # e.g. "cosine>=0.99": what every candidate is held to, in prediction and in the runtime
    objective: Objective = Objective.SIZE
    precision: str | None = None  # the low-bit scheme the per-layer plan lives in; None: per target (choices.py)
    choices: tuple[str, ...] | None = None  # per-layer values tried; None: DEFAULT_CHOICES / PALETTE_CHOICES
    uniform: tuple[UniformScheme, ...] | None = None  # None: UNIFORM_DEFAULT (per target); (): none
    max_candidates: int = MAX_CANDIDATES
    keep_candidates: bool = False  # keep every candidate's bundle under OUT/<model>/tune-candidates/
    notes: list[str] = field(default_factory=list)


def parse_objective(text: str) -> Objective:
    try:
        return Objective(text.strip().lower())
    except ValueError:
        raise UsageError(f"--objective {text!r}: expected one of {', '.join(o.value for o in Objective)}") from None


def parse_choices(values: list[str] | None) -> tuple[str, ...] | None:
    """--choices float,int8,int4:g32 ...: each a per_layer value (checked here), at least two."""
    if not values:
        return None
    from edgeq.layer_overrides import parse_value

    choices = tuple(dict.fromkeys(v.strip().lower() for v in values if v.strip()))
    for choice in choices:
        parse_value(choice, f"--choices {choice!r}")
    if len(choices) < 2:
        raise UsageError(f"--choices {','.join(choices)}: give at least two per-layer choices to choose between, e.g. int4:g128,int4:g32,int8")
    return choices


_UNIFORM = re.compile(r"^([a-z0-9-]+?)(?::g(\d+)|:channel)?$")


def parse_uniform(values: list[str] | None) -> tuple[UniformScheme, ...] | None:
    """--uniform int8-dynamic,int4-weight:g32 ... | none | auto (the default)."""
    if not values or [v.strip().lower() for v in values] == [UNIFORM_DEFAULT]:
        return None
    if [v.strip().lower() for v in values] == ["none"]:
        return ()
    from edgeq.targets import Precision

    known = {p.value for p in Precision}
    schemes = []
    for value in values:
        text = value.strip().lower()
        match = _UNIFORM.match(text)
        if not match or match.group(1) not in known or match.group(1) == "fp32":
            raise UsageError(
                f"--uniform {value!r}: expected a quantized precision with an optional group size, e.g. int8-dynamic, "
                f"int4-weight:g32 (or 'auto', 'none'); precisions: {', '.join(sorted(known - {'fp32'}))}"
            )
        schemes.append(UniformScheme(match.group(1), int(match.group(2)) if match.group(2) else None))
    return tuple(dict.fromkeys(schemes))


def check_budget_for_tuning(text: str | None) -> str:
    """A budget with at least one bound: tuning searches for what holds it, so 'none' means nothing to search."""
    from edgeq.preflight import check_budget

    if text is None or not text.strip():
        raise UsageError("--budget is required: the drift every tuned artifact must hold, e.g. 'cosine>=0.99'")
    checked = check_budget(text, "--budget")
    if not checked:
        raise UsageError("--budget none: tuning searches for the smallest plan that holds a budget; give one, e.g. 'cosine>=0.99'")
    return checked
