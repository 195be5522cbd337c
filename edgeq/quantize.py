"""The quantization step of a conversion: resolve the plan for a target and scheme, calibrated on the
calibration split, and, with --auto-fallback, relax the layers the sensitivity sweep finds most harmful.

Heavy imports stay inside functions: the CLI and the project loader import QuantizeOptions.
"""

from __future__ import annotations

from dataclasses import dataclass

OBSERVER_NAMES = ("minmax", "percentile", "mse", "entropy")  # calibration/observers.py
ALGORITHM_NAMES = ("rtn", "gptq", "awq", "awq+gptq")  # low-bit weight algorithms (edgeq.scheme.Algorithm)
DEVICE_NAMES = ("cpu", "cuda")  # where low-bit calibration runs


@dataclass
class QuantizeOptions:
    calibration_samples: int = 32  # drawn besides the validation samples, disjoint from them
    observer: str = "mse"  # static activation ranges
    smoothquant: float | None = None  # SmoothQuant alpha in [0, 1]; None: the scheme's default
    no_smoothquant: bool = False
    auto_fallback: bool = False  # relax the most sensitive layers until the budget holds (in simulation)
    fallback_max: float = 0.1  # at most this fraction of the quantized layers is relaxed
    algorithm: str | None = None  # low-bit schemes: ALGORITHM_NAMES (None: the scheme's default, edgeq.scheme)
    group_size: int | None = 32  # low-bit schemes: input channels per scale; None: one scale per output channel
    layer_overrides: tuple = ()  # per-layer schemes (edgeq.layer_overrides.LayerOverride), later entries win
    device: str = "cpu"  # low-bit calibration (the driver, GPTQ, AWQ): cpu or cuda; the plan means the same

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
        if self.device not in DEVICE_NAMES:
            raise UsageError(f"device {self.device!r}: not one of {', '.join(DEVICE_NAMES)}")


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


def quantization_plan(model, profile, precision, options: QuantizeOptions, keep_float: list[str], calibration_samples: list, budget,
                      recover=None, teacher=None):
    """(model to convert, QuantPlan, Fallback or None) for `precision` on `profile`, calibrated on
    `calibration_samples`. The model to convert has BatchNorm folded into its convolutions, recurrent layers and
    nn.MultiheadAttention rebuilt from nn.Linear layers (edgeq.linearize), and with AWQ (low-bit `--algo awq`,
    `awq+gptq`) its input scales folded where exact: the plan's codes are of its weights. The plan counts every
    weight tensor of that model (edgeq.coverage): what stays float is listed with its reason.
    `recover` (edgeq.compress.spec.RecoverSpec) in mode qat or lora trains the model on the plan's grid,
    distilling from `teacher` (the original FP32 module), and records its stage in plan.compression."""
    import dataclasses

    from edgeq.compress.fold import fold_batchnorm
    from edgeq.coverage import account_weights
    from edgeq.linearize import linearize

    module, folded = fold_batchnorm(model.module, model.example_inputs)
    rebuilt = linearize(module, model.example_inputs, model.inputs, profile.dynamic_shapes, keep_float)
    model, keep_float = dataclasses.replace(model, module=rebuilt.module), rebuilt.keep_float
    model, plan, fallback = _plan(model, profile, precision, options, keep_float, calibration_samples, budget, folded)
    if recover is not None and recover.mode in ("qat", "lora"):
        model, plan = _recover_plan(model, plan, recover, teacher if teacher is not None else model.module, calibration_samples)
    plan.notes[:0] = rebuilt.notes
    account_weights(model.module, plan, rebuilt.floats)
    return model, plan, fallback


def _plan(model, profile, precision, options: QuantizeOptions, keep_float, calibration_samples, budget, folded):
    from edgeq.calibration.sensitivity import sensitivity_fallback
    from edgeq.compress.apply import user_fqn
    from edgeq.scheme import LOW_BIT
    from edgeq.targets.resolve import Calibration, dynamic_fallback, matches, resolve_plan

    if precision in LOW_BIT:
        check_calibration_device(options.device)
        sweeping = options.auto_fallback and len(calibration_samples) > 1 and budget.bounds
        fitted, held_out = _held_out(calibration_samples) if sweeping else (calibration_samples, [])
        model, plan = _lowbit_plan(model, profile, precision, options, keep_float, fitted, folded)
        if not sweeping:
            return model, plan, None
        fallback = _lowbit_fallback(model, profile, plan, options, held_out, budget)
        return model, fallback.plan, fallback

    floats = {}
    if options.layer_overrides:  # 8-bit schemes: per_layer float entries keep layers float (edgeq.layer_overrides)
        from edgeq.targets.layer_schemes import int8_scheme_floats

        floats = int8_scheme_floats(options.layer_overrides, model.module, model.example_inputs)
        keep_float = list(keep_float) + [fqn for fqn in floats if not matches(fqn, list(keep_float))]
    calibration = Calibration(
        calibration_samples, model.input_names, observer=options.observer,
        smooth_alpha=options.smoothquant, smooth=not options.no_smoothquant,
    )
    plan = resolve_plan(model.module, profile, precision, keep_float, model.example_inputs, calibration)
    if options.layer_overrides:
        from edgeq.targets.layer_schemes import note_int8_scheme

        note_int8_scheme(plan, options.layer_overrides, floats)
    if folded:
        plan.notes.append(f"BatchNorm folded into {', '.join(user_fqn(f) for f in folded)} before quantization")
    if not options.auto_fallback or not calibration_samples or not budget.bounds:
        return model, plan, None
    fallback = sensitivity_fallback(
        model.module, plan, calibration_samples, model.input_names, model.outputs, budget,
        options.fallback_max, profile.quantization.scale_dtype, dynamic_fallback(profile, precision),
    )
    return model, fallback.plan, fallback


