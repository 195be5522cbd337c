"""resolve for low-bit schemes (int4/int3/int2-weight, int4-dynamic): the target's grid, checked once, then the
layer-by-layer driver (calibration/lowbit) decides every code and scale on it.

Low-bit schemes quantize linear layers (where the runtimes have blockwise low-bit kernels); every other layer
stays float with its reason in the plan, and so does a linear whose input width is not a multiple of the group.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.to_plan import code_dtype, layer_plan
from edgeq.errors import ConversionError
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.scheme import AWQ_ALGORITHMS, Activations, Algorithm, Scheme
from edgeq.targets.profile import Granularity, Precision, TargetProfile
from edgeq.targets.resolve import Calibration, matches, op_kind, planned_layers
from edgeq.targets.resolve_embeddings import plan_embeddings


def check_lowbit(profile: TargetProfile, precision: Precision, scheme: Scheme) -> Grid:
    """The grid `scheme` means on `profile`, or a ConversionError saying what the target holds instead."""
    caps = profile.quantization
    dtype = f"lut{scheme.bits}" if scheme.palette else code_dtype(scheme.bits, scheme.symmetric).value
    if dtype not in caps.weight_dtypes:
        held = ", ".join(d for d in caps.weight_dtypes) or "no quantized weights"
        raise ConversionError(f"target {profile.id} does not hold {dtype} weights ({precision}); it holds {held}")
    if scheme.palette:  # --group-size counts output channels per table; every runtime with palettes takes both
        return Grid(scheme.bits, None, True, caps.scale_dtype)
    if scheme.group_size is None and Granularity.PER_CHANNEL not in caps.weight_granularity:
        raise ConversionError(f"target {profile.id} holds {dtype} weights per group, not per channel; use --group-size")
    if scheme.group_size is not None and (
        Granularity.PER_GROUP not in caps.weight_granularity or scheme.group_size not in caps.group_sizes
    ):
        sizes = ", ".join(map(str, caps.group_sizes)) or "none"
        raise ConversionError(f"target {profile.id}: group size {scheme.group_size} is not one it runs (it runs {sizes})")
    if not scheme.symmetric and caps.weight_symmetric:
        raise ConversionError(f"target {profile.id} holds symmetric low-bit weights only")
    return Grid(scheme.bits, scheme.group_size, scheme.symmetric, caps.lowbit_scale_dtype or caps.scale_dtype)


def resolve_lowbit_plan(
    module: nn.Module,
    profile: TargetProfile,
    precision: Precision,
    scheme: Scheme,
    keep_float: list[str] = (),
    example_inputs: tuple | None = None,
    calibration: Calibration | None = None,
    overrides: tuple = (),
    device: str = "cpu",
) -> QuantPlan:
    """The plan of a low-bit scheme: codes and scales of every executed linear layer the target quantizes,
    decided by `scheme.algorithm` on the target's grid, layer by layer on the calibration samples.
    `overrides` (edgeq.layer_overrides, `per_layer`) give layers schemes of their own: other bits, group
    sizes or algorithms, int8, or float; each is checked against the target before any work.
    AWQ layers (--algo awq, awq+gptq) get their input scales folded into `module` IN PLACE where the fold is
    exact (calibration/lowbit/awq_fold.py): the caller passes a copy and converts that (edgeq.quantize).
    `device`: where calibration runs ("cpu" or "cuda")."""
    from edgeq.calibration.lowbit.awq import awq_clip_solver
    from edgeq.calibration.lowbit.driver import gptq_solver, known_codes_solver, quantize_layers, rtn_solver
    from edgeq.targets.layer_schemes import decided_tables, int8_layer, layer_schemes, overrides_note, quantized_reasons

    grid = check_lowbit(profile, precision, scheme)
    samples = list(calibration.samples) if calibration is not None else []
    plan = QuantPlan(precision.value, profile.id)
    layers = planned_layers(module, plan, keep_float, example_inputs)
    decided = layer_schemes(profile, precision, scheme, tuple(overrides), layers, list(keep_float))
    chosen: dict[str, Scheme] = {}  # the low-bit layers and each one's scheme (the model's unless per_layer says)
    grids = {scheme: grid}
    for fqn, layer in layers:
        kind, kept = op_kind(layer), matches(fqn, list(keep_float))
        decision = decided.get(fqn)
        layer_scheme, by = (decision.scheme, f" (per_layer {decision.entry.describe()})") if decision else (scheme, "")
        if getattr(layer, "edgeq_float_reason", None):  # a part the model's own rewrite computes in float
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=layer.edgeq_float_reason)
        elif kept:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"kept float: --keep-float {kept}")
        elif layer_scheme is None:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=decision.reason("kept float"))
        elif layer_scheme.bits == 8 and not layer_scheme.palette:
            plan.layers[fqn] = int8_layer(fqn, kind, layer, profile, reason=decision.reason("int8 per channel"))
        elif kind != OpKind.LINEAR:
            plan.layers[fqn] = LayerPlan(fqn, kind, reason=f"{precision} quantizes linear layers; {kind.value} layers stay float{by}")
        elif layer_scheme.group_size is not None and not layer_scheme.palette and layer.in_features % layer_scheme.group_size:
            plan.layers[fqn] = LayerPlan(
                fqn, kind, reason=f"{layer.in_features} input features are not a multiple of the group size {layer_scheme.group_size}{by}"
            )
        else:
            chosen[fqn] = layer_scheme
            grids.setdefault(layer_scheme, decision.grid if decision else grid)
    plan_embeddings(module, plan, profile, scheme, layers, keep_float, skip=set(decided))  # tables: resolve_embeddings.py
    for table_scheme, tables in decided_tables(decided, layers):  # tables a per_layer entry gives low bits
        plan_embeddings(module, plan, profile, table_scheme, tables, keep_float, small_tables_int8=False)
    if decided:
        plan.notes.append(overrides_note(decided))
    palettes = {fqn: s for fqn, s in chosen.items() if s.palette}
    for palette_scheme in dict.fromkeys(palettes.values()):
        _palette_plan(module, plan, [f for f, s in palettes.items() if s == palette_scheme], palette_scheme, grids[palette_scheme])
    affine = {fqn: s for fqn, s in chosen.items() if not s.palette}
    quantized_reasons(plan, decided)
    if not affine:
        return plan
    needing = [s.algorithm.value for s in affine.values() if s.algorithm != Algorithm.RTN]
    if needing and not samples:
        raise ConversionError(f"target {profile.id}: {precision} with {needing[0]} needs calibration samples (--calibration-samples)")
    input_names = calibration.input_names if calibration is not None else None
    row_mask = _attention_rows if "attention_mask" in (input_names or []) else None
    folds = _fold_awq(module, plan, affine, grids, samples, input_names, row_mask, device)
    solvers = {}
    for layer_scheme in dict.fromkeys(affine.values()):
        if layer_scheme.algorithm in (Algorithm.GPTQ, Algorithm.AWQ_GPTQ):
            # act-order with static groups: GPTQ's best on MiniLM, and groups stay contiguous columns (runtimes need it)
            solvers[layer_scheme] = gptq_solver(grids[layer_scheme], actorder=True, static_groups=True, clip="mse")
        elif layer_scheme.algorithm == Algorithm.AWQ:
            solvers[layer_scheme] = awq_clip_solver(grids[layer_scheme])  # s = 1 now: the scales are in the weights
        else:
            solvers[layer_scheme] = rtn_solver(grids[layer_scheme], clip="mse")
        solvers[layer_scheme] = known_codes_solver(grids[layer_scheme], solvers[layer_scheme])
    with _tables_as_planned(module, plan):  # the layers after a table are solved on what the artifact's lookups give
        result = quantize_layers(module, samples or [_example_sample(example_inputs, input_names)], list(affine),
                                 lambda fqn, layer: solvers[affine[fqn]](fqn, layer),
                                 input_names=input_names, row_mask=row_mask, device=device)
    plan.seconds["calibration"] = round(result.total_seconds, 1)
    dynamic = QDtype.INT8 if scheme.activations == Activations.DYNAMIC else None
    for fqn in affine:
        entry = layer_plan(fqn, OpKind.LINEAR, result.weights[fqn])
        entry.dynamic_activation = dynamic
        plan.layers[fqn] = entry
    quantized_reasons(plan, decided)
    for layer_scheme in dict.fromkeys(affine.values()):
        grouping = f"group {layer_scheme.group_size}" if layer_scheme.group_size else "per channel"
        count = sum(s == layer_scheme for s in affine.values())
        plan.notes.append(
            f"{layer_scheme.bits}-bit {'symmetric' if layer_scheme.symmetric else 'asymmetric'} weights, {grouping}, scales in "
            f"{grids[layer_scheme].scale_dtype}, by {layer_scheme.algorithm.value}"
            + _HOW[layer_scheme.algorithm].format(samples=len(samples))
            + (f" ({count} layers)" if len(affine) != count else "")
        )
    plan.notes += [group.note() for group in folds]
    plan.notes.append(_footprint(module, plan, grid, profile.runtime.value))
    return plan


_HOW = {  # how each algorithm decided the codes, for the plan's notes
    Algorithm.RTN: " (MSE clipping)",
    Algorithm.GPTQ: " (act-order, static groups, MSE clipping) on {samples} calibration samples",
    Algorithm.AWQ: " (input scales folded where exact, then AWQ's clip search) on {samples} calibration samples",
    Algorithm.AWQ_GPTQ: " (AWQ input scales folded where exact, then GPTQ with act-order, static groups, MSE clipping) "
                        "on {samples} calibration samples",
}


@contextmanager
def _tables_as_planned(module: nn.Module, plan: QuantPlan):
    """`module`'s quantized embedding tables hold the plan's dequantized rows while the block is running, then
    their own again: the driver calibrates each layer on the outputs of the quantized layers before it, and a
    lookup is such a layer (MiniLM int4 g32: the encoder's GPTQ then compensates the 4-bit word table)."""
    import torch

    from edgeq.compress.apply import user_fqn

    tables = {fqn: entry for fqn, entry in plan.layers.items() if entry.op == OpKind.EMBEDDING and entry.weight is not None}
    saved = {}
    with torch.no_grad():
        for name, child in module.named_modules():
            entry = tables.get(user_fqn(name))
            if entry is not None:
                saved[name] = child.weight.detach().clone()
                child.weight.copy_(torch.from_numpy(entry.weight.dequantize(entry.weight_codes)).to(child.weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, child in module.named_modules():
                if name in saved:
                    child.weight.copy_(saved[name])


def _fold_awq(module, plan: QuantPlan, affine: dict, grids: dict, samples, input_names, row_mask, device) -> list:
    """AWQ's scales folded into `module` in place for the layers whose algorithm is AWQ (awq_fold.py); never
    into a group with a layer whose codes `plan` already holds (int8 or palette per-layer schemes)."""
    from edgeq.calibration.lowbit.awq_fold import fold_awq_scales

    layers = {fqn: grids[s] for fqn, s in affine.items() if s.algorithm in AWQ_ALGORITHMS}
    if not layers:
        return []
    fixed = {fqn for fqn, entry in plan.layers.items() if not entry.is_float}
    return fold_awq_scales(module, samples, layers, input_names=input_names, row_mask=row_mask, device=device, fixed=fixed)


def _footprint(module: nn.Module, plan: QuantPlan, grid: Grid, runtime: str) -> str:
    """Bits per weight as `runtime` stores them (codes in their containers, scales, zero points: edgeq/footprint.py),
    on the quantized layers and over the whole model, and the share of the model's weight elements the quantized
    layers hold: what a user weighs the size by."""
    from edgeq.calibration.lowbit.grid import SCALE_DTYPES
    from edgeq.footprint import float_bits_of, tied_head, weight_storage

    storage = weight_storage(module, plan, runtime, float_bits_of(runtime, plan.scheme))
    quantized = storage.quantized
    elements = sum(layer.weights for layer in quantized)
    bits = sum(layer.bits for layer in quantized)
    containers = sorted({layer.container_bits for layer in quantized if layer.container_bits > layer.code_width})
    codes = f"codes in {'/'.join(map(str, containers))}-bit containers" if containers else "codes"
    # the runtime's scale type where it is wider than the grid's (ONNX MatMulNBits holds float32: A's dtype)
    widths = sorted({
        round(layer.scale_bits / plan.layers[layer.name].weight.scale.size) for layer in quantized
        if plan.layers[layer.name].weight is not None and plan.layers[layer.name].weight.scale.size
    })  # per layer: the scale bits it stores per scale (zero points, where any, are counted apart)
    held = ""
    if widths and widths != [SCALE_DTYPES[grid.scale_dtype][0].itemsize * 8]:
        held = " held as " + "/".join(f"float{w}" for w in widths)
    total = sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight"))  # a shared tensor once
    if (head := tied_head(module)) is not None:
        total += head.weight.numel()  # a tied head has its own plan entry (its own codes in the artifact): counted twice
    return (
        f"{bits / max(elements, 1):.2f} bits per weight on the {len(quantized)} quantized layers ({codes}, "
        f"{grid.scale_dtype} scales{held}{'' if grid.symmetric else ', zero points'}), which hold "
        f"{100 * elements / max(total, 1):.1f}% of the weight elements of the model as planned (float layers a rewrite "
        f"adds, such as side paths, included); the rest stays float: "
        f"{storage.bits_per_weight:.2f} bits per weight over the whole model as {runtime} stores it"
    )


def _palette_plan(module: nn.Module, plan: QuantPlan, chosen: list[str], scheme: Scheme, grid: Grid) -> QuantPlan:
    """k-means palettes (calibration/lowbit/kmeans.py), one table per `group_size` output channels (per tensor
    when the layer has fewer, or without a group size), entries in the target's scale precision."""
    import torch

    from edgeq.calibration.lowbit.grid import SCALE_DTYPES
    from edgeq.calibration.lowbit.kmeans import palettize
    from edgeq.compress.apply import user_fqn

    by_name = {user_fqn(name): child for name, child in module.named_modules()}
    lut_dtype = SCALE_DTYPES[grid.scale_dtype][0]
    for fqn in chosen:
        weight = by_name[fqn].weight.detach()
        rows = weight.shape[0]
        channels = scheme.group_size if scheme.group_size and rows % scheme.group_size == 0 and rows > scheme.group_size else rows
        per = "tensor" if channels == rows else "grouped_channels"
        palette = palettize(weight.reshape(rows, -1), scheme.bits, per=per, group_channels=channels if per != "tensor" else None,
                            lut_dtype=lut_dtype)
        plan.layers[fqn] = LayerPlan(
            fqn, OpKind.LINEAR, weight_codes=palette.indices.cpu().numpy().astype(np.uint8),
            palette=palette.lut.cpu().numpy().astype(np.float32),
        )
    grouping = f"one table per {scheme.group_size} output channels" if scheme.group_size else "one table per layer"
    plan.notes.append(f"{scheme.bits}-bit k-means palettes ({2 ** scheme.bits} {grid.scale_dtype} entries), {grouping}, unweighted")
    return plan


def _attention_rows(sample) -> "torch.Tensor":
    """Only real tokens shape the layer statistics: padding positions are computed but never read."""
    import torch

    return torch.as_tensor(sample["attention_mask"]).bool()


def _example_sample(example_inputs: tuple | None, input_names: list[str] | None) -> dict:
    """RTN needs no data; the driver still runs the model once to find the layers' order."""
    if example_inputs is None or input_names is None:
        raise ConversionError("low-bit schemes need the model's example inputs")
    return dict(zip(input_names, example_inputs))
