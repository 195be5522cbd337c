"""Per target: the low-bit scheme a per-layer plan lives in, the per-layer choices to try, and the uniform
schemes to compare with. Whether the target holds a choice is decided by the resolve machinery when the
choice is planned (edgeq.tune.measure), never re-derived here."""

from __future__ import annotations

from edgeq.errors import UsageError
from edgeq.tune.options import DEFAULT_CHOICES, PALETTE_CHOICES, Objective, TuneOptions, UniformScheme

# Low-bit schemes a per_layer plan can live in, preferred first. Per objective: int4-dynamic runs int8
# activations (ORT accuracy_level 4, LiteRT's only int4 kernel), the faster kernels; int4-weight keeps float
# activations (the weights' error alone). Both store the same bytes.
_BY_SIZE = ("int4-weight", "int4-dynamic", "lut4-weight")
_BY_SPEED = ("int4-dynamic", "int4-weight", "lut4-weight")
_EIGHT_BIT = ("int8-weight", "int8-dynamic")
UNIFORM_GROUPS = (32, 128)  # the uniform low-bit baselines: the finest and the coarsest group every runtime here runs


def plan_precision(profile, options: TuneOptions) -> str | None:
    """The scheme the per-layer plan lives in on `profile`; None when the profile lists no low-bit scheme (then
    only uniform schemes are compared). An explicit --precision the profile lacks is a usage error."""
    from edgeq.scheme import LOW_BIT
    from edgeq.targets import Precision

    listed = [p.value for p in profile.precisions]
    if options.precision is not None:
        if options.precision not in listed or Precision(options.precision) not in LOW_BIT:
            low = [p for p in listed if Precision(p) in LOW_BIT]
            raise UsageError(
                f"--precision {options.precision}: target {profile.id} tunes per layer inside a low-bit scheme it lists "
                f"({', '.join(low) or 'it lists none'})"
            )
        return options.precision
    order = _BY_SIZE if options.objective == Objective.SIZE else _BY_SPEED
    return next((p for p in order if p in listed), None)


def layer_choices(precision: str, options: TuneOptions) -> list[str]:
    if options.choices is not None:
        return list(options.choices)
    return list(PALETTE_CHOICES if precision.startswith("lut") else DEFAULT_CHOICES)


def uniform_schemes(profile, precision: str | None, options: TuneOptions) -> tuple[list[UniformScheme], list[str]]:
    """(schemes, notes): --uniform as given, less those the profile does not list (each noted), or (auto) the
    8-bit weight schemes the profile lists and the plan's own low-bit scheme at group 32 and 128 (palettes: as
    they are)."""
    listed = [p.value for p in profile.precisions]
    if options.uniform is not None:
        skipped = [s.label for s in options.uniform if s.precision not in listed]
        notes = [f"--uniform {', '.join(skipped)}: not listed by {profile.id} ({', '.join(listed)}); skipped"] if skipped else []
        return [s for s in options.uniform if s.precision in listed], notes
    schemes = [UniformScheme(p) for p in _EIGHT_BIT if p in listed]
    if precision is None:
        return schemes, []
    if precision.startswith("lut"):
        return schemes + [UniformScheme(precision)], []
    groups = [g for g in UNIFORM_GROUPS if g in profile.quantization.group_sizes] or [None]
    return schemes + [UniformScheme(precision, g) for g in groups], []


def check_targets(targets: list[str], options: TuneOptions) -> list[tuple[str, object]]:
    """(target, profile) for every target, each scheme asked for checked against the profiles before any model
    loads: --precision every target must list, --uniform schemes at least one target lists (exit 2)."""
    from edgeq.targets import expand_targets, load_profile

    pairs = [(target, load_profile(target)) for target in expand_targets(targets)]
    for _, profile in pairs:
        plan_precision(profile, options)
    if options.uniform:
        listed = {p.value for _, profile in pairs for p in profile.precisions}
        nowhere = [s.label for s in options.uniform if s.precision not in listed]
        if nowhere:
            raise UsageError(f"--uniform {', '.join(nowhere)}: listed by none of the targets ({', '.join(p.id for _, p in pairs)})")
    return pairs
