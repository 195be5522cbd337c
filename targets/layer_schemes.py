"""Per-layer schemes in low-bit plans (edgeq.layer_overrides): which Scheme each layer gets, checked against
the target before any calibration, and the int8 entries of a low-bit plan.

A layer's Scheme is the model's (-p and its options) unless a `per_layer` entry decides it; --keep-float wins
over both. Every entry is checked once, naming its pattern and the layers it decides: a pattern matching no
layer is a usage error; a scheme the target cannot hold (int3 on TFLite, a group size it does not run, int8 on
an op it does not quantize) is refused with what the target holds instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.errors import ConversionError
from edgeq.layer_overrides import LayerOverride, check_patterns, decide
from edgeq.plan import LayerPlan, OpKind, QDtype
from edgeq.scheme import Scheme
from edgeq.targets.profile import Granularity, Precision, TargetProfile
from edgeq.targets.resolve import matches, op_kind


@dataclass(frozen=True)
class LayerDecision:
    scheme: Scheme | None  # None: float
    entry: LayerOverride
    grid: Grid | None  # the target's grid for this layer's scheme (None: float)

    def reason(self, what: str) -> str:
        return f"{what} by per_layer {self.entry.describe()}"


def layer_schemes(
    profile: TargetProfile, precision: Precision, base: Scheme, overrides: tuple[LayerOverride, ...],
    layers: list[tuple[str, nn.Module]], keep_float: list[str],
) -> dict[str, LayerDecision]:
    """The layers a `per_layer` entry decides (FQN -> its Scheme, entry and grid); the others follow `base`.
    Raises UsageError for a pattern naming no layer, ConversionError for a scheme the target cannot hold."""
    if not overrides:
        return {}
    check_patterns(overrides, [fqn for fqn, _ in layers])
    kinds = {fqn: op_kind(layer) for fqn, layer in layers}
    chosen: dict[str, LayerOverride] = {}
    for fqn, _ in layers:
        entry = decide(overrides, fqn)
        if entry is not None and not matches(fqn, list(keep_float)):
            chosen[fqn] = entry
    decisions = {}
    for entry in dict.fromkeys(chosen.values()):  # each entry once, in order
        fqns = [fqn for fqn, e in chosen.items() if e is entry]
        scheme = entry.scheme(base)
        grid = None if scheme is None else _grid(profile, precision, scheme, entry, fqns, kinds)
        decisions |= {fqn: LayerDecision(scheme, entry, grid) for fqn in fqns}
    return decisions


def _named(fqns: list[str]) -> str:
    return ", ".join(fqns[:3]) + (f" and {len(fqns) - 3} more" if len(fqns) > 3 else "")


def _grid(profile: TargetProfile, precision: Precision, scheme: Scheme, entry: LayerOverride, fqns: list[str], kinds: dict) -> Grid:
    from edgeq.targets.resolve_lowbit import check_lowbit

    caps = profile.quantization
    where = f"target {profile.id}: per_layer {entry.describe()}, for {_named(fqns)}"
    if scheme.bits == 8 and not scheme.palette:
        if "int8" not in caps.weight_dtypes or Granularity.PER_CHANNEL not in caps.weight_granularity:
            raise ConversionError(f"{where}: the target holds no int8 per-channel weights (it holds {', '.join(caps.weight_dtypes)}); give float")
        refused = [fqn for fqn in fqns if kinds[fqn].value not in caps.ops]
        if refused:
            raise ConversionError(f"{where}: the target does not quantize {kinds[refused[0]].value} layers ({_named(refused)}); give float")
        return Grid(8, None, True, caps.scale_dtype)  # int8 scales in the target's int8 precision (not lowbit_scale_dtype)
    takers = (OpKind.LINEAR, OpKind.EMBEDDING) if "embedding" in caps.ops else (OpKind.LINEAR,)
    if not any(kinds[fqn] in takers for fqn in fqns):
        held = " and embedding" if "embedding" in caps.ops else ""
        raise ConversionError(f"{where}: low-bit weights go to linear{held} layers, and these are {kinds[fqns[0]].value} layers; give int8 or float")
    try:
        return check_lowbit(profile, precision, scheme)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {str(exc).removeprefix(f'target {profile.id}').lstrip(': ')}; give one of those or float") from None


def int8_layer(fqn: str, kind: OpKind, module: nn.Module, profile: TargetProfile, reason: str | None = None) -> LayerPlan:
    """An int8 entry of a low-bit plan: per output channel, symmetric [-127, 127], round to nearest - the form
    every packer lowers beside low-bit layers (ONNX DequantizeLinear, TFLite hybrid FULLY_CONNECTED, Core ML
    constexpr_affine_dequantize), the same numbers as an int8-weight plan."""
    from edgeq.calibration.weights import quantize_weight_per_channel

    quant, codes = quantize_weight_per_channel(module.weight, QDtype.INT8, axis=0, scale_dtype=profile.quantization.scale_dtype)
    entry = LayerPlan(fqn, kind, quant, codes, reason=reason)
    if kind == OpKind.LINEAR and profile.runtime.value == "tflite":
        # LiteRT runs float-input int8 FULLY_CONNECTEDs only as its hybrid kernel (input rows to int8 per call)
        entry.dynamic_activation = QDtype.INT8
    return entry


def scheme_name(scheme: Scheme | None) -> str:
    """A layer's scheme as the plan's reasons and notes say it: float, int8, int4 group 32 (gptq), 4-bit palette."""
    if scheme is None:
        return "float"
    if scheme.palette:
        return f"{scheme.bits}-bit palette" + (f" (one table per {scheme.group_size} output channels)" if scheme.group_size else "")
    if scheme.bits == 8:
        return "int8 per channel"
    return f"int{scheme.bits} {f'group {scheme.group_size}' if scheme.group_size else 'per channel'} ({scheme.algorithm.value})"


def decided_tables(decided: dict[str, LayerDecision], layers: list[tuple[str, nn.Module]]) -> list[tuple[Scheme, list]]:
    """Embedding tables a low-bit per_layer entry decides, grouped by scheme: targets/resolve_embeddings.py plans
    them (4-bit blocks where the target's gathers hold them, else int8 rows: its docstring says why)."""
    groups: dict[Scheme, list] = {}
    for fqn, layer in layers:
        decision = decided.get(fqn)
        if isinstance(layer, nn.Embedding) and decision and decision.scheme and not (decision.scheme.bits == 8 and not decision.scheme.palette):
            groups.setdefault(decision.scheme, []).append((fqn, layer))
    return list(groups.items())


def _form(layer: LayerPlan) -> str:
    """What a quantized plan entry holds, read from the entry itself: int4 group 32, int8 per channel, 4-bit palette."""
    if layer.palette is not None:
        return f"{int(layer.palette.shape[1]).bit_length() - 1}-bit palette"
    granularity = layer.weight.granularity.to_json()
    return f"{layer.weight.dtype.value} " + (f"group {granularity['size']}" if granularity["kind"] == "per_group" else "per channel")


def quantized_reasons(plan, decided: dict[str, LayerDecision]) -> None:
    """Each quantized layer a per_layer entry decided says so in its reason, with the form it got (its float
    layers already say why)."""
    for fqn, decision in decided.items():
        layer = plan.layers.get(fqn)
        if layer is not None and layer.reason is None and not layer.is_float:
            layer.reason = decision.reason(_form(layer))


def overrides_note(decided: dict[str, LayerDecision]) -> str:
    counts: dict[str, int] = {}
    for decision in decided.values():
        counts[scheme_name(decision.scheme)] = counts.get(scheme_name(decision.scheme), 0) + 1
    return "per_layer entries decide " + ", ".join(f"{count} layer(s) {name}" for name, count in counts.items()) + "; each layer's reason names its entry"


def int8_scheme_floats(overrides: tuple[LayerOverride, ...], module: nn.Module, example_inputs: tuple | None) -> dict[str, LayerOverride]:
    """In 8-bit schemes (int8-weight, int8-dynamic, w8a8, w8a16) per_layer entries keep layers float where
    they say float; their layers are int8 already, and low-bit values are for low-bit schemes (noted, see
    `note_int8_scheme`). The layers to keep float, FQN -> the deciding entry."""
    from edgeq.compress.apply import quantizable_layers

    from edgeq.targets.resolve import executed_layers

    executed = executed_layers(module, example_inputs) if example_inputs is not None else None
    fqns = [fqn for fqn, _ in quantizable_layers(module) if executed is None or fqn in executed]
    check_patterns(overrides, fqns)
    decided = {fqn: decide(overrides, fqn) for fqn in fqns}
    return {fqn: entry for fqn, entry in decided.items() if entry is not None and entry.kind == "float"}


def note_int8_scheme(plan, overrides: tuple[LayerOverride, ...], floats: dict[str, LayerOverride]) -> None:
    """The float layers' reasons name their entries; entries asking for low bits say they do not apply here."""
    for fqn, entry in floats.items():
        layer = plan.layers.get(fqn)
        if layer is not None and layer.reason == f"kept float: --keep-float {fqn}":
            layer.reason = f"kept float by per_layer {entry.describe()}"
    lowbit = [entry for entry in overrides if entry.kind != "float" and not (entry.kind == "int" and entry.bits == 8)]
    if lowbit:
        plan.notes.append(
            f"per_layer {', '.join(e.describe() for e in lowbit)}: low-bit values apply to low-bit schemes "
            f"(int4-weight, ...); {plan.scheme} keeps those layers int8"
        )
