"""The quantization step of a conversion: resolve the plan for a target and scheme, calibrated on the
calibration split, and, with --auto-fallback, relax the layers the sensitivity sweep finds most harmful.

Heavy imports stay inside functions: the CLI and the project loader import QuantizeOptions.
"""

from __future__ import annotations

from dataclasses import dataclass

OBSERVER_NAMES = ("minmax", "percentile", "mse", "entropy")  # calibration/observers.py
ALGORITHM_NAMES = ("rtn", "gptq", "awq")  # low-bit weight algorithms (edgeq.scheme.Algorithm)


@dataclass
class QuantizeOptions:
    calibration_samples: int = 32  # drawn besides the validation samples, disjoint from them
    observer: str = "mse"  # static activation ranges
    smoothquant: float | None = None  # SmoothQuant alpha in [0, 1]; None: the scheme's default
    no_smoothquant: bool = False
    auto_fallback: bool = False  # relax the most sensitive layers until the budget holds (in simulation)
    fallback_max: float = 0.1  # at most this fraction of the quantized layers is relaxed
    algorithm: str | None = None  # low-bit schemes: rtn, gptq or awq (None: the scheme's default, edgeq.scheme)
    group_size: int | None = 32  # low-bit schemes: input channels per scale; None: one scale per output channel

    def __post_init__(self):
        from edgeq.errors import UsageError

        if self.observer not in OBSERVER_NAMES:
            raise UsageError(f"observer {self.observer!r}: not one of {', '.join(OBSERVER_NAMES)}")
        if self.smoothquant is not None and not 0 <= self.smoothquant <= 1:
            raise UsageError(f"smoothquant alpha {self.smoothquant}: expected a value in [0, 1] (or off)")
        if not 0 <= self.fallback_max <= 1:
            raise UsageError(f"fallback max {self.fallback_max}: expected a fraction in [0, 1], e.g. 0.1")
        if self.calibration_samples < 0:
            raise UsageError("calibration samples must be 0 or more")
        if self.algorithm is not None and self.algorithm not in ALGORITHM_NAMES:
            raise UsageError(f"algorithm {self.algorithm!r}: not one of {', '.join(ALGORITHM_NAMES)}")


def parse_smoothquant(text: str | float | None) -> dict:
    """QuantizeOptions' SmoothQuant fields from 'off', a number, or None (the scheme's default)."""
    from edgeq.errors import UsageError

    if text is None:
        return {"smoothquant": None, "no_smoothquant": False}
    if str(text).lower() == "off":
        return {"smoothquant": None, "no_smoothquant": True}
    try:
        return {"smoothquant": float(text), "no_smoothquant": False}
    except ValueError:
        raise UsageError(f"smoothquant {text!r}: expected an alpha in [0, 1] or 'off'") from None


def quantization_plan(model, profile, precision, options: QuantizeOptions, keep_float: list[str], calibration_samples: list, budget):
    """(model to convert, QuantPlan, Fallback or None) for `precision` on `profile`, calibrated on
    `calibration_samples`. The model to convert has BatchNorm folded into its convolutions."""
    import dataclasses

    from edgeq.calibration.sensitivity import sensitivity_fallback
    from edgeq.compress.apply import user_fqn
    from edgeq.compress.fold import fold_batchnorm
    from edgeq.targets.resolve import Calibration, resolve_plan

    module, folded = fold_batchnorm(model.module)
    model = dataclasses.replace(model, module=module)
    from edgeq.scheme import LOW_BIT

    if precision in LOW_BIT:
        return model, _lowbit_plan(model, profile, precision, options, keep_float, calibration_samples, folded), None

    calibration = Calibration(
        calibration_samples, model.input_names, observer=options.observer,
        smooth_alpha=options.smoothquant, smooth=not options.no_smoothquant,
    )
    plan = resolve_plan(model.module, profile, precision, keep_float, model.example_inputs, calibration)
    if folded:
        plan.notes.append(f"BatchNorm folded into {', '.join(user_fqn(f) for f in folded)} before quantization")
    if not options.auto_fallback or not calibration_samples or not budget.bounds:
        return model, plan, None
    fallback = sensitivity_fallback(
        model.module, plan, calibration_samples, model.input_names, model.outputs, budget,
        options.fallback_max, profile.quantization.scale_dtype,
    )
    return model, fallback.plan, fallback


def _lowbit_plan(model, profile, precision, options: QuantizeOptions, keep_float, calibration_samples, folded):
    from edgeq.compress.apply import user_fqn
    from edgeq.errors import ConversionError
    from edgeq.scheme import scheme_for
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    if options.auto_fallback:
        raise ConversionError(f"target {profile.id}: --auto-fallback does not relax low-bit layers yet; use --keep-float")
    scheme = scheme_for(precision, algorithm=options.algorithm, group_size=options.group_size,
                        symmetric=profile.quantization.weight_symmetric)
    calibration = Calibration(calibration_samples, model.input_names)
    plan = resolve_lowbit_plan(model.module, profile, precision, scheme, keep_float, model.example_inputs, calibration)
    if folded:
        plan.notes.append(f"BatchNorm folded into {', '.join(user_fqn(f) for f in folded)} before quantization")
    return plan