def _recover_plan(model, plan, spec, teacher, calibration_samples: list):
    """QAT (fake quantization on the plan's grid, learnable scales) or LoRA over the frozen quantized base, for
    this target and precision: (model whose quantized layers hold the plan's new values, plan with new codes)."""
    import dataclasses

    from edgeq.errors import UsageError

    if not calibration_samples:
        raise UsageError(
            f"--recover {spec.text or spec.mode}: needs calibration samples and none are available; give "
            "--calibration-samples N (e.g. 32) and --data with more samples than --samples"
        )
    if spec.mode == "qat":  # new scales rounded, per layer, to the narrowest dtype that held the plan's exactly
        from edgeq.recover.qat import qat

        module, plan, result = qat(model.module, teacher, plan, spec, list(calibration_samples), model.input_names, model.outputs)
    else:
        from edgeq.recover.lora import lora

        module, plan, result = lora(model.module, teacher, plan, spec, list(calibration_samples), model.input_names, model.outputs)
    plan.compression.append(result.to_json())
    plan.seconds[f"recover_{spec.mode}"] = round(result.seconds, 3)
    return dataclasses.replace(model, module=module), plan


def check_calibration_device(device: str) -> None:
    """Refuse `--device cuda` where torch sees no CUDA device (exit 2), before calibration starts. Preflight
    (edgeq.preflight.check_device, torch-free) already refuses a torch built without CUDA."""
    import torch

    from edgeq.errors import UsageError

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda: torch {torch.__version__} sees no CUDA device here (torch.cuda.is_available() is False: "
            "no GPU, or no driver for it); use --device cpu (the default)"
        )


def _lowbit_plan(model, profile, precision, options: QuantizeOptions, keep_float, calibration_samples, folded):
    """(model to convert, plan): AWQ folds its scales into a copy of the model, which is then the one converted."""
    import copy
    import dataclasses

    from edgeq.compress.apply import user_fqn
    from edgeq.scheme import AWQ_ALGORITHMS, scheme_for
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    scheme = scheme_for(precision, algorithm=options.algorithm, group_size=options.group_size,
                        symmetric=profile.quantization.weight_symmetric)
    calibration = Calibration(calibration_samples, model.input_names)
    awq = {scheme.algorithm, *(o.algorithm for o in options.layer_overrides)} & set(AWQ_ALGORITHMS)
    if awq:  # resolve_lowbit_plan folds AWQ's scales into the module it is given
        model = dataclasses.replace(model, module=copy.deepcopy(model.module))
    plan = resolve_lowbit_plan(model.module, profile, precision, scheme, keep_float, model.example_inputs, calibration,
                               overrides=options.layer_overrides, device=options.device)
    if folded:
        plan.notes.append(f"BatchNorm folded into {', '.join(user_fqn(f) for f in folded)} before quantization")
    return model, plan


def _held_out(samples: list) -> tuple[list, list]:
    """(samples GPTQ/AWQ fit on, samples the --auto-fallback sweep judges on): a plan judged on the samples it
    was fitted to looks better than it is (MiniLM int3, 32 samples: 0.993 simulated, 0.964 on unseen sentences),
    so a quarter of them (at most 16) is held out of the fit."""
    count = min(16, max(1, len(samples) // 4))
    return list(samples[:-count]), list(samples[-count:])


def _lowbit_fallback(model, profile, plan, options: QuantizeOptions, calibration_samples, budget):
    """--auto-fallback on a low-bit plan (calibration/lowbit_fallback.py): its worst layers to int8, then float."""
    from edgeq.calibration.lowbit_fallback import lowbit_fallback
    from edgeq.compress.apply import quantizable_layers
    from edgeq.targets.layer_schemes import int8_layer

    modules = dict(quantizable_layers(model.module))
    return lowbit_fallback(
        model.module, plan, calibration_samples, model.input_names, model.outputs, budget, options.fallback_max,
        lambda fqn, entry: int8_layer(fqn, entry.op, modules[fqn], profile),
    )
