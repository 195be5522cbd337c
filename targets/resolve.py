"""resolve: a request (model x target x scheme x overrides) -> the QuantPlan for the layers to quantize.

Checks that the target runs what is asked before any work, and decides weight numbers for weight-only
schemes (round-to-nearest per channel). Calibrated schemes add activation numbers in calibration/.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.apply import quantizable_layers
from edgeq.errors import ConversionError, UsageError
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.targets.profile import Granularity, Precision, TargetProfile

# Schemes whose numbers are all decided from the weights (dynamic activations are measured per call).
WEIGHT_ONLY = {Precision.INT8_WEIGHT, Precision.INT8_DYNAMIC}


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
    called: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda _m, _i, _o, fqn=fqn: called.add(fqn))
        for fqn, layer in quantizable_layers(module)
    ]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return called


def resolve_plan(
    module: nn.Module, profile: TargetProfile, precision: Precision, keep_float: list[str] = (), example_inputs: tuple | None = None
) -> QuantPlan:
    """The plan for a weight-only scheme: every executed layer the target quantizes, minus the kept-float ones."""
    if precision not in WEIGHT_ONLY:
        raise ConversionError(f"target {profile.id}: edgeq does not resolve {precision} plans yet")
    caps = profile.quantization
    if "int8" not in caps.weight_dtypes or Granularity.PER_CHANNEL not in caps.weight_granularity:
        raise ConversionError(
            f"target {profile.id} does not run int8 per-channel weights "
            f"(it runs {', '.join(caps.weight_dtypes)} {', '.join(g.value for g in caps.weight_granularity)})"
        )
    plan = QuantPlan(precision.value, profile.id)
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
    for fqn, layer in layers:
        kind = op_kind(layer)
        kept = matches(fqn, list(keep_float))
        if kept:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"kept float: --keep-float {kept}")
        elif kind.value not in caps.ops:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"target {profile.id} does not quantize {kind.value} layers")
        else:
            quant, codes = quantize_weight_per_channel(layer.weight, QDtype.INT8, axis=0, scale_dtype=caps.scale_dtype)
            # Dynamic activations: uint8 asymmetric per call, what ORT's DynamicQuantizeLinear computes.
            dynamic = QDtype.UINT8 if precision == Precision.INT8_DYNAMIC and kind == OpKind.LINEAR else None
            plan.layers[fqn] = LayerPlan(fqn, kind, quant, codes, dynamic_activation=dynamic)
    return plan
