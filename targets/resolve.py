"""resolve: a request (model x target x scheme x overrides) -> the QuantPlan for the layers to quantize.

Checks that the target runs what is asked before any work, decides weight numbers (round-to-nearest per
channel) and, through calibration/, SmoothQuant factors and static activation ranges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from edgeq.calibration.bias import correct_biases
from edgeq.calibration.collect import called_modules, input_channel_absmax
from edgeq.calibration.smoothquant import shared_factors, shared_input_groups, smoothed_weight
from edgeq.calibration.smoothquant_select import paying_groups
from edgeq.calibration.static import calibrate_activations, tensor_points
from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.apply import QUANTIZABLE, quantizable_layers
from edgeq.errors import ConversionError, UsageError
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.targets.profile import Granularity, Precision, TargetProfile

# Schemes whose numbers are all decided from the weights (dynamic activations are measured per call).
WEIGHT_ONLY = {Precision.INT8_WEIGHT, Precision.INT8_DYNAMIC}
STATIC = {Precision.W8A8, Precision.W8A16}  # activation ranges calibrated on samples
LOW_BIT = {p for p in Precision if p.value.startswith(("int4", "int3", "int2", "lut"))}  # targets/resolve_lowbit.py
QUANTIZED = WEIGHT_ONLY | STATIC | LOW_BIT


def op_kind(module: nn.Module) -> OpKind:
    if isinstance(module, nn.Linear):
        return OpKind.LINEAR
    if isinstance(module, nn.Embedding):
        return OpKind.EMBEDDING
    return OpKind.CONV


def matches(fqn: str, patterns: list[str]) -> str | None:
    """The first pattern naming `fqn`: an exact FQN, or `re:REGEX` matched in full."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                if re.fullmatch(pattern[3:], fqn):
                    return pattern
            except re.error as exc:
                raise UsageError(f"--keep-float {pattern!r}: not a valid regular expression: {exc}") from exc
        elif pattern == fqn:
            return pattern
    return None


def executed_layers(module: nn.Module, example_inputs: tuple) -> set[str]:
    """User FQNs of the quantizable layers a forward pass on the example inputs actually calls.

    Layers the graph never reaches (e.g. a Hugging Face pooler behind a feature-extraction head) are not
    exported, so a plan must not promise them.
    """
    return set(called_modules(module, example_inputs, lambda _fqn, child: isinstance(child, QUANTIZABLE)))


def planned_layers(module: nn.Module, plan: QuantPlan, keep_float: list[str], example_inputs: tuple | None) -> list:
    """(FQN, module) of the quantizable layers a forward on the examples calls (the others noted in `plan`);
    a --keep-float pattern that names none of them is a usage error."""
    layers = list(quantizable_layers(module))
    if example_inputs is not None:
        executed = executed_layers(module, example_inputs)
        skipped = [fqn for fqn, _ in layers if fqn not in executed]
        if skipped:
            plan.notes.append(f"not executed by the model, left out: {', '.join(skipped)}")
        layers = [(fqn, layer) for fqn, layer in layers if fqn in executed]
    unused = [p for p in keep_float if not any(matches(fqn, [p]) for fqn, _ in layers)]
    if unused:
        raise UsageError(f"--keep-float {', '.join(unused)}: names no quantizable layer; layers are e.g. {', '.join(f for f, _ in layers[:5])}")
    return layers


@dataclass
class Calibration:
    """How activation numbers are decided: calibration samples (disjoint from validation) and the algorithms."""

    samples: list[dict]
    input_names: list[str]
    observer: str = "mse"  # static ranges; see calibration/observers.py
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: the scheme's default
    smooth: bool = True  # False: no SmoothQuant at all
    bias_correction: bool = True  # static schemes: correct each layer's mean output shift where it helps


# Measured on all-MiniLM-L6-v2 (PyTorch simulation, 64 STS-B dev sentences, 32 calibration sentences):
# int8-dynamic per-tensor uint8 activations 0.9934 mean cosine without SmoothQuant, 0.8902 at alpha 0.3,
# 0.9910 at 0.5, 0.9978 at 0.7.
DEFAULT_SMOOTH_ALPHA = {Precision.INT8_DYNAMIC: 0.7, Precision.W8A8: 0.7, Precision.W8A16: 0.5}
# Static activation dtypes each scheme takes; the profile lists the ones it runs by preference (ORT on x86 fuses
# QDQ MatMuls into integer kernels only with uint8 activations: QDQIsInt8Allowed is false there).
_STATIC_DTYPES = {Precision.W8A8: ("int8", "uint8"), Precision.W8A16: ("int16", "uint16")}
# Runtimes whose int8 kernels need an int8 output as well as an int8 input: TFLite has no int8-in / float-out
# FULLY_CONNECTED or CONV_2D, so a w8a8 layer with only its input quantized runs in float between QUANTIZE and
# DEQUANTIZE (MiniLM: 0.97x FP32). With its output quantized too it is an int8 island (QUANTIZE -> int8 FC ->
# DEQUANTIZE) that XNNPACK runs at 3.8x the float kernel (docs/research/tflite-w8a8-speed.md). Not w8a16: its
# int16x8 kernels are reference code, slower than the float FC they would replace.
_INTEGER_ISLANDS = {"tflite": {Precision.W8A8}}


def quantizes_outputs(profile: TargetProfile, precision: Precision) -> bool:
    """Whether a static plan also quantizes each layer's output: full-integer targets (integer IO), and targets
    whose runtime runs an integer kernel only with an integer output (TFLite w8a8 islands)."""
    return profile.quantization.integer_io or precision in _INTEGER_ISLANDS.get(profile.runtime.value, ())


def dynamic_fallback(profile: TargetProfile, precision: Precision) -> QDtype | None:
    """What --auto-fallback relaxes a static layer to first: the run-time (dynamic) activation type the target
    computes fast, where the static layer is an integer island (TFLite: the hybrid FULLY_CONNECTED, int8 weight and
    int8 input rows quantized per call, 2.7x the float kernel); None: float activations."""
    return QDtype.INT8 if quantizes_outputs(profile, precision) and not profile.quantization.integer_io else None


def resolve_plan(
    module: nn.Module,
    profile: TargetProfile,
    precision: Precision,
    keep_float: list[str] = (),
    example_inputs: tuple | None = None,
    calibration: Calibration | None = None,
) -> QuantPlan:
    """The plan for a quantized scheme: every executed layer the target quantizes, minus the kept-float ones.

    Weights are int8 per channel (round-to-nearest). Dynamic schemes mark linear layers for run-time
    activation quantization; static schemes calibrate activation ranges on `calibration.samples`. With
    calibration samples, linear layers with quantized activations are smoothed first (SmoothQuant).
    """
    if precision not in WEIGHT_ONLY | STATIC:  # low-bit schemes: targets/resolve_lowbit.py
        raise ConversionError(f"target {profile.id}: {precision} is not a quantized scheme with 8-bit weights")
    caps = profile.quantization
    if "int8" not in caps.weight_dtypes or Granularity.PER_CHANNEL not in caps.weight_granularity:
        raise ConversionError(
            f"target {profile.id} does not run int8 per-channel weights "
            f"(it runs {', '.join(caps.weight_dtypes)} {', '.join(g.value for g in caps.weight_granularity)})"
        )
    activation_dtype = _static_dtype(profile, precision) if precision in STATIC else None
    if activation_dtype is not None and (calibration is None or not calibration.samples):
        raise ConversionError(f"target {profile.id}: {precision} needs calibration samples for its activation ranges")
    plan = QuantPlan(precision.value, profile.id)
    layers = planned_layers(module, plan, keep_float, example_inputs)
    dynamic = (QDtype.INT8 if profile.runtime.value == "tflite" else QDtype.UINT8) if precision == Precision.INT8_DYNAMIC else None
    # ^ what the runtime computes per call: ORT's DynamicQuantizeLinear is uint8 per tensor; TFLite's
    #   dynamic-range kernels quantize each row to int8 (docs/research/qdq-onnx-tflite.md, B3).
    modules = {}
    for fqn, layer in layers:
        kind = op_kind(layer)
        kept = matches(fqn, list(keep_float))
        if kept:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"kept float: --keep-float {kept}")
        elif kind.value not in caps.ops:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"target {profile.id} does not quantize {kind.value} layers")
        else:
            quant, codes = quantize_weight_per_channel(layer.weight, QDtype.INT8, axis=0, scale_dtype=caps.scale_dtype)
            entry = LayerPlan(fqn, kind, quant, codes)
            if kind == OpKind.LINEAR and dynamic is not None:
                entry.dynamic_activation = dynamic
            plan.layers[fqn] = entry
            modules[fqn] = layer
    hybrid = dynamic_fallback(profile, precision) if activation_dtype is not None else None
    if hybrid is not None and example_inputs is not None:
        _residual_layers_hybrid(module, plan, modules, example_inputs, hybrid)
    activated = {fqn: plan.layers[fqn] for fqn in modules if plan.layers[fqn].dynamic_activation or activation_dtype}
    activated = {fqn: layer for fqn, layer in activated.items() if layer.op != OpKind.EMBEDDING}
    static = {fqn: layer for fqn, layer in activated.items() if layer.dynamic_activation is None}  # static ranges
    if calibration is not None and calibration.samples and activated:
        alpha = calibration.smooth_alpha if calibration.smooth_alpha is not None else DEFAULT_SMOOTH_ALPHA.get(precision)
        linears = {fqn for fqn, layer in activated.items() if layer.op == OpKind.LINEAR}
        if calibration.smooth and alpha is not None and linears and caps.integer_io and activation_dtype is not None:
            # Its x / s is a float multiply on the layer input, which a full-integer target cannot run.
            plan.notes.append(f"no SmoothQuant: target {profile.id} runs integer ops only")
        elif calibration.smooth and alpha is not None and linears and not caps.dynamic_smoothing and calibration.smooth_alpha is None \
                and all(plan.layers[fqn].dynamic_activation is not None for fqn in linears):
            plan.notes.append(f"no SmoothQuant: target {profile.id} turns it off for dynamic activations (dynamic_smoothing = false: its "
                              "run-time Muls cost more than they buy there, the profile says why); --smoothquant ALPHA smooths where it pays")
        elif calibration.smooth and alpha is not None and linears:
            _smooth(module, plan, modules, linears, calibration, alpha, caps.scale_dtype)
        if activation_dtype is not None:
            # Full-integer targets: the model inputs and the leaf modules between layers get points of their own.
            points = tensor_points(module, example_inputs, calibration.input_names) if caps.integer_io and example_inputs is not None else []
            plan.tensors = calibrate_activations(
                module, static, calibration.samples, calibration.input_names,
                dtype=activation_dtype, symmetric=caps.activation_symmetric or activation_dtype in (QDtype.INT16,),
                observer=calibration.observer, quantize_outputs=quantizes_outputs(profile, precision), scale_dtype=caps.scale_dtype,
                tensors=points,
            )
            plan.inputs = list(calibration.input_names) if plan.tensors else []
            if calibration.bias_correction:
                corrected = correct_biases(module, static, modules, calibration.samples, calibration.input_names)
                plan.notes.append(f"bias correction on {len(corrected)} of {len(static)} layers (where it removes >= 5% of the error)")
            plan.notes.append(
                f"activations: {activation_dtype} per tensor, {calibration.observer} ranges from "
                f"{len(calibration.samples)} calibration samples"
                + (f"; also {len(plan.tensors)} tensor point(s) for integer-only ops: {', '.join(plan.tensors)}" if plan.tensors else "")
            )
    return plan


# Why a linear starts as the hybrid kernel on an integer-island target: the reason in plan.json and the plan note.
RESIDUAL_HYBRID = "hybrid (dynamic) by default: feeds a residual add"


def _residual_layers_hybrid(module, plan: QuantPlan, modules: dict, example_inputs: tuple, dynamic: QDtype) -> None:
    """On a target whose static layers are integer islands (TFLite w8a8), the linears whose output feeds a residual
    add start as the hybrid kernel (int8 weights, input rows quantized per call, no static ranges): their int8
    output range would have to hold the residual stream's outlier channels. MiniLM: every linear an island 0.949
    mean cosine to FP32; these 12 hybrid 0.994, both 2.6x FP32 (docs/research/tflite-w8a8-speed.md, §6)."""
    from edgeq.targets.resolve_residual import residual_linears

    linears = {fqn: layer for fqn, layer in modules.items() if plan.layers[fqn].op == OpKind.LINEAR}
    residual = residual_linears(module, linears, example_inputs) if linears else []
    for fqn in residual:
        plan.layers[fqn].dynamic_activation = dynamic
        plan.layers[fqn].reason = RESIDUAL_HYBRID
    if residual:
        named = ", ".join(residual) if len(residual) <= 4 else f"{', '.join(residual[:2])} and {len(residual) - 2} more: each layer's reason in plan.json"
        plan.notes.append(f"{RESIDUAL_HYBRID}: {len(residual)} of {len(linears)} linear layers ({named})")


def _static_dtype(profile: TargetProfile, precision: Precision) -> QDtype:
    supported = profile.quantization.activation_dtypes
    for name in supported:  # the profile lists its types by preference (onnx: uint8, the only type ORT fuses on x86)
        if name in _STATIC_DTYPES[precision]:
            return QDtype(name)
    raise ConversionError(
        f"target {profile.id} runs no {precision} activation type (it lists {', '.join(supported) or 'none'})"
    )


def _smooth(module, plan: QuantPlan, modules: dict, linears: set[str], calibration: Calibration, alpha: float, scale_dtype: str) -> None:
    """SmoothQuant: per-input-channel factors from calibration maxima; the weight codes become those of W * s."""
    maxima = input_channel_absmax(module, linears, calibration.samples, calibration.input_names)
    # Layers reading the same tensor (q, k, v) share one set of factors, so the artifact quantizes it once.
    groups = shared_input_groups(module, linears & set(maxima), calibration.samples[0], calibration.input_names)
    candidates = {}
    for group in groups:
        factors = shared_factors(maxima[group[0]], [modules[fqn].weight for fqn in group], alpha)
        for fqn in group:
            quant, codes = quantize_weight_per_channel(smoothed_weight(modules[fqn].weight, factors), QDtype.INT8, 0, scale_dtype)
            candidates[fqn] = (quant, codes, factors)
    # Dynamic schemes: only where smoothing lowers the error (its x / s is a runtime Mul; calibration/smoothquant_select.py)
    groups = paying_groups(module, plan, groups, candidates, calibration.samples, calibration.input_names)
    for group in groups:
        for fqn in group:
            layer = plan.layers[fqn]
            layer.weight, layer.weight_codes, layer.smooth = candidates[fqn]
    shared = sum(len(group) for group in groups if len(group) > 1)
    plan.notes.append(f"SmoothQuant alpha {alpha} on {sum(len(group) for group in groups)} of {len(maxima)} linear layers" + (f" ({shared} share factors with the layers reading the same input)" if shared else ""))
